"""Mixed traffic for `deploy.render_dashboard`: encode / decode / reconstruct / sample on every ready model of a
running service, at a concurrency that changes phase by phase, with a share of bad requests (4xx) and bursts
past the service's admission limit (429), so every panel of the dashboard has something to show.

The calls are built from what the service says about its models (`GET /v1/models/{name}`: capabilities,
preprocessing, op inputs, sampler), with the committed example inputs of `bench/inputs/`.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

INPUTS = Path(__file__).resolve().parents[1] / "bench" / "inputs"
# Closed-loop clients per phase, cycled over the run: quiet, busy, a burst past the admission limit, ...
CONCURRENCY_PHASES = (2, 4, 16, 2, 8, 1)
BAD_EVERY = 16  # every 16th call is a bad one, the bad kinds in turn (so each is sent in a long enough run)
MAX_BACKOFF_S = 2.0  # a client answered 429 waits Retry-After (at most this), jittered, before its next call


@dataclass(frozen=True)
class Call:
    """One kind of request: `label` is "<op> <model> <variant>" for the client-side tally."""

    label: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    weight: float = 1.0

    async def send(self, client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(self.path, params=self.params, content=self.content, headers=self.headers,
                                 json=self.json, files=self.files)


def image_for(details: dict[str, Any], inputs: Path = INPUTS) -> tuple[bytes, dict[str, str]]:
    """A PNG the model accepts and the query parameters it needs: the STEM pattern (already scaled) for a STEM
    autoencoder, else the camera image, resized to the model's input when the model does not resize."""
    if details.get("family") == "stem-autoencoder":
        return (inputs / "stem_pattern.png").read_bytes(), {"intensity": "scaled"}
    camera = (inputs / "camera_201.png").read_bytes()
    preprocessing = details.get("preprocessing") or {}
    size, channels = preprocessing.get("input_size"), preprocessing.get("channels", 1)
    if (preprocessing.get("resize") != "none" or not size) and channels == 1:
        return camera, {}
    from PIL import Image

    image = Image.open(io.BytesIO(camera)).convert("L" if channels == 1 else "RGB")
    if size and preprocessing.get("resize") == "none":
        image = image.resize((size[1], size[0]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), {}


def latent_dim(details: dict[str, Any]) -> int | None:
    """Length of one latent vector of the decode op; None when decode takes no input (a fixed render)."""
    inputs = details["ops"]["decode"]["inputs"]
    return int(inputs[0]["shape"][-1]) if inputs else None


def sample_request(details: dict[str, Any]) -> dict[str, Any]:
    """A small sample request: 2 samples; a DDIM sampler gets 8 steps and a condition from its vocabulary."""
    body: dict[str, Any] = {"num_samples": 2, "seed": 0}
    sampler = details.get("sampler") or {}
    if sampler.get("kind") == "ddim":
        values = sampler.get("condition_values") or {}
        body["steps"] = min(8, sampler.get("max_steps") or 8)
        body["condition"] = {key: next(iter(values[key])) if values.get(key) else 0.5
                             for key in sampler.get("condition_keys") or []}
    return body


def model_calls(details: dict[str, Any], rng: random.Random) -> list[Call]:
    """The good calls of one model, one or two per capability it serves."""
    name, capabilities = details["name"], set(details.get("capabilities") or [])
    base, calls = f"/v1/models/{name}", []
    if capabilities & {"encode", "reconstruct"}:
        png, params = image_for(details)
        png_headers = {"Content-Type": "image/png"}
        for op in sorted(capabilities & {"encode", "reconstruct"}):
            calls.append(Call(f"{op} {name} 1 image", f"{base}/{op}", params, png, png_headers))
            parts = [("files", (f"frame{i}.png", png, "image/png")) for i in range(4)]
            calls.append(Call(f"{op} {name} 4 images", f"{base}/{op}", params, files=parts, weight=0.3))
    if "decode" in capabilities:
        dim = latent_dim(details)
        if dim is None:
            calls.append(Call(f"decode {name} render", f"{base}/decode", weight=0.5))
        else:
            for rows in (1, 4):
                latents = [[round(rng.gauss(0, 1), 4) for _ in range(dim)] for _ in range(rows)]
                calls.append(Call(f"decode {name} {rows} latents", f"{base}/decode", json={"latents": latents}))
    if "sample" in capabilities:
        calls.append(Call(f"sample {name}", f"{base}/sample", json=sample_request(details), weight=0.2))
    return calls


def bad_calls(details: list[dict[str, Any]]) -> list[Call]:
    """Client mistakes the service answers with a 4xx: a latent of the wrong length, bytes that are no image,
    num_samples=0, a model that does not exist."""
    calls = [Call("bad unknown model", "/v1/models/no-such-model/encode", content=b"x")]
    for model in details:
        name, capabilities = model["name"], set(model.get("capabilities") or [])
        if "decode" in capabilities and latent_dim(model):
            calls.append(Call(f"bad decode {name}", f"/v1/models/{name}/decode", json={"latents": [[1.0]]}))
        if "encode" in capabilities:
            calls.append(Call(f"bad encode {name}", f"/v1/models/{name}/encode", content=b"not a png",
                              headers={"Content-Type": "image/png"}))
        if "sample" in capabilities:
            calls.append(Call(f"bad sample {name}", f"/v1/models/{name}/sample", json={"num_samples": 0}))
    return calls


def traffic_plan(base_url: str, seed: int = 0) -> tuple[list[Call], list[Call]]:
    """(good calls, bad calls) for every ready model of the service at `base_url`."""
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        listing = client.get("/v1/models").json()["models"]
        details = [client.get(f"/v1/models/{m['name']}").json() for m in listing if m["state"] == "ready"]
    good = [call for model in details for call in model_calls(model, rng)]
    if not good:
        raise RuntimeError(f"no ready model at {base_url} has encode, decode, reconstruct or sample")
    return good, bad_calls(details)


@dataclass
class Tally:
    """What the clients saw: answers by status class and by call."""

    statuses: Counter[str] = field(default_factory=Counter)
    by_call: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, label: str, status: str) -> None:
        self.statuses[status] += 1
        self.by_call.setdefault(label, Counter())[status] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"statuses": dict(sorted(self.statuses.items())),
                "by_call": {label: dict(sorted(c.items())) for label, c in sorted(self.by_call.items())}}


async def drive(base_url: str, good: list[Call], bad: list[Call], seconds: float,
                phases: tuple[int, ...] = CONCURRENCY_PHASES, seed: int = 0,
                transport: httpx.AsyncBaseTransport | None = None) -> Tally:
    """Closed-loop clients for `seconds`: phase k (an equal share of the time) keeps `phases[k]` clients busy,
    each sending a weighted random good call (every BAD_EVERY-th call a bad one), and waiting for its
    answer (and after a 429 its Retry-After, as a well-behaved client does) before the next."""
    tally, rng, sent = Tally(), random.Random(seed), 0
    start = time.monotonic()
    phase_s = seconds / len(phases)
    weights = [call.weight for call in good]

    def clients_now() -> int | None:
        elapsed = time.monotonic() - start
        return None if elapsed >= seconds else phases[min(int(elapsed / phase_s), len(phases) - 1)]

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        while (active := clients_now()) is not None:
            if index >= active:
                await asyncio.sleep(0.05)
                continue
            sent += 1
            if bad and sent % BAD_EVERY == 0:
                call = bad[(sent // BAD_EVERY) % len(bad)]
            else:
                call = rng.choices(good, weights)[0]
            try:
                response = await call.send(client)
                status = str(response.status_code)
                if response.status_code == 429:
                    wait_s = min(MAX_BACKOFF_S, float(response.headers.get("Retry-After", 1)))
                    await asyncio.sleep(wait_s * rng.uniform(0.5, 1.0))
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.TransportError:
                status = "transport error"
            tally.add(call.label, status)

    limits = httpx.Limits(max_connections=max(phases), max_keepalive_connections=max(phases))
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits, transport=transport) as client:
        await asyncio.gather(*(client_loop(index, client) for index in range(max(phases))))
    return tally


def send_traffic(base_url: str, seconds: float, seed: int = 0) -> Tally:
    """Plan the calls from the service's models and drive them for `seconds`."""
    good, bad = traffic_plan(base_url, seed)
    return asyncio.run(drive(base_url, good, bad, seconds, seed=seed))
