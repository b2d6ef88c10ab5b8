"""A loose PromQL reader for the dashboard and alert tests: which metrics and labels a query uses.

Not a parser: metric names are the identifiers left once strings, label matchers, ranges and clauses are
removed; labels are those of `{...}` matchers, `by`/`without`/`on`/`ignoring`/`group_*` clauses, legends
(`{{label}}`) and alert annotations (`$labels.label`). `problems_of` checks them against a live scrape.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
ALERTS = REPO / "deploy" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "alerts.test.yml"

TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
PROMETHEUS_SERIES = {"up": TARGET_LABELS}  # series Prometheus makes itself
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*", "$op": ".*"}
_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
          "offset", "inf", "nan", "le"}
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_AGGREGATION = re.compile(r"\b(?:sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile)\s+(?:by|without)\b")


# ------------------------------------------------------------------------------ a loose PromQL reader
def fill_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Identifiers that name series: not strings, label matchers, ranges, clauses, functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _CLAUSE.sub(" ", text)
    names = re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {n for n in names if n.lower() not in _WORDS}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names of its matchers) of every `metric{...}` selector."""
    found = []
    for name, matchers in re.findall(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}", expr):
        matchers = re.sub(r'"(?:[^"\\]|\\.)*"', '""', matchers)
        found.append((name, set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))))
    return found


def balanced(text: str, start: int) -> str:
    """The parenthesised text opening at `text[start]` (which must be '(')."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return text[start : index + 1]
    raise AssertionError(f"unbalanced parentheses in {text!r}")


def clauses(expr: str) -> list[tuple[str, set[str], str]]:
    """(keyword, labels, the expression it applies to) of every by/without/on/ignoring/group_* clause: for
    `by`/`without` the aggregated argument that follows, for the others the whole expression."""
    found = []
    for match in _CLAUSE.finditer(expr):
        keyword, labels = match.group(1), {s.strip() for s in match.group(2).split(",") if s.strip()}
        scope = expr
        if keyword in ("by", "without"):
            rest = match.end() + len(expr[match.end():]) - len(expr[match.end():].lstrip())
            if rest < len(expr) and expr[rest] == "(":
                scope = balanced(expr, rest)
        found.append((keyword, labels, scope))
    return found


def without_set_filters(expr: str) -> str:
    """`expr` less the right operands of `and` / `unless` (with their `on (...)`): they filter the left
    side's series and give the result no labels."""
    while match := re.search(r"\b(?:and|unless)\s+(?:(?:on|ignoring)\s*\([^)]*\)\s*)?", expr):
        rest = match.end()
        if expr[rest] == "(":
            operand = balanced(expr, rest)
        else:
            operand = re.match(r"[A-Za-z_:][\w:]*\s*(?:\{[^}]*\})?(?:\[[^\]]*\])?", expr[rest:]).group(0)
        expr = expr[: match.start()] + expr[rest + len(operand):]
    return expr


def output_labels(expr: str) -> set[str] | None:
    """Labels an aggregated expression keeps (its `by` labels), None when it is not aggregated with `by`."""
    expr = without_set_filters(expr)
    if not _AGGREGATION.search(expr):
        return None
    return {label for keyword, labels, _ in clauses(expr) if keyword == "by" for label in labels}


# ------------------------------------------------------------------------------ what the files use
@dataclass
class Query:
    where: str
    expr: str
    shown_labels: set[str] = field(default_factory=set)  # legend {{label}} / annotation $labels.label


def dashboard_queries(path: Path) -> list[Query]:
    dashboard = json.loads(path.read_text())
    queries = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
                queries.append(Query(f"{path.name}: {panel['title']} {target['refId']}", target["expr"], shown))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
            queries.append(Query(f"{path.name}: variable {variable['name']}", metric, {label}))
    return queries


def alert_queries() -> list[Query]:
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    queries = []
    for rule in rules:
        annotations = " ".join(rule.get("annotations", {}).values())
        shown = set(re.findall(r"\$labels\.(\w+)", annotations))
        queries.append(Query(f"alerts.yml: {rule['alert']}", rule["expr"], shown))
    return queries


def all_queries() -> list[Query]:
    return [q for path in DASHBOARDS for q in dashboard_queries(path)] + alert_queries()


def problems_of(query: Query, live: dict[str, set[str]]) -> list[str]:
    """Every metric or label of `query` the live scrape does not have."""
    expr = fill_variables(query.expr)
    names = metric_names(expr)
    problems = [f"no metric in {expr!r}"] if not names else []
    problems += [f"metric {name} is not emitted" for name in sorted(names - live.keys())]
    known = names & live.keys()
    for name, used in selectors(expr):
        problems += [f"{name} has no label {label!r}" for label in sorted(used - live.get(name, used))]
    for keyword, used, scope in clauses(expr):
        scoped = metric_names(without_set_filters(scope) if keyword in ("by", "without") else scope) & known
        for label in sorted(used):
            holders = [n for n in scoped if label in live[n]]
            # an aggregation's labels must be on every series it sums; a matching label on one side at least
            enough = len(holders) == len(scoped) if keyword in ("by", "without") else bool(holders)
            if scoped and not enough:
                problems.append(f"{keyword} ({label}) over {sorted(scoped)}: not a label of all of them")
    kept = output_labels(expr)
    available = set().union(*(live[n] for n in known)) if known else set()
    for label in sorted(query.shown_labels):
        if label not in available or (kept is not None and label not in kept):
            problems.append(f"shows label {label!r}, which the query's result does not carry")
    return problems
