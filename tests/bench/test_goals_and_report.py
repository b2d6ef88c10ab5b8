"""The goals of issue 8 are judged right from a results document, and that document keeps its schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench.goals import evaluate, goals_table
from bench.report import SCHEMA, figures_table, validate, write


def phase(concurrency: int, rate: float, p50: float, p99: float) -> dict[str, Any]:
    return {"concurrency": concurrency, "rate": rate, "p50_ms": p50, "p99_ms": p99, "errors": 0,
            "answered_2xx": int(rate), "seconds": 1.0}


def served(rates: tuple[float, ...], p50_at_1: float, p99: float, identical: bool = True) -> dict[str, Any]:
    phases = [phase(c, r, p50_at_1 if c == 1 else 10.0, p99) for c, r in zip((1, 8, 32, 64), rates, strict=True)]
    return {"identical": {"identical": identical}, "phases": phases}


def results() -> dict[str, Any]:
    """light: aeserve 700 req/s vs ceiling 1000 and best peer 400 (0.7, 1.75); p99 8 ms vs plain 9 and triton 7."""
    engine = {"items_per_s": 1000.0, "batch1_ms": 1.0, "best": {"label": "onnx 2x1t b8"}, "measurements": [],
              "eager_b8_items_per_s": 100.0, "exported_b8_items_per_s": 200.0,
              "fastest_b8_format": "onnx", "manifest_format": "onnx"}
    return {
        "schema": SCHEMA, "created": "2025-01-01T00:00:00+00:00", "machine": {"cores": 2},
        "settings": {"concurrency": [1, 8, 32, 64], "quick": True},
        "workloads": {"light": {"model": "conv-decoder-vae", "op": "decode", "request": "npy", "answer": "png"}},
        "engine": {"light": engine},
        "servers": {
            "aeserve": {"ready_s": 4.0, "workloads": {"light": served((500, 600, 700, 650), 1.5, 8.0)}},
            "plain": {"ready_s": 1.0, "workloads": {"light": served((300, 400, 350, 300), 1.2, 9.0)}},
            "triton": {"ready_s": 9.0, "workloads": {"light": served((200, 300, 350, 380), 2.0, 7.0)}},
        },
        "skipped": {"litserve": "not installed"}, "cold_start_s": 4.0, "rss_peak_bytes": 10**9, "diffusion": None,
        "goals": [],
    }


def by_goal(doc: dict[str, Any]) -> dict[str, str]:
    return {g.goal: g.status for g in evaluate(doc)}


def test_goals_pass_miss_and_their_figures() -> None:
    doc = results()
    goals = {g.goal: g for g in evaluate(doc)}
    assert goals["served / engine ceiling"].status == "PASS" and goals["served / engine ceiling"].value == 0.7
    peer = goals["served / best peer req/s"]
    assert peer.status == "PASS" and peer.value == 700 / 400 and "(plain)" in peer.figure  # light needs 1.5x: 1.75
    assert goals["p99 at C=8 <= best peer's"].status == "MISS"  # triton's 7 ms is the best peer p99
    assert "(triton)" in goals["p99 at C=8 <= best peer's"].figure
    assert goals["p50 at C=1 - engine batch-1"].status == "PASS"  # 1.5 - 1.0 = 0.5 ms
    assert goals["best exported format / torch eager, batch 8"].value == 2.0
    assert goals["format served = fastest measured (manifest)"].status == "PASS"
    doc["engine"]["light"]["manifest_format"] = "aoti"
    chosen = {g.goal: g for g in evaluate(doc)}["format served = fastest measured (manifest)"]
    assert chosen.status == "MISS" and chosen.figure == "manifest aoti, bench fastest onnx"
    assert goals["cold start to /readyz 200"].status == "PASS" and goals["peak RSS, default store"].status == "PASS"
    assert goals["answers identical to in-process"].status == "PASS"
    context = "(context) served / in-process decode+run+encode"
    assert goals[context].status == "N/A"  # no codec ceiling measured: never a pass
    doc["engine"]["light"]["with_codecs"] = {"items_per_s": 800.0}
    coded = {g.goal: g for g in evaluate(doc)}[context]
    assert coded.status == "PASS" and coded.value == 700 / 800 and "800.0 items/s" in coded.figure


def test_thresholds_are_the_issue_s() -> None:
    doc = results()
    doc["servers"]["aeserve"]["workloads"]["light"]["phases"][2]["rate"] = 500.0  # best is now 650: 0.65 >= 0.6
    doc["servers"]["aeserve"]["workloads"]["light"]["phases"][0]["p50_ms"] = 2.01
    doc["cold_start_s"], doc["rss_peak_bytes"] = 10.5, 1_600_000_000
    status = by_goal(doc)
    assert status["served / engine ceiling"] == "PASS"
    assert status["served / best peer req/s"] == "PASS"  # 650 / 400 = 1.625
    assert status["p50 at C=1 - engine batch-1"] == "MISS"
    assert status["cold start to /readyz 200"] == "MISS" and status["peak RSS, default store"] == "MISS"
    doc["servers"]["aeserve"]["workloads"]["light"]["phases"][3]["rate"] = 500.0  # 600 / 1000 = 0.6: still met
    status = by_goal(doc)
    assert status["served / engine ceiling"] == "PASS"
    assert status["served / best peer req/s"] == "PASS"  # 600 / 400 = 1.5: still met
    doc["servers"]["aeserve"]["workloads"]["light"]["phases"][1]["rate"] = 590.0
    status = by_goal(doc)
    assert status["served / engine ceiling"] == "MISS" and status["served / best peer req/s"] == "MISS"


def test_missing_figures_are_not_a_pass() -> None:
    doc = results()
    del doc["servers"]["plain"], doc["servers"]["triton"]
    doc["engine"]["light"]["eager_b8_items_per_s"] = None
    doc["servers"]["aeserve"]["workloads"]["light"]["identical"] = {"identical": False, "error": "HTTP 500"}
    status = by_goal(doc)
    assert status["served / best peer req/s"] == "N/A"
    assert status["p99 at C=8 <= best peer's"] == "N/A" and status["p99 at C=32 <= best peer's"] == "N/A"
    assert status["best exported format / torch eager, batch 8"] == "N/A"
    assert status["answers identical to in-process"] == "MISS"
    assert "N/A" in goals_table(evaluate(doc))


def test_results_document_schema(tmp_path: Path) -> None:
    doc = results()
    doc["goals"] = [g.to_json() for g in evaluate(doc)]
    assert validate(doc) == []
    path = write(doc, tmp_path / "results" / "latest.json")
    assert json.loads(path.read_text())["goals"] == doc["goals"]
    broken = copy.deepcopy(doc)
    del broken["servers"]["aeserve"]["workloads"]["light"]["phases"][0]["p99_ms"]
    broken["goals"][0]["status"] = "OK"
    del broken["cold_start_s"]
    assert validate(broken) == ["cold_start_s: missing"]
    broken["cold_start_s"] = 1.0
    problems = validate(broken)
    assert any("phases: missing ['p99_ms']" in p for p in problems) and any(p.startswith("goals[0]") for p in problems)
    with pytest.raises(ValueError, match="schema"):
        write(broken, tmp_path / "bad.json")


def test_figures_table_names_every_server_and_skipped_peer() -> None:
    table = figures_table(results())
    assert "engine ceiling 1000.0 items/s (onnx 2x1t b8)" in table
    assert all(name in table for name in ("aeserve", "plain", "triton"))
    assert "peer litserve not run: not installed" in table


def test_phases_with_errors_do_not_pass_latency_goals() -> None:
    doc = results()
    ours = doc["servers"]["aeserve"]["workloads"]["light"]["phases"]
    ours[1].update(errors=40, p99_ms=1.0)  # fast 503s are not a good p99
    ours[0].update(answered_2xx=0, rate=0.0, p50_ms=None, p99_ms=None)
    doc["servers"]["triton"]["workloads"]["light"]["phases"][2]["errors"] = 3  # triton's 7 ms at C=32 is out
    goals = {g.goal: g for g in evaluate(doc)}
    at_8 = goals["p99 at C=8 <= best peer's"]
    assert at_8.status == "MISS" and "40 errors" in at_8.figure
    assert goals["p50 at C=1 - engine batch-1"].status == "MISS"
    at_32 = goals["p99 at C=32 <= best peer's"]
    assert at_32.status == "PASS" and "(plain)" in at_32.figure  # 8 ms vs plain's 9 ms


def test_results_document_is_strict_json(tmp_path: Path) -> None:
    doc = results()
    doc["engine"]["light"]["batch1_ms"] = float("nan")
    doc["goals"] = [g.to_json() for g in evaluate(doc)]
    text = write(doc, tmp_path / "latest.json").read_text()
    assert json.loads(text)["engine"]["light"]["batch1_ms"] is None and "NaN" not in text


def test_the_harness_floor_separates_what_the_service_adds_at_one_client() -> None:
    """p50 at C=1 is 1.5 ms over an engine batch-1 of 1.0 ms; a floor of 0.3 ms (client + HTTP, no work) leaves
    0.2 ms to the service; without a clean floor phase the context row is N/A, never a pass."""
    doc = results()
    name = "(context) p50 at C=1 - harness floor - engine batch-1"
    assert by_goal(doc)[name] == "N/A"
    doc["floor"] = {"light": phase(1, 900.0, 0.3, 0.5)}
    row = {g.goal: g for g in evaluate(doc)}[name]
    assert row.status == "PASS" and row.value == pytest.approx(0.2) and row.figure == "1.50 - 0.30 - 1.00 = +0.20 ms"
    doc["servers"]["aeserve"]["workloads"]["light"]["phases"][0]["p50_ms"] = 3.0
    assert by_goal(doc)[name] == "MISS"  # 3.0 - 0.3 - 1.0 = 1.7 ms
    doc["floor"]["light"]["errors"] = 2
    assert by_goal(doc)[name] == "N/A"
    floor_row = next(line for line in figures_table(doc).splitlines() if "(floor)" in line)
    assert floor_row.split()[1:3] == ["900.0", "-"] and "0.3" in floor_row.split()
