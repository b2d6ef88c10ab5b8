"""The Grafana dashboard and the alert rules against a live scrape of the service.

The service runs in-process over the tiny store with a fake NVML (so the GPU series exist), gets a request
of every route and op kind, and `/metrics` is scraped. Every metric name and label any dashboard query,
legend, variable or alert rule uses must be in that scrape (`up`, `job` and `instance` are added by
Prometheus); the `$op` variable must select the engine ops of each route; every panel has a unit and the
datasource variable; `promtool check metrics` accepts the scrape, `promtool check/test rules` the rules.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard_queries import (
    ALERT_TESTS,
    ALERTS,
    DASHBOARDS,
    PROMETHEUS_SERIES,
    TARGET_LABELS,
    Query,
    alert_queries,
    all_queries,
    clauses,
    dashboard_queries,
    fill_variables,
    metric_names,
    output_labels,
    problems_of,
    selectors,
    without_set_filters,
)


def test_promql_reader() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(aeserve_x_bucket{model=~".*", op="a b"}[1m])))'
            ' / on (model) group_left sum(foo_total offset 5m) and bar')
    assert metric_names(expr) == {"aeserve_x_bucket", "foo_total", "bar"}
    assert selectors(expr) == [("aeserve_x_bucket", {"model", "op"})]
    by = [c for c in clauses(expr) if c[0] == "by"]
    assert by == [("by", {"le", "model"}, '(rate(aeserve_x_bucket{model=~".*", op="a b"}[1m]))')]
    assert output_labels(expr) == {"le", "model"} and output_labels("up == 0") is None
    filtered = 'sum by (op) (rate(a[1m]) and on (op) b{r=~"x"}) or c unless (count by (j) (d) > 0)'
    assert without_set_filters(filtered) == "sum by (op) (rate(a[1m]) ) or c "
    assert output_labels('x == 1 and on (job) (count by (job) (y) > 0)') is None


# ------------------------------------------------------------------------------ the live service
def _fake_nvml() -> SimpleNamespace:
    def memory(handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * 2**30, used=(handle + 1) * 2**30, free=0)

    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetMemoryInfo=memory,
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=40 + handle, memory=10),
    )


def _png(array_hw: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array_hw).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _tiff(stack: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack, photometric="minisblack")
    return buffer.getvalue()


def _send_traffic(client) -> int:
    """A request of every route and op kind, every upload and answer format, errors and rejections; returns
    how many of the concurrent (2-sample) DDIM requests were served."""
    rng = np.random.default_rng(0)
    gray = (rng.random((16, 16)) * 255).astype(np.uint8)
    frames = rng.random((3, 1, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((2, 8)).astype(np.float32)
    ddim = {"num_samples": 2, "seed": 3, "steps": 3, "condition": {"a": 0.5, "b": -0.5}}
    ok = [
        ("/v1/models/tiny-ae/encode", {"content": _png(gray), "headers": {"Content-Type": "image/png"}}),
        ("/v1/models/tiny-ae/encode?format=npy", {"content": _npy(frames)}),
        ("/v1/models/tiny-ae/encode", {"content": _tiff(np.stack([gray, gray]))}),
        ("/v1/models/tiny-ae/decode", {"json": {"latents": latents.tolist()}}),
        ("/v1/models/tiny-ae/decode?format=npy", {"content": _npy(latents),
                                                  "headers": {"Content-Type": "application/x-npy"}}),
        ("/v1/models/tiny-render/decode", {}),
        ("/v1/models/tiny-ae/reconstruct", {"content": _npy(frames)}),
        ("/v1/models/tiny-ae/attention-map", {"content": _npy(frames[:1])}),
        ("/v1/models/tiny-ae/attention-map?format=png", {"content": _npy(frames[:2])}),
        ("/v1/models/tiny-ae/sample?format=npy", {"json": {"num_samples": 3, "seed": 1}}),
        ("/v1/models/tiny-ddim/sample?format=npy", {"json": ddim}),
    ]
    for url, kwargs in ok:
        response = client.post(url, **kwargs)
        assert response.status_code == 200, (url, response.text)
    assert client.post("/v1/models/tiny-ae/decode", json={"latents": [[1.0]]}).status_code == 422
    assert client.post("/v1/models/nope/encode", content=b"").status_code == 404
    # more concurrent requests than admission slots (max_inflight_requests=2): 429, aeserve_rejections_total
    slow, served = {**ddim, "steps": 100}, 0
    for _ in range(5):
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: client.post("/v1/models/tiny-ddim/sample", json=slow).status_code,
                                     range(6)))
        served += statuses.count(200)
        if 429 in statuses:
            break
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    return served


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, int]]:
    """/metrics before and after the traffic (the registry is the process's: other tests add to it), and
    the concurrent DDIM requests served."""
    pytest.importorskip("torch", reason="the tiny store is exported from torch modules")
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.metrics import GPU_COLLECTOR
    from tests.app.conftest import make_settings
    from tests.app.tiny_store import build_store

    store = tmp_path_factory.mktemp("dashboard_store")
    build_store(store)
    saved = GPU_COLLECTOR._nvml, GPU_COLLECTOR._started
    GPU_COLLECTOR._nvml, GPU_COLLECTOR._started = _fake_nvml(), None
    try:
        with TestClient(create_app(make_settings(store, max_inflight_requests=2))) as client:
            before = client.get("/metrics").text
            served = _send_traffic(client)
            response = client.get("/metrics")
            assert response.status_code == 200
            yield before, response.text, served
    finally:
        GPU_COLLECTOR._nvml, GPU_COLLECTOR._started = saved


@pytest.fixture(scope="module")
def scrape(scrapes: tuple[str, str, int]) -> str:
    return scrapes[1]


@pytest.fixture(scope="module")
def live_labels(scrape: str) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry (with Prometheus' target labels), from the scrape."""
    labels: dict[str, set[str]] = {name: set(extra) for name, extra in PROMETHEUS_SERIES.items()}
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            labels.setdefault(sample.name, set(TARGET_LABELS)).update(sample.labels)
    return labels


def test_every_dashboard_and_alert_query_uses_only_live_metrics_and_labels(live_labels) -> None:
    queries = all_queries()
    assert DASHBOARDS and len(queries) >= 40
    problems = [f"{q.where}: {p}" for q in queries for p in problems_of(q, live_labels)]
    assert not problems, "\n".join(problems)
    used = set().union(*(metric_names(fill_variables(q.expr)) for q in queries))
    for needed in ("aeserve_requests_in_progress", "aeserve_request_items_bucket",
                   "aeserve_codec_decode_seconds_bucket", "aeserve_codec_encode_seconds_bucket",
                   "aeserve_model_execution_provider", "aeserve_gpu_utilization_ratio",
                   "aeserve_gpu_memory_used_bytes", "process_resident_memory_bytes", "process_cpu_seconds_total",
                   "aeserve_rejections_total", "aeserve_model_ready", "aeserve_queue_wait_seconds_bucket"):
        assert needed in used and needed in live_labels, needed


def test_the_checker_catches_unknown_names_and_labels(live_labels) -> None:
    bad = [
        Query("typo", 'rate(aeserve_request_total{model="a"}[1m])'),
        Query("label", 'sum by (model) (aeserve_queue_depth{route="a"})'),
        Query("by", "sum by (status) (aeserve_queue_depth)"),
        Query("legend", "sum by (model) (aeserve_queue_depth)", {"op"}),
    ]
    found = [problems_of(q, live_labels) for q in bad]
    assert found == [["metric aeserve_request_total is not emitted"],
                     ["aeserve_queue_depth has no label 'route'"],
                     ["by (status) over ['aeserve_queue_depth']: not a label of all of them"],
                     ["shows label 'op', which the query's result does not carry"]]


def _values(text: str, sample_name: str) -> dict[frozenset, float]:
    return {frozenset(s.labels.items()): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == sample_name}


def test_live_scrape_has_the_new_metrics_with_values(scrapes: tuple[str, str, int]) -> None:
    before, after, served = scrapes
    provider = _values(after, "aeserve_model_execution_provider")
    tiny_ae = frozenset({"model": "tiny-ae", "version": "10", "provider": "CPUExecutionProvider"}.items())
    assert provider[tiny_ae] == 1
    assert {dict(k)["model"] for k in provider} == {"tiny-ae", "tiny-dyn", "tiny-render", "tiny-ddim"}
    gpu = {dict(k)["gpu"]: v for k, v in _values(after, "aeserve_gpu_utilization_ratio").items()}
    assert gpu == {"0": 0.40, "1": 0.41}
    assert _values(after, "aeserve_gpu_memory_used_bytes")[frozenset({("gpu", "1")})] == 2 * 2**30
    # items per request: frames or latent rows in, else rows out (samples), per (model, route)
    items = {}
    for key, value in _values(after, "aeserve_request_items_sum").items():
        labels = dict(key)
        gained = value - _values(before, "aeserve_request_items_sum").get(key, 0)  # versions of one model add up
        items[labels["model"], labels["op"]] = items.get((labels["model"], labels["op"]), 0) + gained
    assert {k: v for k, v in items.items() if v} == {
        ("tiny-ae", "encode"): 1 + 3 + 2, ("tiny-ae", "decode"): 2 + 2, ("tiny-render", "decode"): 1,
        ("tiny-ae", "reconstruct"): 3, ("tiny-ae", "attention-map"): 1 + 2, ("tiny-ae", "sample"): 3,
        ("tiny-ddim", "sample"): 2 + 2 * served,
    }
    assert set(_values(after, "aeserve_requests_in_progress").values()) == {0.0}  # every request ended
    def used(name: str) -> set[str]:  # formats this test's traffic timed (other tests share the registry)
        earlier = _values(before, name)
        return {dict(k)["format"] for k, v in _values(after, name).items() if v > earlier.get(k, 0)}

    decoded, encoded = used("aeserve_codec_decode_seconds_count"), used("aeserve_codec_encode_seconds_count")
    assert decoded == {"png", "tiff", "npy", "json"} and encoded == {"png", "npy", "json"}
    assert _values(after, "process_resident_memory_bytes") and _values(after, "python_info")


ENGINE_METRICS = ("aeserve_queue_wait_seconds", "aeserve_compute_duration_seconds", "aeserve_batch_size",
                  "aeserve_queue_depth")


def test_route_op_info_joins_every_route_to_the_engine_ops_it_used(scrape: str) -> None:
    """`$op` picks routes; engine panels join `aeserve_route_op_info` on `op`: every route seen must map to
    the engine queues that served it, and every engine queue seen must belong to a route."""
    families = {f.name: f for f in text_string_to_metric_families(scrape)}
    ours = {"tiny-ae", "tiny-dyn", "tiny-render", "tiny-ddim"}  # other tests' engines share the process registry

    def ops_of(*names: str) -> set[str]:
        return {s.labels["op"] for name in names for s in families[name].samples
                if s.labels.get("op") and s.labels.get("model") in ours}

    route_ops, engine_ops = ops_of("aeserve_requests"), ops_of(*ENGINE_METRICS)
    # this test's traffic at least (v2 tests in the same process add their routes to the shared registry)
    assert route_ops >= {"encode", "decode", "reconstruct", "sample", "attention-map"}
    assert engine_ops >= {"encode", "decode", "reconstruct", "attention_matrix", "saliency", "denoise"}
    info: dict[str, set[str]] = {}
    for sample in families["aeserve_route_op_info"].samples:
        assert sample.value == 1
        info.setdefault(sample.labels["route"], set()).add(sample.labels["op"])
    assert route_ops <= info.keys()
    assert engine_ops <= set().union(*info.values())
    # the table agrees with the code that submits: each capability's op, the saliency queue, the samplers' ops,
    # v2's per-op names and its `infer`
    from app.api.capabilities import CAPABILITIES
    from app.api.v2_models import OP_ORDER
    from app.diffusion import OP as DENOISE
    from app.lifespan import SALIENCY_OP

    for spec in CAPABILITIES:
        assert spec.op is None or spec.op in info[spec.name], spec.name
    assert SALIENCY_OP in info["attention-map"] and {DENOISE, "decode"} <= info["sample"]
    assert all(info[op] == {op} for op in OP_ORDER) and info["infer"] == set(OP_ORDER)
    assert info.keys() == {spec.name for spec in CAPABILITIES} | set(OP_ORDER) | {"infer"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_op_variable_selects_routes_and_engine_panels_join_their_ops(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "op"]
    assert variable["query"]["query"] == "label_values(aeserve_route_op_info, route)"
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    joined = 0
    for query in dashboard_queries(path):
        for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", query.expr):
            if name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") in ENGINE_METRICS:
                assert "$op" not in matchers, f"{query.where}: engine series filtered by route: {query.expr}"
        if "$op" in query.expr and any(m in query.expr for m in ENGINE_METRICS):
            assert 'and on (op) aeserve_route_op_info{route=~"$op"}' in query.expr, query.where
            joined += 1
    assert joined >= 7  # queue wait, compute, batch size heatmap and mean, queue depth, rejections


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_units_and_the_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"{panel['title']}: no unit"
        if panel["type"] == "timeseries":
            assert defaults["custom"]["axisLabel"], f"{panel['title']}: no axis label"
        if panel["type"] == "heatmap":
            assert panel["options"]["yAxis"]["unit"], panel["title"]


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return promtool


def test_promtool_accepts_the_live_scrape(scrape: str) -> None:
    check = subprocess.run([_promtool(), "check", "metrics"], input=scrape, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_promtool_checks_and_tests_the_alert_rules() -> None:
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr
    tested = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True,
                            timeout=60)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    alerts = {q.where.split(": ")[1] for q in alert_queries()}
    assert {"AeserveHighErrorRatio", "AeserveLatencyP99High", "AeserveQueueFull", "AeserveModelNotReady"} <= alerts
    tested_alerts = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert tested_alerts == alerts
