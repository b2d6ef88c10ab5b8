"""Checks of the deployment files without a Docker engine.

Compose: every compose file (alone, with the GPU override, with APP_TARGET=slim) has well-formed services,
volumes, dependencies, health checks and AESERVE_* settings the service knows; the one-shot `store` service
runs the real `build-store` command line offline into the volume `aeserve` mounts read-only and waits for.
The images (Dockerfile, Dockerfile.gpu) are checked by tests/test_images.py. Prometheus loads the alert
rules compose mounts and scrapes the service port; the Grafana dashboard's PromQL refers only to metrics
that app/metrics.py declares. promtool runs where it is installed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from app.metrics import REGISTRY, GpuCollector
from app.settings import Settings
from tests.container_files import Dockerfile, compose_config, parse_volume

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "aeserve.json"
SERVICE_PORT = 8000
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
DOCKERFILES = {"cpu": REPO / "Dockerfile", "gpu": REPO / "Dockerfile.gpu"}
HEALTH_URL = f"http://127.0.0.1:{SERVICE_PORT}/readyz"
IMAGE_UID = "10001"

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


def _compose(*overrides: Path, **env: str) -> dict:
    return compose_config(COMPOSE, *overrides, env=env)


def _prometheus() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus.yml").read_text())


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


class _OneGpuNvml:
    """NVML with one GPU, so the GPU collector yields the families it yields on a GPU machine."""

    nvmlInit = staticmethod(lambda: None)
    nvmlDeviceGetCount = staticmethod(lambda: 1)
    nvmlDeviceGetHandleByIndex = staticmethod(lambda index: index)
    nvmlDeviceGetMemoryInfo = staticmethod(lambda handle: SimpleNamespace(used=1.0, total=2.0))
    nvmlDeviceGetUtilizationRates = staticmethod(lambda handle: SimpleNamespace(gpu=50))


def _declared_series() -> set[str]:
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *GpuCollector(_OneGpuNvml()).collect()]:  # type: ignore[arg-type]
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


def test_prometheus_scrapes_the_service_port() -> None:
    config = _prometheus()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["aeserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert f"aeserve:{SERVICE_PORT}" in targets
    assert "aeserve" in _compose()["services"]
    # Without Docker (deploy/prometheus.local.yml): the same configuration, the service on this machine.
    local = yaml.safe_load((DEPLOY / "prometheus.local.yml").read_text())
    assert _with_aeserve_target(local, f"aeserve:{SERVICE_PORT}") == config
    assert _aeserve_targets(local) == [f"127.0.0.1:{SERVICE_PORT}"]


def _aeserve_targets(config: dict) -> list[str]:
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "aeserve"]
    return [target for static in job["static_configs"] for target in static["targets"]]


def _with_aeserve_target(config: dict, target: str) -> dict:
    config = json.loads(json.dumps(config))
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "aeserve"]
    for static in job["static_configs"]:
        static["targets"] = [target]
    return config


@pytest.mark.slow
def test_prometheus_without_docker_scrapes_a_live_service_and_loads_the_alerts(tmp_path: Path) -> None:
    """The no-Docker path: Debian's `prometheus` with deploy/prometheus.local.yml, the service on this machine."""
    from tests.app.service_process import free_port, running_service
    from tests.app.tiny_store import build_tiny_render

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    build_tiny_render(tmp_path / "store")
    with running_service(tmp_path / "store", tmp_path) as service:
        config = _with_aeserve_target(yaml.safe_load((DEPLOY / "prometheus.local.yml").read_text()),
                                      service.base_url.removeprefix("http://"))
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        for rule_file in config["rule_files"]:
            shutil.copy(DEPLOY / rule_file, tmp_path / rule_file)
        api = f"http://127.0.0.1:{free_port()}/api/v1"
        process = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={api.removeprefix('http://').removesuffix('/api/v1')}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:  # the first scrape comes within one scrape_interval (5 s) of the start
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):  # starting: 503, not JSON
                    query = httpx.get(f"{api}/query", params={"query": 'aeserve_model_ready{job="aeserve"}'}).json()
                    if query["data"]["result"]:
                        break
                assert time.monotonic() < deadline and process.poll() is None, "Prometheus never scraped the service"
                time.sleep(0.5)
            (series,) = query["data"]["result"]
            assert series["metric"]["model"] == "tiny-render" and series["metric"]["service"] == "aeserve"
            groups = httpx.get(f"{api}/rules").json()["data"]["groups"]
            alerts = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
            assert sum(len(g["rules"]) for g in groups) == sum(len(g["rules"]) for g in alerts["groups"]) > 0
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/aeserve.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in _compose()["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == path
    dashboard = _dashboard()
    # Panels name the provisioned datasource, or a datasource variable whose choices are of its type.
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    for uid in {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"}:
        variable = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
        if variable:
            choice = variables[variable.group(1) or variable.group(2)]
            assert choice["type"] == "datasource" and choice["query"] == source["type"], uid
        else:
            assert uid == source["uid"]


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



# --- compose ---------------------------------------------------------------------------------------------

_TOP_LEVEL = {"name", "services", "volumes", "networks", "configs", "secrets"}
_SERVICE_KEYS = {
    "build", "image", "command", "environment", "volumes", "ports", "depends_on", "healthcheck", "restart",
    "deploy", "network_mode", "profiles", "cap_drop", "security_opt", "read_only", "tmpfs", "user",
}
_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_DURATION = re.compile(r"(\d+(ms|s|m|h))+")


def _configs() -> dict[str, dict]:
    # ids without the word `gpu`: tests/conftest.py skips tests carrying that keyword on machines without one
    return {"cpu": _compose(), "nvidia": _compose(COMPOSE_GPU), "cpu-slim": _compose(APP_TARGET="slim"),
            "nvidia-slim": _compose(COMPOSE_GPU, APP_TARGET="slim")}


def _check_service(name: str, service: dict, config: dict) -> None:
    assert set(service) <= _SERVICE_KEYS, f"{name}: unexpected keys {set(service) - _SERVICE_KEYS}"
    assert "image" in service or "build" in service, name
    if "build" in service:
        build = service["build"]
        dockerfile = REPO / build["context"] / build["dockerfile"]
        assert build["target"] in {s.name for s in Dockerfile(dockerfile).stages}, (name, build)
    for dependency, spec in service.get("depends_on", {}).items():
        assert dependency in config["services"] and spec["condition"] in _CONDITIONS, (name, dependency)
    for entry in service.get("volumes", []):
        source, target, mode = parse_volume(entry)
        assert target.startswith("/") and mode in {"ro", "rw"}, (name, entry)
        if source.startswith("./"):
            assert (REPO / source).exists(), (name, source)
        else:
            assert source in (config.get("volumes") or {}), f"{name}: volume {source} is not declared"
    health = service.get("healthcheck", {})
    if not health.get("disable"):
        assert not health or health["test"][0] in {"CMD", "CMD-SHELL"}, name
        for key in ("interval", "timeout", "start_period"):
            assert key not in health or _DURATION.fullmatch(health[key]), (name, key)
    assert all(re.fullmatch(r"\d+:\d+", str(p)) for p in service.get("ports", [])), name
    assert all(isinstance(p, str) for p in service.get("profiles", [])), name
    assert service.get("restart", "no") in {"no", "always", "on-failure", "unless-stopped"}, name


@pytest.mark.parametrize("variant", ["cpu", "nvidia", "cpu-slim", "nvidia-slim"])
def test_compose_configs_are_well_formed(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _configs()[variant]
    assert set(config) <= _TOP_LEVEL
    assert {"store", "aeserve", "prometheus", "grafana"} <= config["services"].keys()
    for name, service in config["services"].items():
        _check_service(name, service, config)
    # The service's settings: known AESERVE_* names with values its Settings accept.
    environment = config["services"]["aeserve"]["environment"]
    unknown = {k for k in environment if k.removeprefix("AESERVE_").lower() not in Settings.model_fields}
    assert not unknown and all(k.startswith("AESERVE_") for k in environment), unknown
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert str(settings.store) == environment["AESERVE_STORE"] == "/models"
    assert f"{SERVICE_PORT}:{SERVICE_PORT}" in config["services"]["aeserve"]["ports"]
    assert HEALTH_URL in " ".join(config["services"]["aeserve"]["healthcheck"]["test"])  # ready, not just alive


def test_every_compose_file_is_checked() -> None:
    assert set(REPO.glob("docker-compose*.y*ml")) == {COMPOSE, COMPOSE_GPU}


def test_store_service_builds_the_default_store_offline_before_the_service_starts() -> None:
    from training.__main__ import build_parser

    config = _compose()
    store, service = config["services"]["store"], config["services"]["aeserve"]
    command = store["command"]
    assert command[:3] == ["python", "-m", "training"]
    args = build_parser().parse_args(command[3:])  # the real command line, parsed by the real parser
    assert args.command == "build-store" and args.if_missing and args.store == "/models"
    # It reads the recipes the full image copies from the repository, and the data shipped in it: no network.
    full = Dockerfile(DOCKERFILES["cpu"]).stage(store["build"]["target"])
    copies = {words[-1].rstrip("/"): words[0] for words in (shlex.split(i.args) for i in full.all("COPY"))}
    assert copies[args.recipes] == "model_store/recipes" and list((REPO / "model_store/recipes").glob("*.yaml"))
    assert store["network_mode"] == "none" and store["restart"] == "no" and store["healthcheck"] == {"disable": True}
    # Into a named volume, read-write; the service mounts it read-only where AESERVE_STORE points and waits.
    (mount,) = [parse_volume(v) for v in store["volumes"]]
    volume, target, mode = mount
    assert target == args.store and mode == "rw" and volume in config["volumes"]
    assert (volume, service["environment"]["AESERVE_STORE"], "ro") in [parse_volume(v) for v in service["volumes"]]
    assert service["depends_on"]["store"] == {"condition": "service_completed_successfully"}
    # The volume starts out owned by the image's (non-root) user, who then writes the store into it.
    assert any(f"chown {IMAGE_UID}:{IMAGE_UID} {args.store}" in i.args for i in full.all("RUN"))
    assert full.last("USER").args.split(":")[0] == IMAGE_UID


def test_the_default_stack_needs_no_gpu_and_the_override_adds_one(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = _compose(), _compose(COMPOSE_GPU)
    assert "nvidia" not in yaml.safe_dump(cpu)
    assert cpu["services"]["aeserve"]["build"] == {"context": ".", "dockerfile": "Dockerfile", "target": "full"}
    service = gpu["services"]["aeserve"]
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile.gpu", "target": "full"}
    assert service["image"] == "aeserve:gpu-full"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    monkeypatch.setenv("AESERVE_DEVICE", service["environment"]["AESERVE_DEVICE"])
    assert Settings().device == "cuda"  # a model that cannot run on the GPU fails instead of using the CPU
    # Everything else is the CPU stack's: the same store (built on the CPU image), volume and dependencies.
    assert gpu["services"]["store"] == cpu["services"]["store"]
    for key in ("volumes", "depends_on", "ports", "healthcheck"):
        assert service[key] == cpu["services"]["aeserve"][key], key
    slim = _compose(COMPOSE_GPU, APP_TARGET="slim")["services"]["aeserve"]
    assert slim["build"]["target"] == "slim" and slim["image"] == "aeserve:gpu-slim"
    assert _compose(APP_TARGET="slim")["services"]["store"]["build"]["target"] == "full"


def test_prometheus_loads_the_alert_rules_compose_mounts() -> None:
    rule_files = _prometheus()["rule_files"]
    mounts = {parse_volume(v)[1]: parse_volume(v)[0] for v in _compose()["services"]["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    for rule_file in rule_files:  # relative to the configuration file, in the repository and the container
        assert (DEPLOY / rule_file).is_file(), rule_file
        assert mounts[f"/etc/prometheus/{rule_file}"] == f"./deploy/{rule_file}"
    graf_mounts = {parse_volume(v)[0]: parse_volume(v)[1] for v in _compose()["services"]["grafana"]["volumes"]}
    assert graf_mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
