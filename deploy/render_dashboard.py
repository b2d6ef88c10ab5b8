"""Render the Grafana dashboard's time-series panels from a live scrape into one PNG (no Grafana needed).

    python -m deploy.render_dashboard --store model_store --out docs/dashboard.png

starts the service over `--store` on a free port (or uses `--url`) and a Prometheus scraping it every second
(Debian's `prometheus`; or uses `--prometheus`), drives `--seconds` of mixed traffic
(`deploy.dashboard_traffic`), then evaluates each chosen panel's targets of
`deploy/grafana/dashboards/aeserve.json` with `/api/v1/query_range` over the traffic window (`$model`,
`$op` = All, `$__rate_interval` as Grafana computes it, at least 10 s) and plots them with matplotlib: the
panel's title, its unit on the y axis, a legend from `legendFormat`. Next to the PNG, a JSON says what each
query returned.
A panel is chosen when it is a time series and every metric it reads exists in Prometheus (GPU panels drop
out on a host without a GPU); the JSON names the panels left out and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "aeserve.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.local.yml"
# The service started here admits few requests at once, so a burst of clients is shed (429).
SERVICE_DEFAULTS = {"AESERVE_MAX_INFLIGHT_REQUESTS": "6"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_NOT_METRICS = {"group_left", "group_right"}
# Grafana's $__rate_interval is max(4 x scrape, step + scrape); at least this, so that the series of a model
# and op served a few times a second (a CPU run) draw lines rather than dots.
MIN_RATE_INTERVAL_S = 10.0


# ------------------------------------------------------------------------------ the dashboard
def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Grafana's `$name`, `${name}`, `${name:format}` and `[[name]]` replaced by `variables[name]`."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value (known: {sorted(variables)})")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def dashboard_variables(dashboard: dict[str, Any], rate_interval: str, interval: str) -> dict[str, str]:
    """Every templating variable at "All" (its allValue, else `.*`) or its current value, the datasource as
    `prometheus`, plus Grafana's `__rate_interval` and `__interval`."""
    variables = {"__rate_interval": rate_interval, "__interval": interval}
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":
            variables[variable["name"]] = variable.get("query") or "prometheus"
        elif variable.get("includeAll"):
            variables[variable["name"]] = variable.get("allValue") or ".*"
        else:
            current = variable.get("current", {}).get("value", "")
            variables[variable["name"]] = current[0] if isinstance(current, list) else str(current)
    return variables


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel in dashboard order, those inside collapsed rows too."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (names with an underscore: not functions, keywords, labels
    of `by`/`on` clauses or matchers)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {name for name in names if "_" in name.strip("_") and name not in _NOT_METRICS}


def choose_panels(dashboard: dict[str, Any], known: set[str]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(time-series panels whose metrics all exist, {title: why left out} of the other time-series panels)."""
    chosen, left_out = [], {}
    for panel in all_panels(dashboard):
        if panel.get("type") != "timeseries" or not panel.get("targets"):
            continue
        missing = sorted(set().union(*(metric_names(t["expr"]) for t in panel["targets"])) - known)
        if missing:
            left_out[panel["title"]] = f"not in Prometheus: {', '.join(missing)}"
        else:
            chosen.append(panel)
    return chosen, left_out


def legend(legend_format: str, labels: Mapping[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` -> the series' value of it; no format -> `{label="value", ...}`."""
    if not legend_format:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__") + "}"
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend_format)
    return " ".join(text.split())


# ------------------------------------------------------------------------------ Prometheus
class Prometheus:
    """The few calls of Prometheus' HTTP API this needs."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, **params: Any) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=60).json()
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {answer.get('error', answer)}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._get("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._get("query_range", query=expr, start=start, end=end, step=step)["result"]

    def metric_names(self) -> set[str]:
        return set(self._get("label/__name__/values"))

    def scrape_interval_s(self, target: str | None) -> float:
        """The scrape interval of the job scraping `target` (host:port), else the global one."""
        config = yaml.safe_load(self._get("status/config")["yaml"])
        interval = (config.get("global") or {}).get("scrape_interval", "1m")
        for job in config.get("scrape_configs") or []:
            targets = {t for group in job.get("static_configs") or [] for t in group.get("targets", [])}
            if target in targets:
                interval = job.get("scrape_interval", interval)
        return duration_s(interval)


def duration_s(text: str) -> float:
    """A Prometheus duration ("1s", "1m30s", "500ms") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def run_panels(prometheus: Prometheus, panels: list[dict[str, Any]], variables: Mapping[str, str],
               window: tuple[float, float], step: float) -> list[dict[str, Any]]:
    """Each panel's targets over the window: expr as run, and per series its legend, times and values."""
    results = []
    for panel in panels:
        targets = []
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            series = [{"legend": legend(target.get("legendFormat", ""), s["metric"]),
                       "times": [float(t) for t, _ in s["values"]],
                       "values": [float(v) for _, v in s["values"]]}
                      for s in prometheus.query_range(expr, window[0], window[1], step)]
            non_empty = sum(any(math.isfinite(v) for v in s["values"]) for s in series)
            targets.append({"refId": target.get("refId", ""), "expr": expr, "series": series,
                            "series_count": len(series), "non_empty_series": non_empty})
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        results.append({"title": panel["title"], "unit": unit, "targets": targets,
                        "non_empty_series": sum(t["non_empty_series"] for t in targets)})
    return results


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float, process: subprocess.Popen | None,
             log: Path | None = None) -> None:
    """Poll `condition` (HTTP errors count as False) until it holds; raise with the process's log if it dies or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            if condition():
                return
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({process.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.25)


@contextlib.contextmanager
def process(command: list[str], log: Path, env: Mapping[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A child process logging to `log`, terminated (then killed) when the block ends."""
    with log.open("wb") as output:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


@contextlib.contextmanager
def service(store: Path, workdir: Path, ready_timeout_s: float) -> Iterator[str]:
    """The service over `store` on a free port (`python -m app`), yielded as its URL once /readyz is 200."""
    port, log = free_port(), workdir / "service.log"
    env = {**SERVICE_DEFAULTS, **os.environ, "AESERVE_STORE": str(store.resolve()), "PYTHONPATH": str(REPO)}
    with process([sys.executable, "-m", "app", "--port", str(port), "--log-level", "warning"], log, env) as child:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, "the service's /readyz",
                 ready_timeout_s, child, log)
        yield url


def prometheus_config(target: str) -> dict[str, Any]:
    """deploy/prometheus.local.yml pointed at `target`, scraping and evaluating every second, its rules by an
    absolute path, without the self-scrape job."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / name) for name in config.get("rule_files", [])]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] == "aeserve"]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    return config


@contextlib.contextmanager
def prometheus_server(target: str, workdir: Path) -> Iterator[str]:
    """A Prometheus scraping `target` every second, yielded as its URL once it has scraped it."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("no `prometheus` binary (apt-get install prometheus), or pass --prometheus URL")
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(target)))
    address = f"127.0.0.1:{free_port()}"
    command = [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
               f"--web.listen-address={address}"]
    with process(command, workdir / "prometheus.log") as child:
        api = Prometheus(f"http://{address}")
        wait_for(lambda: float(api.query(f'up{{instance="{target}"}}')[0]["value"][1]) == 1,
                 f"Prometheus to scrape {target}", 60, child, workdir / "prometheus.log")
        yield api.url


# ------------------------------------------------------------------------------ the run
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.render_dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=REPO / "model_store", help="store of the service started")
    parser.add_argument("--url", help="a running service instead (its models get the traffic)")
    parser.add_argument("--prometheus", help="a running Prometheus scraping that service instead")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--json", type=Path, help="what each query returned (default: --out with .json)")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--seconds", type=float, default=90.0, help="traffic duration")
    parser.add_argument("--rate-interval", help="$__rate_interval (default: Grafana's from the scrape interval, "
                        f"at least {MIN_RATE_INTERVAL_S:g}s)")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for /readyz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prometheus and not args.url:
        parser.error("--prometheus needs --url: the service that Prometheus scrapes")
    return args


def render(args: argparse.Namespace, url: str, prometheus: Prometheus) -> dict[str, Any]:
    """Traffic, then every chosen panel over its window, plotted; returns the report written as JSON."""
    from deploy.dashboard_plot import plot_panels
    from deploy.dashboard_traffic import send_traffic

    start = time.time()
    tally = send_traffic(url, args.seconds, seed=args.seed)
    target = url.removeprefix("http://").removeprefix("https://").rstrip("/")
    scrape_s = prometheus.scrape_interval_s(target)
    time.sleep(3 * scrape_s)  # the last answers' metrics scraped
    end = time.time()
    step = max(1.0, math.ceil((end - start) / 240))
    rate_interval = args.rate_interval or f"{max(4 * scrape_s, step + scrape_s, MIN_RATE_INTERVAL_S):g}s"
    dashboard = json.loads(args.dashboard.read_text())
    chosen, left_out = choose_panels(dashboard, prometheus.metric_names())
    variables = dashboard_variables(dashboard, rate_interval, f"{step:g}s")
    panels = run_panels(prometheus, chosen, variables, (start - 2 * scrape_s, end), step)
    title = (f"{dashboard.get('title', 'aeserve')}: {args.seconds:g} s of mixed traffic, "
             f"{'service at ' + url if args.url else 'store ' + str(args.store)}")
    plot_panels(panels, args.out, title, (start, end), tally.as_dict()["statuses"])
    return {"dashboard": str(args.dashboard), "service": url, "prometheus": prometheus.url,
            "window": {"start": start, "end": end, "step_s": step}, "variables": variables,
            "traffic": tally.as_dict(), "left_out": left_out,
            "panels": [{**panel, "targets": [summary(target) for target in panel["targets"]]} for panel in panels]}


def summary(target: Mapping[str, Any]) -> dict[str, Any]:
    """A target's result for the JSON: its expr and counts, and per series the legend and the largest value."""
    series = [{"legend": s["legend"], "peak": max((v for v in s["values"] if math.isfinite(v)), default=None)}
              for s in target["series"]]
    return {**target, "series": series}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aeserve-dashboard-")))
        url = args.url or stack.enter_context(service(args.store, workdir, args.ready_timeout))
        target = url.removeprefix("http://").removeprefix("https://").rstrip("/")
        prometheus_url = args.prometheus or stack.enter_context(prometheus_server(target, workdir))
        report = render(args, url, Prometheus(prometheus_url))
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    counts = {p["title"]: p["non_empty_series"] for p in report["panels"]}
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) and {json_path}: {len(counts)} panels, "
          f"non-empty series {counts}; traffic {report['traffic']['statuses']}")
    return report


if __name__ == "__main__":
    main()
