"""The goals of issue 8, evaluated from a results document (`bench.report`): one row per goal and figure.

Served figures are aeserve's best 2xx req/s over the concurrencies run; a peer's the same; "the best
peer" is the peer with the most req/s for throughput, and the peer with the lowest p99 at that
concurrency for latency, among the phases without errors; an aeserve phase with errors misses its
latency goals. A goal whose figures are missing (a peer or torch not installed, a phase not
run) is N/A, never PASS.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

CEILING_SHARE = {"light": 0.6, "middle": 0.95, "heavy": 0.95}
PEER_SPEEDUP = {"light": 1.5, "middle": 1.1, "heavy": 1.0}
P99_CONCURRENCY = (8, 32)
OVERHEAD_MS = 1.0
COLD_START_S = 10.0
RSS_BYTES = 1.5e9
FORMAT_SPEEDUP = 1.5


@dataclass(frozen=True)
class Goal:
    goal: str
    workload: str
    target: str
    figure: str
    status: str  # PASS | MISS | N/A
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check(value: float | None, ok: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "N/A"
    return "PASS" if ok else "MISS"


def phases(results: dict[str, Any], server: str, workload: str) -> list[dict[str, Any]]:
    return results["servers"].get(server, {}).get("workloads", {}).get(workload, {}).get("phases", [])


def best_rate(results: dict[str, Any], server: str, workload: str) -> float | None:
    rates = [p["rate"] for p in phases(results, server, workload)]
    return max(rates) if rates else None


def phase_at(results: dict[str, Any], server: str, workload: str, concurrency: int) -> dict[str, Any] | None:
    return next((p for p in phases(results, server, workload) if p["concurrency"] == concurrency), None)


def peers(results: dict[str, Any]) -> list[str]:
    return [s for s in results["servers"] if s != "aeserve"]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ceiling_share_goal(name: str, workload: str, served: float | None, ceiling: float | None) -> Goal:
    """Served req/s as a share of an in-process items/s figure, against the workload's ceiling-share target."""
    share = ratio(served, ceiling)
    target = CEILING_SHARE[workload]
    return Goal(name, workload, f">= {target}", _fmt_ratio(share, served, ceiling, " req/s", " items/s"),
                check(share, share is not None and share >= target), share)


def throughput_goals(results: dict[str, Any], workload: str) -> list[Goal]:
    served = best_rate(results, "aeserve", workload)
    engine = results["engine"].get(workload, {})
    goals = [
        ceiling_share_goal("served / engine ceiling", workload, served, engine.get("items_per_s")),
        # context for the goal above: the same share of the in-process ceiling with the codecs' work in it
        ceiling_share_goal("(context) served / in-process decode+run+encode", workload, served,
                           (engine.get("with_codecs") or {}).get("items_per_s")),
    ]
    rates = {p: best_rate(results, p, workload) for p in peers(results)}
    rates = {p: r for p, r in rates.items() if r is not None}
    best = max(rates, key=rates.__getitem__) if rates else None
    speedup = ratio(served, rates.get(best)) if best else None
    goals.append(
        Goal(
            "served / best peer req/s",
            workload,
            f">= {PEER_SPEEDUP[workload]}",
            _fmt_ratio(speedup, served, rates.get(best), "", f" ({best})"),
            check(speedup, speedup is not None and speedup >= PEER_SPEEDUP[workload]),
            speedup,
        )
    )
    return goals


def clean(phase: dict[str, Any] | None) -> bool:
    """A phase whose latencies mean something: 2xx answers in its window and no error at all."""
    return phase is not None and phase["answered_2xx"] > 0 and phase["errors"] == 0 and phase["p99_ms"] is not None


def failed(phase: dict[str, Any]) -> str:
    return f"{phase['errors']} errors, {phase['answered_2xx']} 2xx"


def p99_goal(results: dict[str, Any], workload: str, concurrency: int) -> Goal:
    """aeserve's p99 against the lowest p99 of a peer's clean phase; an aeserve phase with errors misses."""
    name = f"p99 at C={concurrency} <= best peer's"
    ours = phase_at(results, "aeserve", workload, concurrency)
    theirs = [
        (phase["p99_ms"], p) for p in peers(results) if clean(phase := phase_at(results, p, workload, concurrency))
    ]
    if ours is None or not theirs:
        return Goal(name, workload, "<= peer", "n/a", "N/A")
    best, peer = min(theirs)
    if not clean(ours):
        return Goal(name, workload, "<= peer", f"{failed(ours)} vs {best:.1f} ms ({peer})", "MISS")
    value = ours["p99_ms"]
    return Goal(
        name, workload, "<= peer", f"{value:.1f} ms vs {best:.1f} ms ({peer})", check(value, value <= best), value
    )


def overhead_goal(results: dict[str, Any], workload: str) -> Goal:
    """aeserve's p50 at C=1 above the engine's batch-1 latency."""
    name, target = "p50 at C=1 - engine batch-1", f"<= {OVERHEAD_MS:g} ms"
    alone = phase_at(results, "aeserve", workload, 1)
    batch1 = results["engine"].get(workload, {}).get("batch1_ms")
    if alone is None or batch1 is None:
        return Goal(name, workload, target, "n/a", "N/A")
    if not clean(alone):
        return Goal(name, workload, target, failed(alone), "MISS")
    overhead = alone["p50_ms"] - batch1
    figure = f"{alone['p50_ms']:.2f} - {batch1:.2f} = {overhead:+.2f} ms"
    return Goal(name, workload, target, figure, check(overhead, overhead <= OVERHEAD_MS), overhead)


def service_overhead_goal(results: dict[str, Any], workload: str) -> Goal:
    """Context for `overhead_goal`: aeserve's p50 at C=1 above the harness floor's (client + loopback HTTP +
    FastAPI, no work) and the engine's batch-1 latency: what the service itself adds to a lone request."""
    name, target = "(context) p50 at C=1 - harness floor - engine batch-1", f"<= {OVERHEAD_MS:g} ms"
    alone = phase_at(results, "aeserve", workload, 1)
    floor = (results.get("floor") or {}).get(workload)
    batch1 = results["engine"].get(workload, {}).get("batch1_ms")
    if alone is None or batch1 is None or not clean(floor):
        return Goal(name, workload, target, "n/a", "N/A")
    if not clean(alone):
        return Goal(name, workload, target, failed(alone), "MISS")
    overhead = alone["p50_ms"] - floor["p50_ms"] - batch1
    figure = f"{alone['p50_ms']:.2f} - {floor['p50_ms']:.2f} - {batch1:.2f} = {overhead:+.2f} ms"
    return Goal(name, workload, target, figure, check(overhead, overhead <= OVERHEAD_MS), overhead)


def latency_goals(results: dict[str, Any], workload: str) -> list[Goal]:
    return [p99_goal(results, workload, c) for c in P99_CONCURRENCY] + [
        overhead_goal(results, workload),
        service_overhead_goal(results, workload),
    ]


def format_goal(results: dict[str, Any], workload: str) -> Goal:
    engine = results["engine"].get(workload, {})
    exported, eager = engine.get("exported_b8_items_per_s"), engine.get("eager_b8_items_per_s")
    speedup = ratio(exported, eager)
    return Goal(
        "best exported format / torch eager, batch 8",
        workload,
        f">= {FORMAT_SPEEDUP}",
        _fmt_ratio(speedup, exported, eager, " items/s", " items/s"),
        check(speedup, speedup is not None and speedup >= FORMAT_SPEEDUP),
        speedup,
    )


def chosen_format_goal(results: dict[str, Any], workload: str) -> Goal:
    """The format the export recorded as fastest (the one the service runs) is the bench's fastest at batch 8."""
    engine = results["engine"].get(workload, {})
    chosen, fastest = engine.get("manifest_format"), engine.get("fastest_b8_format")
    figure = f"manifest {chosen or 'none'}, bench fastest {fastest or 'n/a'}"
    value = None if fastest is None else float(chosen == fastest)
    return Goal("format served = fastest measured (manifest)", workload, "same", figure,
                check(value, chosen == fastest), value)


def service_goals(results: dict[str, Any]) -> list[Goal]:
    cold, rss = results.get("cold_start_s"), results.get("rss_peak_bytes")
    identical = [
        f"{server}/{w}"
        for server, entry in results["servers"].items()
        for w, figures in entry.get("workloads", {}).items()
        if not figures.get("identical", {}).get("identical")
    ]
    compared = sum(len(entry.get("workloads", {})) for entry in results["servers"].values())
    return [
        Goal(
            "cold start to /readyz 200",
            "all",
            f"<= {COLD_START_S:g} s",
            "n/a" if cold is None else f"{cold:.1f} s",
            check(cold, cold is not None and cold <= COLD_START_S),
            cold,
        ),
        Goal(
            "peak RSS, default store",
            "all",
            f"<= {RSS_BYTES / 1e9:g} GB",
            "n/a" if rss is None else f"{rss / 1e6:.0f} MB",
            check(rss, rss is not None and rss <= RSS_BYTES),
            rss,
        ),
        Goal(
            "answers identical to in-process",
            "all",
            "every server",
            "different: " + ", ".join(identical) if identical else f"{compared} of {compared}",
            check(float(compared) if compared else None, not identical),
            float(len(identical)),
        ),
    ]


def evaluate(results: dict[str, Any]) -> list[Goal]:
    goals: list[Goal] = []
    for workload in results["workloads"]:
        goals += throughput_goals(results, workload) + latency_goals(results, workload)
        goals += [format_goal(results, workload), chosen_format_goal(results, workload)]
    return goals + service_goals(results)


def _fmt_ratio(value: float | None, a: float | None, b: float | None, a_unit: str, b_unit: str) -> str:
    """'0.53 = 172.3 req/s / 327.0 items/s'; the units carry their own leading space."""
    return "n/a" if value is None else f"{value:.2f} = {a:.1f}{a_unit} / {b:.1f}{b_unit}"


def goals_table(goals: list[Goal]) -> str:
    rows = [("goal", "workload", "target", "figure", "status")] + [
        (g.goal, g.workload, g.target, g.figure, g.status) for g in goals
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    passed = sum(g.status == "PASS" for g in goals)
    return "\n".join(lines) + f"\n{passed} of {len(goals)} goals met ({sum(g.status == 'N/A' for g in goals)} N/A)"
