"""In-process ONNX Runtime vs served throughput, side by side in one run.

    python -m bench.throughput --store model_store [--models v3-small-201 stem-ae] [--seconds 8]

For each model (its newest version, chosen as the service chooses it): (1) the op's ONNX artifact run
in this process through the service's own runtime class: a short sweep over batch sizes 1..32 picks
the best, which is then measured for the measuring window; (2) the service started as a subprocess on
127.0.0.1 and driven by `--concurrency` clients, one image per request, for the same window. Request
bodies are what the README documents: PNG images (Content-Type: image/png) for encode and reconstruct,
NPY latents (application/x-npy) for decode, answers asked for as NPY. Only 2xx answers count as served
images; every other answer or failed request is counted in `errors`. The window is `--seconds`, longer
for a slow model (every client answered several times), and identical for both phases. Both phases run
on the same machine, one after the other, so the ratio served / in-process is comparable even when the
absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from app.codecs import NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, encode_npy, encode_png
from app.runtime.onnx import OnnxRuntime
from app.schemas.manifest import Manifest
from app.schemas.store_format import newest_version_dir, read_manifest
from app.settings import Settings

DEFAULT_MODELS = ("v3-small-201", "stem-ae")
IMAGE_OPS = ("encode", "reconstruct")
LATENT_OPS = ("decode",)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SWEEP_SECONDS = 1.0  # per batch size, to pick the best one
PICTURE = Path(__file__).resolve().parent / "inputs" / "camera_201.png"


@dataclass
class Row:
    model: str
    op: str
    best_batch: int
    window_s: float
    in_process_ips: float
    served_ips: float
    served_p50_ms: float
    served_p99_ms: float
    errors: int

    @property
    def ratio(self) -> float:
        return self.served_ips / self.in_process_ips if self.in_process_ips else float("nan")


def latest_manifest(store: Path, model: str) -> tuple[Path, Manifest]:
    """The newest version of `model` (the store's own version order) and its manifest."""
    directory = newest_version_dir(store / model)
    if directory is None:
        raise SystemExit(f"no built version of {model!r} under {store}; run `make store` first")
    return directory, read_manifest(directory)


# ------------------------------------------------------------------------------------------- inputs


def example_images(manifest: Manifest, n: int) -> np.ndarray:
    """n distinct (C, H, W) float32 images at the model's input size, 8-bit values scaled to [0, 1]:
    `camera` (bench/inputs) resized and shifted, exactly what the service decodes from their PNGs."""
    if manifest.preprocessing.input_size is None:
        raise SystemExit(f"{manifest.name} takes no image input")
    h, w = manifest.preprocessing.input_size
    picture = np.asarray(Image.open(PICTURE).convert("L").resize((w, h), Image.Resampling.BILINEAR))
    frames = np.stack([np.roll(picture, (7 * i, 13 * i), axis=(0, 1)) for i in range(n)])
    frames = np.repeat(frames[:, None], manifest.preprocessing.channels, axis=1)
    return frames.astype(np.float32) / np.float32(255)


def example_latents(manifest: Manifest, op: str, n: int) -> np.ndarray:
    """n standard normal latents of the op's input width."""
    dim = manifest.ops[op].inputs[0].shape[-1]
    return np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)


def example_inputs(manifest: Manifest, op: str, n: int) -> np.ndarray:
    """n inputs of the op as the engine receives them (one per request when served)."""
    if op in LATENT_OPS:
        return example_latents(manifest, op, n)
    return example_images(manifest, n)


def request_bodies(manifest: Manifest, op: str, n: int) -> tuple[str, list[bytes]]:
    """(Content-Type, n bodies of one item each) as the README documents them: PNG images, NPY latents."""
    items = example_inputs(manifest, op, n)
    if op in LATENT_OPS:
        return NPY_MEDIA_TYPE, [encode_npy(item[None]) for item in items]
    return PNG_MEDIA_TYPE, [encode_png(item) for item in items]


# --------------------------------------------------------------------------------------- in-process


def batches_per_second(runtime: OnnxRuntime, feeds: dict[str, np.ndarray], seconds: float) -> float:
    """Runs of one batch per second over a window of `seconds` (after one warm-up run)."""
    runtime.run(feeds)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runtime.run(feeds)
        done += 1
    return done / (time.perf_counter() - start)


def sweep(runtime: OnnxRuntime, manifest: Manifest, op: str) -> tuple[int, float]:
    """(best batch size, its rough images/s) from a short run of each batch size."""
    name = manifest.ops[op].inputs[0].name
    limit = manifest.ops[op].max_batch_size
    rates = {batch: batch * batches_per_second(runtime, {name: example_inputs(manifest, op, batch)},
                                               SWEEP_SECONDS)
             for batch in BATCH_SIZES if batch <= limit}
    best = max(rates, key=rates.__getitem__)
    return best, rates[best]


def measuring_window(seconds: float, concurrency: int, images_per_second: float) -> int:
    """Whole seconds (what wrk takes): `seconds`, or long enough for every client to be answered 4 times."""
    return max(1, math.ceil(max(seconds, 4 * concurrency / max(images_per_second, 1e-3))))


# ------------------------------------------------------------------------------------------- served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int, models: list[str]) -> subprocess.Popen:
    # Throughput, not deadlines: at concurrency 32 a slow model's queue is longer than the default 30 s.
    env = {**os.environ, "AESERVE_STORE": str(store), "AESERVE_MODELS": ",".join(models),
           "AESERVE_REQUEST_TIMEOUT_S": "600"}
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit("server exited before it was ready")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready within 300 s")


async def drive(url: str, content_type: str, bodies: list[bytes], concurrency: int,
                seconds: float) -> tuple[float, list[float], int]:
    """`concurrency` httpx clients for `seconds`: (2xx answers/s, their latencies in s, other outcomes)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    headers = {"content-type": content_type, "accept": NPY_MEDIA_TYPE}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    response = await client.post(url, content=bodies[k % len(bodies)], headers=headers)
                except httpx.HTTPError:
                    errors += 1
                else:
                    if response.is_success:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, errors


# `response` counts the 2xx answers of each wrk thread; `done` prints their sum for parse_wrk.
WRK_SCRIPT = """
local f = assert(io.open(os.getenv("AESERVE_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = os.getenv("AESERVE_BENCH_CONTENT_TYPE")
wrk.headers["Accept"] = "application/x-npy"

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

answered_2xx = 0
function response(status, headers, body)
  if status >= 200 and status < 300 then
    answered_2xx = answered_2xx + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("answered_2xx")
  end
  io.write(string.format("2xx responses: %d\\n", total))
end
"""


@dataclass
class WrkResult:
    answered_2xx: int
    seconds: float
    errors: int       # answers that were not 2xx, plus connect/read/write errors and timeouts
    p50_ms: float     # latency percentiles of every answer (wrk does not split them by status)
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.answered_2xx / self.seconds


def parse_wrk(out: str) -> WrkResult:
    """Read wrk's `--latency` report and the `2xx responses` line that WRK_SCRIPT adds."""
    requests = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    ok = re.search(r"^2xx responses: (\d+)$", out, re.M)
    if requests is None or ok is None:
        raise ValueError(f"unexpected wrk output:\n{out}")
    seconds = float(requests.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[requests.group(3)]
    answered, answered_2xx = int(requests.group(1)), int(ok.group(1))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = answered - answered_2xx + (sum(map(int, socket_errors.groups())) if socket_errors else 0)
    return WrkResult(answered_2xx, seconds, errors, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"))


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def drive_wrk(url: str, content_type: str, body: bytes, concurrency: int, seconds: int) -> WrkResult:
    """The load from `wrk` (C, one thread): far less CPU per request than a Python client, which matters
    when client, server and engine share two cores."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_path.write_bytes(body)
        script.write_text(WRK_SCRIPT)
        env = {**os.environ, "AESERVE_BENCH_BODY": str(body_path), "AESERVE_BENCH_CONTENT_TYPE": content_type}
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "120s",
             "-s", str(script), url],
            capture_output=True, text=True, env=env, check=True,
        ).stdout
    return parse_wrk(out)


def served(url: str, manifest: Manifest, op: str, client: str, concurrency: int,
           window: int) -> tuple[float, float, float, int]:
    """(2xx images/s, p50 ms, p99 ms, errors) of the served op over `window` seconds."""
    content_type, bodies = request_bodies(manifest, op, 16)
    asyncio.run(drive(url, content_type, bodies, concurrency, 1.0))  # warm the connections and queues
    if client == "wrk":
        result = drive_wrk(url, content_type, bodies[0], concurrency, window)
        return result.rate, result.p50_ms, result.p99_ms, result.errors
    ips, latencies, errors = asyncio.run(drive(url, content_type, bodies, concurrency, window))
    lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return ips, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), errors


# --------------------------------------------------------------------------------------------- main


def print_table(rows: list[Row], client: str, concurrency: int, threads: int) -> None:
    served_label = f"served img/s (c={concurrency})"
    header = (f"{'model':<22} {'op':<12} {'best batch':>10} {'window s':>8} {'in-process img/s':>17} "
              f"{served_label:>21} {'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.model:<22} {r.op:<12} {r.best_batch:>10} {r.window_s:>8.0f} {r.in_process_ips:>17.1f} "
              f"{r.served_ips:>21.1f} {r.ratio:>6.2f} {r.served_p50_ms:>8.1f} {r.served_p99_ms:>8.1f} "
              f"{r.errors:>6}")
    print(f"client: {client}; engine threads: {threads}; in-process = the service's OnnxRuntime class at the "
          "best batch of 1-32; served = 2xx answers only")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--op", default="reconstruct", choices=IMAGE_OPS + LATENT_OPS)
    parser.add_argument("--seconds", type=float, default=8.0, help="shortest measuring window of each phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto",
                        help="load generator: wrk when installed (apt-get install wrk), else httpx")
    args = parser.parse_args(argv)

    threads = Settings().intra_op_threads
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else "httpx"
    measured: dict[str, tuple[int, int, float]] = {}
    for model in args.models:
        directory, manifest = latest_manifest(args.store, model)
        spec = manifest.ops[args.op]
        runtime = OnnxRuntime(directory / spec.artifacts["onnx"], device="cpu", intra_op_threads=threads)
        batch, rough = sweep(runtime, manifest, args.op)
        window = measuring_window(args.seconds, args.concurrency, rough)
        feeds = {spec.inputs[0].name: example_inputs(manifest, args.op, batch)}
        measured[model] = (batch, window, batch * batches_per_second(runtime, feeds, window))

    rows: list[Row] = []
    port = free_port()
    server = start_server(args.store, port, args.models)
    try:
        for model in args.models:
            _, manifest = latest_manifest(args.store, model)
            batch, window, in_process_ips = measured[model]
            url = f"http://127.0.0.1:{port}/v1/models/{model}/{args.op}"
            ips, p50, p99, errors = served(url, manifest, args.op, client, args.concurrency, window)
            rows.append(Row(model, args.op, batch, window, in_process_ips, ips, p50, p99, errors))
    finally:
        server.terminate()
        server.wait(timeout=30)

    print_table(rows, client, args.concurrency, threads)
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "ratio": r.ratio} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
