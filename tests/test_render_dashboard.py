"""deploy.render_dashboard: Grafana variable substitution, panel choice, legends and axis units without
Prometheus; and (slow) a short real run against the tiny store, where every chosen panel must have data."""

from __future__ import annotations

import asyncio
import io
import json
import random
import shutil
from pathlib import Path

import httpx
import pytest

from deploy.dashboard_plot import axis_scale
from deploy.dashboard_traffic import BAD_EVERY, Call, bad_calls, drive, image_for, model_calls, sample_request
from deploy.render_dashboard import (
    DASHBOARD,
    all_panels,
    choose_panels,
    dashboard_variables,
    duration_s,
    legend,
    metric_names,
    prometheus_config,
    substitute,
)

VARIABLES = {"model": ".*", "op": "encode|decode", "__rate_interval": "5s", "datasource": "prometheus"}


def test_substitute_replaces_every_grafana_variable_syntax() -> None:
    expr = 'rate(x{model=~"$model", op=~"${op}", o=~"${op:regex}", m=~"[[model]]"}[$__rate_interval])'
    assert substitute(expr, VARIABLES) == 'rate(x{model=~".*", op=~"encode|decode", o=~"encode|decode", m=~".*"}[5s])'
    assert substitute("${datasource}", VARIABLES) == "prometheus"
    assert substitute("$modelx", {**VARIABLES, "modelx": "y"}) == "y"  # the longest name, not $model + "x"
    with pytest.raises(KeyError, match=r"\$nope"):
        substitute("up{a=~'$nope'}", VARIABLES)


def test_dashboard_variables_are_all_and_fill_every_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = dashboard_variables(dashboard, rate_interval="4s", interval="1s")
    assert variables == {"__rate_interval": "4s", "__interval": "1s", "datasource": "prometheus",
                         "model": ".*", "op": ".*"}
    exprs = [substitute(t["expr"], variables) for p in all_panels(dashboard) for t in p.get("targets", [])]
    assert len(exprs) >= 30 and not [e for e in exprs if "$" in e or "[[" in e]
    assert 'aeserve_request_duration_seconds_bucket{model=~".*", op=~".*"}[4s]' in "".join(exprs)


def test_metric_names_and_panel_choice() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model, op) (rate(aeserve_queue_wait_seconds_bucket{model=~"a_b"}'
            '[5s]) and on (op) aeserve_route_op_info{route=~"x"}))'
            ' / on (job) group_left max(process_cpu_seconds_total)')
    assert metric_names(expr) == {"aeserve_queue_wait_seconds_bucket", "aeserve_route_op_info",
                                  "process_cpu_seconds_total"}
    dashboard = json.loads(DASHBOARD.read_text())
    every = set().union(*(metric_names(t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])))
    without_gpu = {name for name in every if "_gpu_" not in name}
    chosen, left_out = choose_panels(dashboard, without_gpu)
    titles = [p["title"] for p in chosen]
    assert len(chosen) >= 8 and all(p["type"] == "timeseries" for p in chosen)
    assert left_out == {"GPU utilisation": "not in Prometheus: aeserve_gpu_utilization_ratio",
                        "GPU memory": "not in Prometheus: aeserve_gpu_memory_total_bytes, "
                                      "aeserve_gpu_memory_used_bytes"}
    for needed in ("Request rate by status", "Work shed (429) by reason", "Process memory"):
        assert needed in titles
    assert len(choose_panels(dashboard, every)[0]) == len(chosen) + 2


def test_legend_units_and_durations() -> None:
    labels = {"model": "stem-ae", "op": "encode", "__name__": "x"}
    assert legend("p99 {{model}} {{ op }} {{missing}}", labels) == "p99 stem-ae encode"
    assert legend("", labels) == '{model="stem-ae", op="encode"}'
    assert axis_scale("s", 0.25) == (1e-3, " ms") and axis_scale("s", 3e-5) == (1e-6, " µs")
    assert axis_scale("bytes", 300 * 2**20) == (2**20, " MiB") and axis_scale("percentunit", 0.4) == (0.01, "%")
    assert axis_scale("reqps", 40) == (1.0, "") and axis_scale("short", 0) == (1.0, "")
    assert axis_scale("short", 2.5e6) == (1e6, "M") and axis_scale("ms", 2500) == (1e3, " s")
    assert duration_s("1m30s") == 90 and duration_s("500ms") == 0.5
    with pytest.raises(ValueError, match="duration"):
        duration_s("5 s")


def test_prometheus_config_scrapes_the_service_every_second() -> None:
    config = prometheus_config("127.0.0.1:1234")
    assert config["global"]["scrape_interval"] == "1s"
    assert [job["static_configs"][0]["targets"] for job in config["scrape_configs"]] == [["127.0.0.1:1234"]]
    assert all(Path(rules).is_file() for rules in config["rule_files"])


def test_traffic_plan_from_model_details() -> None:
    stem = {"name": "stem-ae", "family": "stem-autoencoder", "capabilities": ["encode", "decode", "reconstruct"],
            "preprocessing": {"channels": 1, "input_size": [64, 64], "resize": "bilinear"},
            "ops": {"decode": {"inputs": [{"shape": [-1, 32]}]}}}
    calls = model_calls(stem, random.Random(0))
    assert {c.label for c in calls} == {"encode stem-ae 1 image", "encode stem-ae 4 images",
                                        "reconstruct stem-ae 1 image", "reconstruct stem-ae 4 images",
                                        "decode stem-ae 1 latents", "decode stem-ae 4 latents"}
    assert all(c.params == {"intensity": "scaled"} for c in calls if "decode" not in c.label)
    assert [len(row) for row in next(c for c in calls if "4 latents" in c.label).json["latents"]] == [32] * 4
    fixed = {"family": "x", "preprocessing": {"channels": 3, "input_size": [16, 24], "resize": "none"}}
    from PIL import Image

    png, params = image_for(fixed)
    assert Image.open(io.BytesIO(png)).size == (24, 16) and params == {}
    ddim = {"sampler": {"kind": "ddim", "max_steps": 6, "condition_keys": ["a", "b"],
                        "condition_values": {"a": ["low", "high"], "b": {"calm": -0.5}}}}
    assert sample_request(ddim) == {"num_samples": 2, "seed": 0, "steps": 6, "condition": {"a": "low", "b": "calm"}}
    assert {c.label for c in bad_calls([stem])} == {"bad unknown model", "bad decode stem-ae", "bad encode stem-ae"}


def test_drive_changes_concurrency_sends_every_bad_kind_and_backs_off_after_429() -> None:
    in_flight, peaks = [0], []

    async def answer(request: httpx.Request) -> httpx.Response:
        in_flight[0] += 1
        peaks.append((request.url.path, in_flight[0]))
        await asyncio.sleep(0.005)
        in_flight[0] -= 1
        status = {"/shed": 429, "/bad1": 422, "/bad2": 404}.get(request.url.path, 200)
        return httpx.Response(status, headers={"Retry-After": "1"} if status == 429 else {})

    bad = [Call("bad one", "/bad1"), Call("bad two", "/bad2")]
    tally = asyncio.run(drive("http://service", [Call("ok", "/ok")], bad, seconds=1.0, phases=(1, 5),
                              transport=httpx.MockTransport(answer)))
    first_phase = peaks[: len(peaks) // 10]
    assert max(n for _, n in first_phase) == 1 and max(n for _, n in peaks) == 5
    calls = sum(tally.statuses.values())
    assert tally.by_call["bad one"]["422"] + tally.by_call["bad two"]["404"] == calls // BAD_EVERY
    assert abs(tally.by_call["bad one"]["422"] - tally.by_call["bad two"]["404"]) <= 1
    shed = asyncio.run(drive("http://service", [Call("shed", "/shed")], [], seconds=0.6, phases=(3,),
                             transport=httpx.MockTransport(answer)))
    assert 3 <= shed.statuses["429"] <= 6  # each 429 keeps its client away for 0.5-1 s (Retry-After: 1)


@pytest.mark.slow
def test_a_short_run_against_the_tiny_store_has_data_in_every_chosen_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    pytest.importorskip("torch", reason="the tiny store is exported from torch modules")
    from PIL import Image

    from deploy.render_dashboard import main
    from tests.app.tiny_store import build_store

    build_store(tmp_path / "store")
    monkeypatch.setenv("AESERVE_WARMUP", "false")
    out = tmp_path / "dashboard.png"
    report = main(["--store", str(tmp_path / "store"), "--out", str(out), "--seconds", "15"])

    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(report))
    panels = {panel["title"]: panel for panel in report["panels"]}
    assert len(panels) >= 8
    empty = [title for title, panel in panels.items() if panel["non_empty_series"] < 1]
    assert not empty, empty
    for target in (t for p in panels.values() for t in p["targets"]):
        assert target["series_count"] == len(target["series"]) >= target["non_empty_series"]
        assert target["non_empty_series"] == sum(s["peak"] is not None for s in target["series"])
    assert set(report["left_out"]) <= {"GPU utilisation", "GPU memory"}
    statuses = report["traffic"]["statuses"]
    assert statuses["200"] > 100 and statuses["429"] > 0 and statuses["422"] > 0 and statuses["404"] > 0
    assert set(statuses) <= {"200", "404", "422", "429"}, statuses
    shed = {s["legend"] for t in panels["Work shed (429) by reason"]["targets"] for s in t["series"] if s["peak"]}
    assert any(legend.startswith("inflight_limit") for legend in shed), shed
    with Image.open(out) as image:
        assert image.width >= 1000 and image.height >= 600
    assert out.stat().st_size < 300_000
    for url in (report["service"], report["prometheus"]):  # both processes were stopped
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
