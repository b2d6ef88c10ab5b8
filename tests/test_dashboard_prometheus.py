"""Every dashboard panel's query, evaluated by a real Prometheus scraping a real service process after traffic.

Where Prometheus is installed (Debian `prometheus`), the service runs over the tiny store with a fake NVML
(one GPU), gets two waves of traffic of every route, and each panel target is evaluated with `$op` set to
All and to each route: all are valid PromQL; under All every target has series; under a route the request
panels and the engine panels (joined on `aeserve_route_op_info`) have data, so picking a route never
empties the batching panels.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.dashboard_queries import DASHBOARDS, Query, dashboard_queries
from tests.test_dashboard_metrics import _send_traffic

ROUTES = ("encode", "decode", "reconstruct", "sample", "attention-map")
FAKE_NVML = """
import types
import app.metrics
app.metrics.GPU_COLLECTOR._nvml = types.SimpleNamespace(
    nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda index: index,
    nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=8e10, used=1e9, free=0),
    nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=40, memory=1))
"""


def _fill(expr: str, op: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$op", op)


class PrometheusApi:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(f"{self.url}/query", params={"query": expr}, timeout=30).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def total(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(self, expr: str, above: float, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        while (value := self.total(expr)) <= above:
            assert time.monotonic() < deadline, f"Prometheus never saw {expr} > {above}"
            time.sleep(0.5)
        return value


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, target: str):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    from tests.app.service_process import free_port

    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "aeserve", "static_configs": [{"targets": [target]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={address}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = PrometheusApi(f"http://{address}/api/v1")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, AssertionError):
                if api.total('up{job="aeserve"}') == 1:
                    break
            assert time.monotonic() < deadline and process.poll() is None, "Prometheus never scraped the service"
            time.sleep(0.5)
        yield api
    finally:
        process.terminate()
        process.wait(timeout=30)


def _has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


@pytest.mark.slow
def test_every_panel_query_has_data_in_prometheus_for_all_ops_and_each_route(tmp_path: Path) -> None:
    from tests.app.service_process import running_service
    from tests.app.tiny_store import build_store

    build_store(tmp_path / "store")
    env = {"AESERVE_MAX_INFLIGHT_REQUESTS": "2", "AESERVE_MAX_FRAMES": "16", "AESERVE_MAX_NUM_SAMPLES": "8"}
    with running_service(tmp_path / "store", tmp_path, env=env, prelude=FAKE_NVML) as service:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/readyz").status_code == 200, what="/readyz")
        with running_prometheus(tmp_path, service.base_url.removeprefix("http://")) as api, service.client() as client:
            seen = 0.0
            for _ in range(2):  # two waves, so every rate has two different points
                _send_traffic(client)
                seen = api.wait_for("sum(aeserve_requests_total)", above=seen)
                time.sleep(2.5)  # more scrapes after the wave
            targets = [q for path in DASHBOARDS for q in dashboard_queries(path) if "variable" not in q.where]
            empty_under_all = [q.where for q in targets if not api.query(_fill(q.expr, ".*"))]
            assert not empty_under_all, empty_under_all
            for route in ROUTES:
                missing = [q.where for q in targets
                           if _route_panel(q) and not _has_data(api.query(_fill(q.expr, route)))]
                assert not missing, f"$op={route} leaves these empty: {missing}"


def _route_panel(query: Query) -> bool:
    """The targets that must have data for any route with traffic: request latency and rate, and the engine
    panels that join `aeserve_route_op_info`."""
    request = "aeserve_request_duration_seconds_bucket" in query.expr or "aeserve_requests_total" in query.expr
    return request or ("aeserve_route_op_info" in query.expr and "rejections" not in query.expr)
