"""Step-level batching of DDIM sampling: one request alone vs N concurrent ones.

    python -m bench.diffusion_batching --store model_store [--model diffusion-layouts] [--steps 50]
                                       [--concurrency 8]

Starts the service as a subprocess on 127.0.0.1 (`bench.servers`; `make bench` uses its running one
instead, through `measure_against`), then measures the
wall time of ONE `--steps`-step `sample` request (one image), and of `--concurrency` such requests sent
at once with distinct seeds; each phase runs `--repeats` times and its median wall time is kept. With
step-level continuous batching the concurrent requests share every denoiser call, so their wall time
should stay well under N x the single one. The speed-up over N sequential requests is an estimate
(N x the single wall time; N requests in a row are not run) and is printed as one. The mean step batch
size of each phase comes from the service's `aeserve_diffusion_step_batch_size` histogram (sum / count
differences read from /metrics before and after the phase).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app.schemas.manifest import Manifest
from bench.servers import start_aeserve
from bench.workloads import latest

STEP_BATCH = "aeserve_diffusion_step_batch_size"


@dataclass
class Result:
    model: str
    steps: int
    concurrency: int
    single_wall_s: float
    concurrent_wall_s: float
    single_mean_step_batch: float
    concurrent_mean_step_batch: float

    @property
    def ratio(self) -> float:
        """Concurrent wall time over single wall time (1.0 = the N requests cost as much as one)."""
        return self.concurrent_wall_s / self.single_wall_s

    @property
    def speedup_vs_serial(self) -> float:
        """N sequential requests' estimated time (N x single) over the concurrent wall time."""
        return self.concurrency * self.single_wall_s / self.concurrent_wall_s


def request_body(manifest: Manifest, steps: int, seed: int) -> dict:
    """A one-image DDIM request; the condition is all zeros (valid class ids and tone) when one is needed."""
    sampler = manifest.sampler
    if sampler is None or sampler.kind != "ddim":
        kind = None if sampler is None else sampler.kind
        raise SystemExit(f"{manifest.name} has sampler {kind!r}; this bench needs a 'ddim' sampler")
    body: dict = {"num_samples": 1, "seed": seed, "steps": steps, "eta": 0.0}
    if sampler.condition_dim:
        body["condition"] = [0.0] * sampler.condition_dim
    return body


def step_batch_totals(base: str, model: str) -> tuple[float, float]:
    """(sum, count) of the model's step batch size histogram, as /metrics reports it now."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != STEP_BATCH:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == f"{STEP_BATCH}_sum":
                total += sample.value
            elif sample.name == f"{STEP_BATCH}_count":
                count += sample.value
    return total, count


async def post_all(url: str, bodies: list[dict]) -> tuple[float, list[np.ndarray]]:
    """Send every body at once; (wall seconds until the last answer, the images)."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post(url, json=body, params={"format": "npy"}) for body in bodies)
        )
        wall = time.perf_counter() - start
    for body, response in zip(bodies, responses, strict=True):
        if response.status_code != 200:
            raise SystemExit(f"seed {body['seed']}: HTTP {response.status_code}: {response.text[:300]}")
    return wall, [np.load(io.BytesIO(r.content), allow_pickle=False) for r in responses]


def measure(base: str, model: str, bodies: list[dict]) -> tuple[float, float, list[np.ndarray]]:
    """(wall s, mean step batch size, images) of one phase."""
    before = step_batch_totals(base, model)
    wall, images = asyncio.run(post_all(f"{base}/v1/models/{model}/sample", bodies))
    after = step_batch_totals(base, model)
    steps = after[1] - before[1]
    mean = (after[0] - before[0]) / steps if steps else float("nan")
    return wall, mean, images


def median_phase(base: str, model: str, bodies: list[dict], repeats: int) -> tuple[float, float, list[np.ndarray]]:
    """The phase `repeats` times: median wall s, mean step batch over all runs, the last run's images."""
    runs = [measure(base, model, bodies) for _ in range(repeats)]
    return float(np.median([r[0] for r in runs])), float(np.mean([r[1] for r in runs])), runs[-1][2]


def measure_against(base: str, manifest: Manifest, steps: int, concurrency: int, repeats: int = 3) -> Result:
    """The figure, measured on the service answering at `base`."""
    model = manifest.name
    measure(base, model, [request_body(manifest, 2, seed=0)])  # warm the connection and the sampler
    single_wall, single_batch, _ = median_phase(base, model, [request_body(manifest, steps, seed=0)], repeats)
    bodies = [request_body(manifest, steps, seed=1 + i) for i in range(concurrency)]
    concurrent_wall, concurrent_batch, images = median_phase(base, model, bodies, repeats)
    if concurrency > 1 and np.array_equal(images[0], images[1]):
        raise SystemExit("distinct seeds gave identical images")
    return Result(model, steps, concurrency, single_wall, concurrent_wall, single_batch, concurrent_batch)


def run(store: Path, model: str, steps: int, concurrency: int, repeats: int = 3) -> Result:
    """Start the service with `model` alone and measure the figure."""
    _, manifest = latest(store, model)
    with tempfile.TemporaryDirectory(prefix="aeserve-bench-") as logs:
        server = start_aeserve(store, Path(logs), {"AESERVE_MODELS": model, "AESERVE_REQUEST_TIMEOUT_S": "600"})
        try:
            return measure_against(server.base, manifest, steps, concurrency, repeats)
        finally:
            server.stop()


def print_table(r: Result) -> None:
    n = r.concurrency
    rows = [
        ("model", r.model),
        ("steps per request", str(r.steps)),
        ("single request wall s", f"{r.single_wall_s:.3f}"),
        (f"{n} concurrent wall s", f"{r.concurrent_wall_s:.3f}"),
        (f"ratio ({n}-concurrent / single)", f"{r.ratio:.2f}"),
        (f"speed-up vs {n} sequential (estimate: {n} x single)", f"{r.speedup_vs_serial:.2f}x"),
        ("mean step batch, single", f"{r.single_mean_step_batch:.2f}"),
        (f"mean step batch, {n} concurrent", f"{r.concurrent_mean_step_batch:.2f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value:>18}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--model", default="diffusion-layouts")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per phase; the median wall time is kept")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if min(args.steps, args.concurrency, args.repeats) < 1:
        parser.error("--steps, --concurrency and --repeats must be >= 1")
    result = run(args.store, args.model, args.steps, args.concurrency, args.repeats)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(
            {**asdict(result), "ratio": result.ratio, "speedup_vs_serial": result.speedup_vs_serial}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
