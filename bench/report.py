"""The results document of `make bench` (JSON, schema "aeserve-bench/1"), its check and its printed tables.

Top-level keys: `schema`, `created` (ISO time), `machine` (cores, CPU, load average before the run),
`settings` (quick, seconds, warm-up, concurrencies, client, workloads, peers), `workloads` (name ->
model, op, request, answer), `engine` (name -> `bench.engine.Ceiling.to_json()`), `servers` (server ->
ready_s, peak_rss_bytes, workloads: name -> {identical, phases: [{concurrency, rate, p50_ms, p99_ms,
errors, answered_2xx, seconds}]}), `skipped` (peer -> why), `cold_start_s`, `rss_peak_bytes`,
`diffusion` (bench.diffusion_batching's result, or null) and `goals` (bench.goals rows); optional `floor`
(workload -> the harness floor's phase at one client: a server answering a fixed answer without work).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "aeserve-bench/1"
TOP_LEVEL: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "created": str,
    "machine": dict,
    "settings": dict,
    "workloads": dict,
    "engine": dict,
    "servers": dict,
    "skipped": dict,
    "cold_start_s": (float, int, type(None)),
    "rss_peak_bytes": (int, type(None)),
    "diffusion": (dict, type(None)),
    "goals": list,
}
PHASE_KEYS = {"concurrency", "rate", "p50_ms", "p99_ms", "errors", "answered_2xx", "seconds"}
GOAL_KEYS = {"goal", "workload", "target", "figure", "status", "value"}


def validate(results: dict[str, Any]) -> list[str]:
    """Every way `results` departs from the schema (empty: it conforms)."""
    problems = [f"{key}: missing" for key in TOP_LEVEL if key not in results]
    problems += [
        f"{key}: {type(results[key]).__name__}"
        for key, kind in TOP_LEVEL.items()
        if key in results and not isinstance(results[key], kind)
    ]
    if problems:
        return problems
    if results["schema"] != SCHEMA:
        problems.append(f"schema: {results['schema']!r} != {SCHEMA!r}")
    for server, entry in results["servers"].items():
        for workload, figures in entry.get("workloads", {}).items():
            if workload not in results["workloads"]:
                problems.append(f"servers.{server}.workloads.{workload}: not a workload of the run")
            if "identical" not in figures.get("identical", {}):
                problems.append(f"servers.{server}.workloads.{workload}.identical: missing")
            for phase in figures.get("phases", []):
                if missing := PHASE_KEYS - set(phase):
                    problems.append(f"servers.{server}.workloads.{workload}.phases: missing {sorted(missing)}")
    for workload, engine in results["engine"].items():
        if not {"items_per_s", "batch1_ms", "best", "measurements"} <= set(engine):
            problems.append(f"engine.{workload}: missing figures")
    for index, goal in enumerate(results["goals"]):
        if set(goal) != GOAL_KEYS or goal["status"] not in ("PASS", "MISS", "N/A"):
            problems.append(f"goals[{index}]: {goal}")
    return problems


def write(results: dict[str, Any], path: Path) -> Path:
    problems = validate(results)
    if problems:
        raise ValueError("results do not match the schema: " + "; ".join(problems))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(results), indent=2, allow_nan=False) + "\n")
    return path


def _plain(value: Any) -> Any:
    """JSON values only: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def figures_table(results: dict[str, Any]) -> str:
    """Per workload: the engine ceiling, then every server's req/s at each concurrency and its latencies."""
    concurrencies = results["settings"]["concurrency"]
    lines = []
    for name, workload in results["workloads"].items():
        engine = results["engine"].get(name, {})
        best = engine.get("best", {}).get("label", "-")
        codecs = engine.get("with_codecs") or {}
        lines.append(
            f"{name}: {workload['model']} {workload['op']}, {workload['request']} in, {workload['answer']} out;"
            f" engine ceiling {_num(engine.get('items_per_s'))} items/s ({best}),"
            f" batch-1 {_num(engine.get('batch1_ms'), 2)} ms; with decode + encode in-process"
            f" {_num(codecs.get('items_per_s'))} items/s"
        )
        header = (
            ["  server"]
            + [f"C={c} req/s" for c in concurrencies]
            + ["p50@1 ms", "p99@8 ms", "p99@32 ms", "errors", "identical"]
        )
        rows = [header]
        for server, entry in results["servers"].items():
            figures = entry.get("workloads", {}).get(name)
            if figures is None:
                continue
            by_c = {p["concurrency"]: p for p in figures["phases"]}
            rates = [_num(by_c[c]["rate"]) if c in by_c else "-" for c in concurrencies]
            lat = [
                _num(by_c[c][key], 1) if c in by_c else "-" for c, key in ((1, "p50_ms"), (8, "p99_ms"), (32, "p99_ms"))
            ]
            errors = str(sum(p["errors"] for p in figures["phases"]))
            identical = "yes" if figures["identical"].get("identical") else "NO"
            rows.append([f"  {server}", *rates, *lat, errors, identical])
        floor = (results.get("floor") or {}).get(name)
        if floor:  # the harness floor: one client, a fixed answer, no work
            blank = ["-"] * len(concurrencies)
            rows.append(["  (floor)", _num(floor["rate"]), *blank[1:], _num(floor["p50_ms"]), "-", "-",
                         str(floor["errors"]), "-"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += [
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
    for peer, why in results["skipped"].items():
        lines.append(f"(peer {peer} not run: {why})")
    diffusion = results.get("diffusion")
    if diffusion:
        lines.append(
            f"diffusion step batching ({diffusion['model']}, {diffusion['steps']} steps): "
            f"{diffusion['concurrency']} concurrent requests take {diffusion['ratio']:.2f}x one request's "
            f"wall time; estimated speed-up vs {diffusion['concurrency']} sequential: "
            f"{diffusion['speedup_vs_serial']:.2f}x (estimate: N x one request, not measured); mean step batch "
            f"{diffusion['concurrent_mean_step_batch']:.1f}"
        )
    return "\n".join(lines)
