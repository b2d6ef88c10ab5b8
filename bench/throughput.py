"""In-process ONNX Runtime vs served throughput, side by side in one run.

    python -m bench.throughput --store model_store [--models v3-small-201 stem-ae] [--seconds 8]

For each model: (1) the `reconstruct` ONNX artifact run in this process through the service's own
runtime class at batch sizes 1..32, best images/s kept; (2) the service started as a subprocess on
127.0.0.1 and driven by `--concurrency` clients (one image per request, NPY in / NPY out) for
`--seconds`; images/s counted from answered requests. Prints one table with the ratio
served / in-process. Both phases run on the same machine, one after the other, so the ratio is
comparable even when the absolute numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
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

from app.runtime.onnx import OnnxRuntime
from app.schemas.manifest import Manifest
from app.settings import Settings

DEFAULT_MODELS = ("v3-small-201", "stem-ae")


@dataclass
class Row:
    model: str
    op: str
    best_batch: int
    in_process_ips: float
    served_ips: float
    served_p50_ms: float
    served_p99_ms: float
    errors: int

    @property
    def ratio(self) -> float:
        return self.served_ips / self.in_process_ips if self.in_process_ips else float("nan")


def latest_manifest(store: Path, model: str) -> tuple[Path, Manifest]:
    versions = sorted((p for p in (store / model).iterdir() if (p / "manifest.json").is_file()),
                      key=lambda p: int(p.name) if p.name.isdigit() else -1)
    if not versions:
        raise SystemExit(f"no built version of {model!r} under {store}; run `make store` first")
    directory = versions[-1]
    return directory, Manifest.model_validate_json((directory / "manifest.json").read_text())


def example_images(manifest: Manifest, n: int, seed: int = 0) -> np.ndarray:
    h, w = manifest.preprocessing.input_size
    c = manifest.preprocessing.channels
    return np.random.default_rng(seed).random((n, c, h, w), dtype=np.float32)


def in_process(directory: Path, manifest: Manifest, op: str, seconds: float, threads: int) -> tuple[int, float]:
    spec = manifest.ops[op]
    runtime = OnnxRuntime(directory / spec.artifacts["onnx"], device="cpu", intra_op_threads=threads)
    name = spec.inputs[0].name
    best = (1, 0.0)
    for batch in (1, 2, 4, 8, 16, 32):
        x = example_images(manifest, batch)
        runtime.run({name: x})  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 6:
            runtime.run({name: x})
            done += batch
        ips = done / (time.perf_counter() - start)
        if ips > best[1]:
            best = (batch, ips)
    return best


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


async def drive(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    headers = {"content-type": "application/x-npy", "accept": "application/x-npy"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal errors
            k = i
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                r = await client.post(url, content=bodies[k % len(bodies)], headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                k += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies, errors


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("AESERVE_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/x-npy"
wrk.headers["Accept"] = "application/x-npy"
"""


def drive_wrk(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    """The load from `wrk` (C, one thread): far less CPU per request than a Python client, which matters
    when client, server and engine share two cores. Returns (req/s, p50 ms, p99 ms, errors)."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path, script = Path(tmp) / "body.npy", Path(tmp) / "post.lua"
        body_path.write_bytes(body)
        script.write_text(WRK_SCRIPT)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "120s",
             "-s", str(script), url],
            capture_output=True, text=True, env={**os.environ, "AESERVE_BENCH_BODY": str(body_path)}, check=True,
        ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return rate, _wrk_ms(out, "50%"), _wrk_ms(out, "99%"), errors


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def npy_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, image)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--op", default="reconstruct")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto",
                        help="load generator: wrk when installed (apt-get install wrk), else httpx")
    args = parser.parse_args(argv)

    threads = Settings().intra_op_threads
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else "httpx"
    rows: list[Row] = []
    measured: dict[str, tuple[int, float]] = {}
    for model in args.models:
        directory, manifest = latest_manifest(args.store, model)
        measured[model] = in_process(directory, manifest, args.op, args.seconds, threads)

    port = free_port()
    server = start_server(args.store, port, args.models)
    try:
        for model in args.models:
            _, manifest = latest_manifest(args.store, model)
            bodies = [npy_bytes(img[0]) for img in np.split(example_images(manifest, 16, seed=1), 16)]
            url = f"http://127.0.0.1:{port}/v1/models/{model}/{args.op}"
            batch, best = measured[model]
            # Long enough for every client to be answered several times, however slow the model.
            seconds = max(args.seconds, 4 * args.concurrency / max(best, 1e-3))
            asyncio.run(drive(url, bodies, args.concurrency, 1.0))  # warm the connections and queues
            if client == "wrk":
                ips, p50, p99, errors = drive_wrk(url, bodies[0], args.concurrency, seconds)
            else:
                ips, latencies, errors = asyncio.run(drive(url, bodies, args.concurrency, seconds))
                lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
                p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
            rows.append(Row(model, args.op, batch, best, ips, p50, p99, errors))
    finally:
        server.terminate()
        server.wait(timeout=30)

    served = f"served img/s (c={args.concurrency})"
    header = (f"{'model':<22} {'op':<12} {'best batch':>10} {'in-process img/s':>17} {served:>21} "
              f"{'ratio':>6} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.model:<22} {r.op:<12} {r.best_batch:>10} {r.in_process_ips:>17.1f} {r.served_ips:>21.1f} "
              f"{r.ratio:>6.2f} {r.served_p50_ms:>8.1f} {r.served_p99_ms:>8.1f} {r.errors:>6}")
    print(f"client: {client}; engine threads: {threads}; in-process = the service's OnnxRuntime class, "
          "best of batch 1-32")
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "ratio": r.ratio} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
