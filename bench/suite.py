"""`make bench`: aeserve against the engine ceiling and against its peers, with the goals of issue 8.

    python -m bench.suite [--store model_store] [--quick] [--seconds 6] [--workloads light middle heavy]
                          [--peers plain litserve triton] [--client auto|wrk|aiohttp] [--json PATH]
                          [--aeserve-env AESERVE_X=1 ...] [--no-diffusion]

In one run on one machine, one thing at a time:
1. the workloads (`bench.workloads`) resolved against the store, with their in-process answers;
2. the engine ceiling of each (`bench.engine`): in-process, every ORT layout and batch, the other formats;
3. aeserve started as `make serve` starts it, with the default store and settings: its cold start (process
   start to /readyz 200), then per workload a sample answer compared with the in-process one and one
   phase at each concurrency (`bench.loadgen`): a 1 s warm-up run (not in --quick), then one run whose
   first max(1, ceil(2 C / ceiling)) seconds fill the pipeline and whose last --seconds are the window
   counted, equal for every phase; then the diffusion step-batching figure (`bench.diffusion_batching`)
   and its peak RSS (VmHWM of its process tree) at the end;
4. each peer (`bench/peers/`: plain FastAPI always, LitServe and PyTriton when installed), the same way;
   then the harness floor (`plain_fastapi --floor`: a fixed answer, no work) at one client per workload;
5. the goals (`bench.goals`), printed beside the figures, and the JSON document (`bench.report`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import diffusion_batching
from bench.engine import ceiling, machine_cores
from bench.goals import evaluate, goals_table
from bench.loadgen import load, pick_client
from bench.peers.common import write_specs
from bench.report import SCHEMA, figures_table, write
from bench.servers import (
    PEERS,
    Server,
    request_for,
    sample_answer,
    start_aeserve,
    start_peer,
    unavailable,
)
from bench.workloads import WORKLOADS, Prepared, compare, latest, prepare

CONCURRENCY = (1, 8, 32, 64)
MAX_LEAD_IN_S = 10
DIFFUSION_MODEL = "diffusion-layouts"
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument("--quick", action="store_true", help="1 s windows, short engine sweeps, a short diffusion run")
    parser.add_argument("--seconds", type=int, help="measuring window of every served phase (default 6, quick 1)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS))
    parser.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where the results document goes")
    parser.add_argument(
        "--aeserve-env",
        nargs="*",
        default=[],
        metavar="AESERVE_X=VALUE",
        help="settings for the aeserve run on top of its defaults (recorded in the JSON)",
    )
    parser.add_argument("--no-diffusion", action="store_true", help="skip the diffusion step-batching figure")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1 if args.quick else 6)
    args.warmup = 0 if args.quick else 1  # a run before the phase, not counted
    args.ceilings = {}  # workload -> the engine ceiling, items/s (sizes each phase's lead-in)
    args.engine_seconds = 0.1 if args.quick else 0.5
    return args


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def lead_in(concurrency: int, ceiling_items_per_s: float) -> int:
    """Seconds before a phase's window opens: long enough for `concurrency` requests at the engine's
    ceiling to cycle twice (the pipeline is full when the window opens), at least one."""
    return min(MAX_LEAD_IN_S, max(1, math.ceil(2 * concurrency / max(ceiling_items_per_s, 1e-3))))


def measure_phase(server: Server, item: Prepared, concurrency: int, ceiling: float, args: argparse.Namespace) -> dict:
    path, body, headers = request_for(server.kind, item)
    lead = lead_in(concurrency, ceiling)
    result = load(args.client, server.base + path, body, headers, concurrency, args.seconds, lead, args.warmup)
    served = result.answered_2xx > 0  # no 2xx answer in the window: its latencies describe nothing served
    phase = {
        "concurrency": concurrency,
        "rate": result.rate,
        "errors": result.errors,
        "answered_2xx": result.answered_2xx,
        "seconds": result.seconds,
        "lead_in_s": lead,
        "p50_ms": result.p50_ms if served else None,
        "p99_ms": result.p99_ms if served else None,
    }
    progress(
        f"{server.kind} {item.workload.name} C={concurrency}: {result.rate:.1f} req/s, "
        f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, {result.errors} errors"
    )
    return phase


def serve_workloads(server: Server, prepared: list[Prepared], args: argparse.Namespace) -> dict[str, Any]:
    """Per workload: the sample answer's comparison and one measured phase per concurrency."""
    figures: dict[str, Any] = {}
    for item in prepared:
        try:
            identical = compare(item.spec.answer, sample_answer(server, item), item.expected)
        except Exception as exc:  # an error answer: recorded, and the load still runs
            identical = {"identical": False, "error": str(exc)[:200]}
        ceiling = args.ceilings[item.workload.name]
        phases = [measure_phase(server, item, c, ceiling, args) for c in CONCURRENCY]
        figures[item.workload.name] = {"identical": identical, "phases": phases}
    return figures


def diffusion_figure(server: Server, args: argparse.Namespace) -> dict[str, Any] | None:
    if args.no_diffusion or not (args.store / DIFFUSION_MODEL).is_dir():
        return None
    steps, concurrency, repeats = (10, 4, 1) if args.quick else (50, 8, 3)
    try:
        result = diffusion_batching.measure_against(
            server.base, latest(args.store, DIFFUSION_MODEL)[1], steps, concurrency, repeats
        )
    except (Exception, SystemExit) as exc:
        progress(f"diffusion figure failed: {exc}")
        return None
    return {
        **result.__dict__,
        "ratio": result.ratio,
        "speedup_vs_serial": result.speedup_vs_serial,
        "speedup_is_estimate": True,
    }


def bench_aeserve(prepared: list[Prepared], args: argparse.Namespace, logs: Path) -> tuple[dict[str, Any], dict | None]:
    env = dict(pair.split("=", 1) for pair in args.aeserve_env)
    server = start_aeserve(args.store, logs, env)
    progress(f"aeserve ready in {server.ready_s:.1f} s (default store)")
    try:
        figures = serve_workloads(server, prepared, args)
        diffusion = diffusion_figure(server, args)
        entry = {"ready_s": server.ready_s, "peak_rss_bytes": server.peak_rss_bytes(), "env": env, "workloads": figures}
    finally:
        server.stop()
    return entry, diffusion


def bench_peer(kind: str, prepared: list[Prepared], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    specs = [item.spec for item in prepared]
    server = start_peer(kind, write_specs(specs, logs / "specs.json"), specs, logs)
    progress(f"{kind} ready in {server.ready_s:.1f} s")
    try:
        return {
            "ready_s": server.ready_s,
            "peak_rss_bytes": server.peak_rss_bytes(),
            "workloads": serve_workloads(server, prepared, args),
        }
    finally:
        server.stop()


def bench_floor(prepared: list[Prepared], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """The harness floor's phase at one client per workload: what the client and HTTP cost without work."""
    specs = [item.spec for item in prepared]
    server = start_peer("floor", write_specs(specs, logs / "specs.json"), specs, logs)
    try:
        return {item.workload.name: measure_phase(server, item, 1, args.ceilings[item.workload.name], args)
                for item in prepared}
    finally:
        server.stop()


def machine() -> dict[str, Any]:
    model = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    return {
        "cores": machine_cores(),
        "cpu": model,
        "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    client = args.client = pick_client(args.client)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "concurrency": list(CONCURRENCY),
            "client": client,
            "engine_seconds": args.engine_seconds,
            "workloads": args.workloads,
            "peers": args.peers,
        },
        "skipped": {},
        "servers": {},
        "engine": {},
    }
    prepared = [prepare(args.store, WORKLOADS[name]) for name in args.workloads]
    results["workloads"] = {
        p.workload.name: {
            "model": p.workload.model,
            "op": p.workload.op,
            "request": p.spec.request,
            "answer": p.spec.answer,
            "version": p.manifest.version,
        }
        for p in prepared
    }
    for item in prepared:
        results["engine"][item.workload.name] = found = ceiling(item, args.engine_seconds).to_json()
        found["manifest_format"] = item.manifest.ops[item.workload.op].preferred_format
        args.ceilings[item.workload.name] = found["items_per_s"]
        progress(
            f"engine {item.workload.name}: {found['items_per_s']:.1f} items/s ({found['best']['label']}), "
            f"batch-1 {found['batch1_ms']:.2f} ms"
        )
    with tempfile.TemporaryDirectory(prefix="aeserve-bench-") as tmp:
        logs = Path(tmp)
        results["servers"]["aeserve"], results["diffusion"] = bench_aeserve(prepared, args, logs)
        for kind in args.peers:
            if (why := unavailable(kind)) is not None:
                results["skipped"][kind] = why
                continue
            try:
                results["servers"][kind] = bench_peer(kind, prepared, args, logs)
            except RuntimeError as exc:
                results["skipped"][kind] = f"failed: {exc}; log: {(logs / f'{kind}.log').read_text()[-1500:]}"
        results["floor"] = bench_floor(prepared, args, logs)
    aeserve = results["servers"]["aeserve"]
    results["cold_start_s"], results["rss_peak_bytes"] = aeserve["ready_s"], aeserve["peak_rss_bytes"]
    results["goals"] = [goal.to_json() for goal in evaluate(results)]
    results["settings"]["total_s"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(figures_table(results))
    print()
    print(goals_table(evaluate(results)))
    path = write(results, args.json)
    print(f"\n{results['settings']['total_s']:.0f} s in all; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
