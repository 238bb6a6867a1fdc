"""The Grafana dashboard: importable structure, a RED row per service, and PromQL that reads only series the
running services really export (recording rules resolved through deploy/prometheus/rules)."""

from __future__ import annotations

import copy
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc, evaluator_pb2, evaluator_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.clients import channel, wait_serving
from services.encoder.config import EncoderSettings
from services.encoder.servicer import create_encoder_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.servicer import create_evaluator_server
from services.search.config import SearchSettings
from services.search.servicer import create_search_server
from services.stack import SERVICES
from tests.encoder.images import jpeg
from tests.observability.prometheus import running_prometheus

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "retrieval.json"
RULES = REPO / "deploy" / "prometheus" / "rules" / "retrieval.rules.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana unit ids used here (packages/grafana-data/src/valueFormats/categories.ts): a typo renders raw numbers.
GRAFANA_UNITS = {"none", "short", "percentunit", "s", "bytes", "reqps", "cps", "ops"}
# What Grafana substitutes before the query reaches Prometheus; `service` is handled per value.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "namespace": "retrieval"}
# The namespace the simulated scrapes carry as a target label, as the ServiceMonitors give it in Kubernetes.
NAMESPACE = "retrieval"
# Series of other exporters that the Qdrant row reads (Qdrant's /metrics, the kubelet, kube-state-metrics):
# no service here exports them, so only their names are known (tests/deploy/test_prometheus.py lists them).
EXTERNAL_SERIES = {"cluster_peers_total", "cluster_pending_operations_total", "kubelet_volume_stats_available_bytes",
                   "kubelet_volume_stats_capacity_bytes", "kube_pod_container_status_restarts_total",
                   "kube_horizontalpodautoscaler_status_current_replicas",
                   "kube_horizontalpodautoscaler_spec_max_replicas"}

Dashboard = dict[str, Any]
Panel = dict[str, Any]
Labels = dict[str, str]


# ---------------------------------------------------------------------------------------------------------------
# Dashboard access
# ---------------------------------------------------------------------------------------------------------------

def load_dashboard() -> Dashboard:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: Dashboard) -> list[Panel]:
    """Every panel, rows included, in order; a collapsed row keeps its panels inside it."""
    out: list[Panel] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def rows(dashboard: Dashboard) -> list[tuple[Panel, list[Panel]]]:
    """(row, its panels): an open row owns the top-level panels after it, up to the next row."""
    grouped: list[tuple[Panel, list[Panel]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            grouped.append((panel, list(panel.get("panels", []))))
        else:
            assert grouped, f"panel {panel.get('title')!r} sits above the first row"
            grouped[-1][1].append(panel)
    return grouped


def variables(dashboard: Dashboard) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def expressions(dashboard: Dashboard) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """The query as Grafana sends it: ``$name`` and ``${name}`` replaced; an unknown variable is an error."""
    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)


# ---------------------------------------------------------------------------------------------------------------
# A small PromQL reader: enough to list the series an expression selects, not a full parser
# ---------------------------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:\d+(?:ms|[smhdwy]))+(?![\w:])|0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
""", re.VERBOSE)
# Words that are never series names: aggregations (written `sum by (x) (...)`, so not always followed by
# "("), set and binary operators, modifiers and literals.
_KEYWORDS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
             "quantile", "limitk", "limit_ratio", "and", "or", "unless", "bool", "offset", "inf", "nan",
             "group_left", "group_right", "by", "without", "on", "ignoring", "atan2"}
# Modifiers followed by a parenthesised list of label names (not series).
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str

    def matches(self, labels: Labels) -> bool:
        actual = labels.get(self.label, "")  # PromQL: an absent label is the empty string
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        found = re.fullmatch(self.value, actual) is not None  # PromQL regexes are anchored
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f'{self.label}{self.op}"{self.value}"'


@dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[Matcher, ...] = ()

    def __str__(self) -> str:
        return self.name + ("{" + ", ".join(map(str, self.matchers)) + "}" if self.matchers else "")


def tokenize(expr: str) -> list[Token]:
    """PromQL tokens; raises on characters PromQL does not have (e.g. an unsubstituted Grafana `$var`)."""
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            tokens.append(Token(str(match.lastgroup), match[0]))
        pos = match.end()
    return tokens


def _unquote(text: str) -> str:
    return text[1:-1] if text[0] == "`" else bytes(text[1:-1], "utf-8").decode("unicode_escape")


def _closing(tokens: list[Token], start: int, opening: str, closing: str) -> int:
    """Index of the token closing the bracket opened at ``start``."""
    depth = 0
    for i in range(start, len(tokens)):
        depth += (tokens[i].text == opening) - (tokens[i].text == closing)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {opening!r}")


def _matchers(tokens: list[Token]) -> tuple[Matcher, ...]:
    """`label op "value"` triples between a selector's braces."""
    parts = [t for t in tokens if t.text != ","]
    triples = [parts[i:i + 3] for i in range(0, len(parts), 3)]
    if any(len(t) != 3 or t[0].kind != "ident" or t[1].text not in ("=", "!=", "=~", "!~") or t[2].kind != "string"
           for t in triples):
        raise ValueError(f"bad label matchers: {' '.join(t.text for t in tokens)}")
    return tuple(Matcher(label.text, op.text, _unquote(value.text)) for label, op, value in triples)


def selectors(expr: str) -> list[Selector]:
    """Every series selector in a PromQL expression: metric names with their label matchers.

    Function and aggregation names, label names in by/without/on/ignoring/group_* lists, label names inside
    braces, durations, numbers and strings are skipped.
    """
    tokens = tokenize(expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        after = tokens[i + 1].text if i + 1 < len(tokens) else ""
        if token.text == "[":  # range or subquery: durations only
            i = _closing(tokens, i, "[", "]") + 1
        elif token.kind == "ident" and token.text.lower() in _LABEL_LISTS and after == "(":
            i = _closing(tokens, i + 1, "(", ")") + 1
        elif token.kind == "ident" and (after == "(" or token.text.lower() in _KEYWORDS):
            i += 1  # a function call or a keyword
        elif token.kind == "ident" or token.text == "{":
            name = token.text if token.kind == "ident" else ""
            matchers: tuple[Matcher, ...] = ()
            start = i + 1 if token.kind == "ident" else i
            if start < len(tokens) and tokens[start].text == "{":
                end = _closing(tokens, start, "{", "}")
                matchers = _matchers(tokens[start + 1:end])
                i = end + 1
            else:
                i = start
            named = [m for m in matchers if m.label == "__name__" and m.op == "="]
            if named:
                name, matchers = named[0].value, tuple(m for m in matchers if m is not named[0])
            if not name:
                raise ValueError(f"selector without a fixed metric name in {expr!r}")
            found.append(Selector(name, matchers))
        else:
            i += 1
    return found


def grouping_labels(expr: str) -> set[str]:
    """Label names listed after by (...) anywhere in ``expr``."""
    tokens = tokenize(expr)
    labels: set[str] = set()
    for i, token in enumerate(tokens[:-1]):
        if token.text == "by" and tokens[i + 1].text == "(":
            labels |= {t.text for t in tokens[i + 2:_closing(tokens, i + 1, "(", ")")] if t.kind == "ident"}
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Recording rules and scrapes
# ---------------------------------------------------------------------------------------------------------------

def recording_rules() -> dict[str, str]:
    """Recorded series name -> its expression."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}


def recorded_labels(name: str, rules: Mapping[str, str]) -> set[str]:
    """Labels a recorded series keeps: its aggregation's by-lists, or those of the recorded series it combines."""
    expr = rules[name]
    return grouping_labels(expr) | {label for s in selectors(expr) if s.name in rules
                                    for label in recorded_labels(s.name, rules)}


# The series names each exposition type produces (classic histograms have no series under the bare name).
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created"), "untyped": ("",), "unknown": ("",)}


@dataclass
class Scrape:
    """What Prometheus stores from one target: its declared families and samples with target labels added."""

    job: str
    families: dict[str, str] = field(default_factory=dict)  # series name it may produce -> exposition type
    samples: list[tuple[str, Labels]] = field(default_factory=list)

    @classmethod
    def parse(cls, job: str, instance: str, text: str) -> Scrape:
        scrape = cls(job)
        target = {"job": job, "instance": instance, "namespace": NAMESPACE}
        for family in text_string_to_metric_families(text):
            # The parser strips a counter's _total from the family name; its samples keep it.
            for suffix in _SUFFIXES.get(family.type, ("",)):
                scrape.families[family.name + suffix] = family.type
            scrape.samples += [(s.name, {**s.labels, **target}) for s in family.samples]
        # Prometheus adds `up` for every scraped target.
        scrape.families["up"] = "gauge"
        scrape.samples.append(("up", target))
        return scrape


def fetch_scrape(job: str, port: int) -> Scrape:
    instance = f"127.0.0.1:{port}"
    with urllib.request.urlopen(f"http://{instance}/metrics", timeout=10) as response:
        return Scrape.parse(job, instance, response.read().decode())


def label_values(query: str, scrapes: Mapping[str, Scrape]) -> set[str]:
    """Grafana's ``label_values(metric, label)`` over the scraped samples."""
    match = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", query)
    assert match, f"unsupported variable query {query!r}"
    return {labels[match[2]] for s in scrapes.values() for name, labels in s.samples
            if name == match[1] and match[2] in labels}


# ---------------------------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------------------------

def check_selector(selector: Selector, scrapes: Mapping[str, Scrape], rules: Mapping[str, str],
                   seen: frozenset[str] = frozenset()) -> list[str]:
    """Problems with one selector: a series nobody exports, or label matchers no exported sample satisfies."""
    if selector.name in rules:
        if selector.name in seen:
            return [f"recording rule {selector.name} refers to itself"]
        kept = recorded_labels(selector.name, rules) | {"__name__"}
        problems = [f"{selector}: recorded series {selector.name} has no label {m.label}"
                    for m in selector.matchers if m.label not in kept]
        for inner in selectors(rules[selector.name]):
            problems += check_selector(inner, scrapes, rules, seen | {selector.name})
        return problems
    if selector.name in EXTERNAL_SERIES or Matcher("job", "=", "qdrant") in selector.matchers:
        return []  # other exporters' series, and Qdrant's scrape (`up{job="qdrant"}`): not scraped here
    if not any(selector.name in s.families for s in scrapes.values()):
        return [f"{selector}: no service exports a series named {selector.name}"]
    samples = [labels for s in scrapes.values() for name, labels in s.samples if name == selector.name]
    if not samples:
        return []  # declared but empty here (device memory on a CPU-only machine): only the name can be checked
    # A label nobody sets would satisfy a negative matcher silently, so label names are checked first.
    known = {label for labels in samples for label in labels}
    unknown = [f"{selector}: {selector.name} has no label {m.label}" for m in selector.matchers if m.label not in known]
    if unknown:
        return unknown
    if not any(all(m.matches(labels) for m in selector.matchers) for labels in samples):
        return [f"{selector}: no exported sample matches these labels"]
    return []


def check_dashboard(dashboard: Dashboard, scrapes: Mapping[str, Scrape],
                    rules: Mapping[str, str]) -> tuple[list[str], set[str]]:
    """(problems, raw metric names checked) for every panel expression.

    An expression using ``$service`` is checked once per value the service variable takes over the scrapes,
    so that the repeated RED row is checked for each service.
    """
    services = label_values(variable_query(variables(dashboard)["service"]), scrapes)
    problems: list[str] = []
    checked: set[str] = set()
    for title, expr in expressions(dashboard):
        values = [{**GRAFANA_VARIABLES, "service": s} for s in sorted(services)] if "$service" in expr \
            else [dict(GRAFANA_VARIABLES)]
        for value in values:
            try:
                found = selectors(substitute(expr, value))
            except (KeyError, ValueError) as exc:
                problems.append(f"{title}: {exc}")
                continue
            for selector in found:
                problems += [f"{title} [{value.get('service', '')}]: {p}" for p in check_selector(selector, scrapes,
                                                                                                   rules)]
                checked |= raw_metrics(selector.name, rules)
    return problems, checked


def raw_metrics(name: str, rules: Mapping[str, str]) -> set[str]:
    """The scraped metric names behind ``name`` (itself, or what its recording rule reads)."""
    if name not in rules:
        return {name}
    return {raw for s in selectors(rules[name]) for raw in raw_metrics(s.name, rules)}


# ---------------------------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------------------------

def test_dashboard_is_importable_with_datasource_and_service_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["id"] is None and dashboard["uid"] and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    found = variables(dashboard)
    assert found["datasource"]["type"] == "datasource" and found["datasource"]["query"] == "prometheus"
    service = found["service"]
    assert service["type"] == "query" and service["datasource"] == DATASOURCE
    # `job` and not grpc_service: it is on every series (domain metrics and `up` too) and the alerts say job=...
    assert re.sub(r"\s", "", variable_query(service)) == "label_values(grpc_server_handled_total,job)"
    assert service["multi"] and service["includeAll"], "the RED row repeats once per selected service"


def test_every_query_is_scoped_to_the_namespace_variable() -> None:
    dashboard = load_dashboard()
    namespace = variables(dashboard)["namespace"]
    assert re.sub(r"\s", "", variable_query(namespace)) == "label_values(up,namespace)"
    assert namespace["multi"] and namespace["includeAll"] and namespace["allValue"] == ".*"
    unscoped = [(title, str(s)) for title, expr in expressions(dashboard)
                for s in selectors(substitute(expr, {**GRAFANA_VARIABLES, "service": "encoder"}))
                if Matcher("namespace", "=~", NAMESPACE) not in s.matchers]
    assert unscoped == []


def test_a_qdrant_row_charts_the_cluster() -> None:
    qdrant = [panels for row, panels in rows(load_dashboard()) if row["title"].startswith("Qdrant")]
    assert len(qdrant) == 1
    exprs = [substitute(t["expr"], GRAFANA_VARIABLES) for p in qdrant[0] for t in p["targets"]]
    read = {s.name for e in exprs for s in selectors(e)}
    assert {"cluster_peers_total", "cluster_pending_operations_total", "kubelet_volume_stats_available_bytes",
            "namespace_job:encoder_queue_saturation:sum"} <= read


def test_every_panel_has_title_unit_description_and_the_datasource_variable() -> None:
    panels = [p for p in all_panels(load_dashboard()) if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        title = panel.get("title", "")
        assert title, panel
        assert panel["datasource"] == DATASOURCE, title
        assert panel["fieldConfig"]["defaults"].get("unit") in GRAFANA_UNITS, title
        assert len(panel.get("description", "")) > 80 and "Bad:" in panel["description"], (
            f"{title}: the description must say what a bad value means for on-call")
        assert panel["targets"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert target["expr"].strip(), title


def test_panels_fit_the_grid_without_overlapping() -> None:
    dashboard = load_dashboard()
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_range_uses_rate_interval() -> None:
    for title, expr in expressions(load_dashboard()):
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{title}: {ranges}"


def _panel(panels: list[Panel], title_prefix: str) -> Panel:
    matching = [p for p in panels if p["title"].startswith(title_prefix)]
    assert len(matching) == 1, f"want one panel titled {title_prefix!r}, found {[p['title'] for p in panels]}"
    return matching[0]


def quantiles(exprs: list[str]) -> list[float]:
    """The quantiles of the expressions that are ``histogram_quantile(q, ...)``, sorted."""
    return sorted(float(m[1]) for e in exprs if (m := re.match(r"\s*histogram_quantile\(\s*([\d.]+)\s*,", e)))


def _exprs(panel: Panel) -> list[str]:
    return [substitute(t["expr"], {**GRAFANA_VARIABLES, "service": "$service"}) for t in panel["targets"]]


def test_red_row_repeats_per_service_with_rate_errors_and_duration() -> None:
    red = [(row, panels) for row, panels in rows(load_dashboard()) if row.get("repeat") == "service"]
    assert len(red) == 1, "one RED row, repeated by Grafana once per value of $service"
    row, panels = red[0]
    assert "$service" in row["title"]
    for panel in panels:
        for expr in _exprs(panel):
            assert all(Matcher("job", "=~", "$service") in s.matchers for s in selectors(expr)), (
                f"{panel['title']}: every series of the RED row is the repeated service's")
    rate = _exprs(_panel(panels, "Rate"))
    assert [s.name for e in rate for s in selectors(e)] == ["grpc_server_handled_total"]
    assert grouping_labels(rate[0]) == {"grpc_method"}
    errors = _exprs(_panel(panels, "Errors"))
    assert len(errors) == 1 and Matcher("grpc_code", "!=", "OK") in selectors(errors[0])[0].matchers
    assert grouping_labels(errors[0]) == {"grpc_method", "grpc_code"}
    assert _panel(panels, "Errors")["fieldConfig"]["defaults"]["unit"] == "percentunit"
    duration = _exprs(_panel(panels, "Duration"))
    assert quantiles(duration) == [0.5, 0.95, 0.99] and len(duration) == 3
    for expr in duration:
        assert {s.name for s in selectors(expr)} == {"grpc_server_handling_seconds_bucket"}
        assert grouping_labels(expr) == {"grpc_method", "le"}


# (row title prefix, metric, labels the panel must break it down by)
DOMAIN_PANELS = [
    ("Encoder", "encoder_batch_size_bucket", {"model", "le"}),
    ("Encoder", "encoder_queue_depth", {"model"}),
    ("Encoder", "encoder_queue_capacity", set()),
    ("Encoder", "encoder_inference_duration_seconds_bucket", {"stage", "backend", "le"}),
    ("Encoder", "encoder_images_total", {"outcome"}),
    ("Encoder", "encoder_model_load_seconds", {"model"}),
    ("Encoder", "encoder_device_memory_bytes", {"device", "kind"}),
    ("Search", "search_query_duration_seconds_bucket", {"operation", "le"}),
    ("Search", "search_points_total", {"collection"}),
    ("Search", "search_upserted_points_total", set()),
    ("Evaluator", "evaluator_runs_total", {"status"}),
    ("Evaluator", "evaluator_runs_in_progress", set()),
    ("Evaluator", "evaluator_run_seconds_bucket", {"le"}),
]


@pytest.mark.parametrize(("row_prefix", "metric", "by"), DOMAIN_PANELS, ids=[m for _, m, _ in DOMAIN_PANELS])
def test_domain_rows_chart_their_metrics(row_prefix: str, metric: str, by: set[str]) -> None:
    owners = [row for row, panels in rows(load_dashboard()) for p in panels for e in _exprs(p)
              if metric in {s.name for s in selectors(e)} and by <= grouping_labels(e)]
    assert owners, f"no panel charts {metric} by {sorted(by)}"
    assert all(row["title"].startswith(row_prefix) for row in owners), [row["title"] for row in owners]


def test_encoder_batching_and_queue_panels() -> None:
    encoder = next(panels for row, panels in rows(load_dashboard()) if row["title"].startswith("Encoder"))
    assert quantiles(_exprs(_panel(encoder, "Batch size"))) == [0.5, 0.95, 0.99]
    queue = {s.name for e in _exprs(_panel(encoder, "Queue depth vs capacity")) for s in selectors(e)}
    assert queue == {"encoder_queue_depth", "encoder_queue_capacity"}, "depth and capacity on one panel"


def test_reader_lists_series_and_skips_functions_labels_and_keywords() -> None:
    expr = ('sum by (job, le) (rate(grpc_server_handling_seconds_bucket{job=~"a|b", grpc_type="unary"}[5m] '
            'offset 1h)) / on (job) group_left (model) max without (instance) (encoder_queue_capacity) '
            'and bool 1e3 > histogram_quantile(0.9, x:y:z) unless {__name__="up", job!="c"}')
    assert selectors(expr) == [
        Selector("grpc_server_handling_seconds_bucket",
                 (Matcher("job", "=~", "a|b"), Matcher("grpc_type", "=", "unary"))),
        Selector("encoder_queue_capacity"), Selector("x:y:z"), Selector("up", (Matcher("job", "!=", "c"),))]
    assert grouping_labels(expr) == {"job", "le"}
    with pytest.raises(ValueError, match="cannot read"):
        selectors("rate(x[$__rate_interval])")  # a Grafana variable Grafana would have substituted
    assert Matcher("job", "=~", "enc.*").matches({"job": "encoder"})
    assert not Matcher("job", "=~", "enc").matches({"job": "encoder"})  # anchored, as in PromQL
    assert Matcher("code", "!=", "OK").matches({}) and not Matcher("code", "=", "OK").matches({})


# ---------------------------------------------------------------------------------------------------------------
# Against the running services
# ---------------------------------------------------------------------------------------------------------------

def _drive_traffic(encoder: str, search: str, evaluator: str) -> None:
    """One call of each kind the panels chart, so histograms and per-outcome counters have samples."""
    with channel(encoder) as chan:
        # The undecodable image gives the outcome="error" series (the call itself still ends OK).
        images = [encoder_pb2.Image(data=jpeg(64, 48)), encoder_pb2.Image(data=b"not an image")]
        encoder_pb2_grpc.EncoderServiceStub(chan).EmbedImages(encoder_pb2.EmbedImagesRequest(images=images), timeout=60)
    with channel(search) as chan:
        stub = search_pb2_grpc.SearchServiceStub(chan)
        stub.CreateCollection(search_pb2.CreateCollectionRequest(name="dash", dim=4, model="m", dataset="d"))
        stub.Upsert(iter([search_pb2.UpsertRequest(collection="dash", points=[search_pb2.Point(
            vector=[1, 0, 0, 0], payload=search_pb2.Payload(dataset="d", path="a.jpg", labels=["x"]))])]))
        stub.Search(search_pb2.SearchRequest(collection="dash", vector=[1, 0, 0, 0], limit=1))
    with channel(evaluator) as chan:
        evaluator_pb2_grpc.EvaluatorServiceStub(chan).ListRuns(evaluator_pb2.ListRunsRequest())


@pytest.fixture(scope="module")
def service_scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Scrape]]:
    """The three services in-process on free ports (encoder: random-weight ResNet-18), after a little traffic,
    scraped once each as Prometheus would (job = service name, as in the ServiceMonitor and prometheus.yml)."""
    work = tmp_path_factory.mktemp("dashboard")
    encoder, encoder_core = create_encoder_server(EncoderSettings(
        port=0, metrics_port=0, random_weights=True, models=["resnet18"], default_model="resnet18"))
    search, search_core = create_search_server(SearchSettings(port=0, metrics_port=0, data_dir=work / "qdrant"))
    evaluator, manager = create_evaluator_server(EvaluatorSettings(
        port=0, metrics_port=0, encoder_address=f"127.0.0.1:{encoder.port}",
        search_address=f"127.0.0.1:{search.port}", output_dir=work / "reports", cache_dir=work / "cache",
        allowed_roots=[work]))
    servers = {"encoder": encoder, "search": search, "evaluator": evaluator}
    try:
        for server in servers.values():
            with channel(f"127.0.0.1:{server.port}") as chan:
                wait_serving(chan, timeout=120)
        _drive_traffic(*(f"127.0.0.1:{s.port}" for s in servers.values()))
        yield {job: fetch_scrape(job, server.metrics_port or 0) for job, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop(0)
        encoder_core.close()
        search_core.close()
        manager.close()


def test_service_variable_finds_the_three_services(service_scrapes: dict[str, Scrape]) -> None:
    query = variable_query(variables(load_dashboard())["service"])
    assert label_values(query, service_scrapes) == set(SERVICES)


def test_every_panel_reads_only_series_the_running_services_export(service_scrapes: dict[str, Scrape]) -> None:
    problems, checked = check_dashboard(load_dashboard(), service_scrapes, recording_rules())
    assert problems == []
    # Not vacuous: the checker saw the series of every row, recording rules resolved to what they read.
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "grpc_server_started_total",
            "up", "encoder_batch_size_bucket", "encoder_queue_depth", "encoder_queue_capacity",
            "encoder_device_memory_bytes", "search_points_total", "evaluator_runs_total"} <= checked
    assert len(checked) >= 20


def _mutated(old: str, new: str) -> Dashboard:
    """The dashboard with ``old`` replaced by ``new`` in the first expression that contains it."""
    dashboard = copy.deepcopy(load_dashboard())
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if old in target["expr"]:
                target["expr"] = target["expr"].replace(old, new, 1)
                return dashboard
    raise AssertionError(f"no expression contains {old!r}")


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("encoder_batch_size_bucket", "encoder_batchsize_bucket", "no service exports a series named encoder_batchsize"),
    ("sum by (instance, model) (encoder_queue_depth{", "sum by (instance, model) (encoder_queue_depth_bucket{",
     "no service exports a series named encoder_queue_depth_bucket"),  # a gauge has no buckets
    ('grpc_type="unary"', 'grpc_type="Unary"', "no exported sample matches"),
    ('grpc_code!="OK"', 'grpc_status!="OK"', "has no label grpc_status"),  # would match everything silently
    ("job_grpc_service:grpc_server_error_ratio:rate5m{", "job_grpc_service:grpc_server_error_rate:rate5m{",
     "no service exports a series named job_grpc_service:grpc_server_error_rate:rate5m"),
    ("instance_model:encoder_queue_saturation:ratio{", 'instance_model:encoder_queue_saturation:ratio{stage="x", ',
     "has no label stage"),  # the recording rule aggregates it away
    ("[$__rate_interval]", "[$__rate_intervall]", "unknown dashboard variable"),
], ids=["misspelt-metric", "suffix-on-a-gauge", "wrong-label-value", "unknown-label", "misspelt-rule",
        "label-dropped-by-rule", "unknown-variable"])
def test_checker_catches_a_broken_expression(service_scrapes: dict[str, Scrape], old: str, new: str,
                                              expected: str) -> None:
    problems, _ = check_dashboard(_mutated(old, new), service_scrapes, recording_rules())
    assert problems and all(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------------------
# Syntax, by a real Prometheus (Debian's `prometheus`)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Prometheus on loopback with no targets: its query API parses PromQL exactly as production does."""
    work = tmp_path_factory.mktemp("prometheus-syntax")
    with running_prometheus("global:\n  scrape_interval: 1m\n", work) as url:
        yield url


def _query(url: str, expr: str) -> dict[str, Any]:
    """The query API's answer; a parse error is HTTP 400 with a JSON body saying why."""
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}",
                                    timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def test_real_prometheus_parses_every_panel_expression(empty_prometheus: str) -> None:
    failures = []
    exprs = expressions(load_dashboard())
    for title, expr in exprs:
        body = _query(empty_prometheus, substitute(expr, {**GRAFANA_VARIABLES, "service": "encoder"}))
        if body.get("status") != "success":
            failures.append(f"{title}: {body.get('error')}")
    assert failures == []
    assert len(exprs) >= 30
    # And the API really rejects a broken expression (so "success" above means something).
    assert _query(empty_prometheus, "sum by (job (rate(up[1m]))")["status"] == "error"
