"""The alert rules: valid for promtool, unit-tested, about metrics the code exports, and deployed unchanged."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from retrieval.v1 import encoder_pb2

from services.common.metrics import GrpcServerMetrics
from services.encoder.metrics import EncoderMetrics
from tests.conftest import require_binary
from tests.deploy.manifests import DEPLOY, Obj, find

RULES = DEPLOY / "prometheus" / "rules" / "retrieval.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests"
SYNC_SCRIPT = DEPLOY / "prometheus" / "sync_prometheusrule.py"
# Labels Prometheus adds to every scraped series (prometheus-operator: from the target's Service and pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "bool", "offset", "inf", "nan"}
# Series of other exporters the alerts read, with their labels: Qdrant's /metrics (docs "Monitoring";
# src/common/metrics.rs), the kubelet's volume statistics and kube-state-metrics (docs/metrics), as
# kube-prometheus-stack scrapes them (namespace, pod... come as target labels).
EXTERNAL_SERIES: dict[str, set[str]] = {
    "cluster_peers_total": set(),
    "cluster_pending_operations_total": {"peer_id"},
    "kubelet_volume_stats_available_bytes": {"persistentvolumeclaim"},
    "kubelet_volume_stats_capacity_bytes": {"persistentvolumeclaim"},
    "kube_pod_container_status_restarts_total": {"container", "uid"},
    "kube_horizontalpodautoscaler_status_current_replicas": {"horizontalpodautoscaler"},
    "kube_horizontalpodautoscaler_spec_max_replicas": {"horizontalpodautoscaler"},
}
README = DEPLOY / "README.md"
RUNBOOK_BASE = "https://git.example.com/retrieval-platform/blob/main/deploy/README.md#"


def promtool() -> str:
    """promtool from PATH; CI must have it (Debian package `prometheus`), elsewhere its tests are skipped."""
    return require_binary("promtool")


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def exported() -> dict[str, set[str]]:
    """Series name -> label names, for every series the servers' registries export (plus `up`)."""
    registry = CollectorRegistry()
    metrics = [*vars(GrpcServerMetrics(registry)).values(), *vars(EncoderMetrics(registry)).values()]
    # prometheus_client keeps a metric's label names only on the metric object (`_labelnames`).
    labels = {m._name: set(m._labelnames) for m in metrics if hasattr(m, "_labelnames")}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    series: dict[str, set[str]] = {"up": set(), **EXTERNAL_SERIES}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            series[family.name + suffix] = labels.get(family.name, set()) | ({"le"} if suffix == "_bucket" else set())
    return series


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: matcher value}) of every series a PromQL expression reads."""
    found = []
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    for match in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        labels = dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', match[2]))
        found.append((match[1], labels))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", without_strings)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare):
        if match[1] not in PROMQL_WORDS:
            found.append((match[1], {}))
    return found


def test_rules_read_only_series_the_code_exports() -> None:
    series = exported()
    recorded = {r["record"] for r in rules() if "record" in r}
    problems = []
    for rule in rules():
        name = rule.get("record") or rule["alert"]
        for metric, labels in selectors(rule["expr"]):
            if metric in recorded:
                continue
            if metric not in series:
                problems.append(f"{name}: no series {metric}")
            elif unknown := set(labels) - series[metric] - TARGET_LABELS:
                problems.append(f"{name}: {metric} has no labels {sorted(unknown)}")
    assert problems == []
    # The extraction itself finds what the rules are about (a broken regex would make the loop vacuous).
    read = {m for r in rules() for m, _ in selectors(r["expr"])}
    assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "encoder_queue_depth",
            "encoder_queue_capacity", "up"} <= read


def _anchor(heading: str) -> str:
    """The fragment GitHub and GitLab give a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_runbook_section() -> None:
    anchors = {_anchor(line.lstrip("#")) for line in README.read_text().splitlines() if line.startswith("#")}
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 11
    problems = []
    for rule in alerts:
        url = rule.get("annotations", {}).get("runbook_url", "")
        if not url.startswith(RUNBOOK_BASE) or url.removeprefix(RUNBOOK_BASE) not in anchors:
            problems.append(f"{rule['alert']}: runbook_url {url!r} is not a section of deploy/README.md")
    assert problems == []
    assert _anchor("RetrievalTargetDown") == "retrievaltargetdown" and "retrievaltargetdownx" not in anchors


def test_one_pod_down_warns_and_most_pods_down_pages() -> None:
    by_name = {r["alert"]: r for r in rules() if "alert" in r}
    assert by_name["RetrievalTargetDown"]["labels"]["severity"] == "warning"
    assert by_name["RetrievalServiceDown"]["labels"]["severity"] == "critical"
    assert {"QdrantPeerMissing", "QdrantConsensusStuck", "RetrievalVolumeFillingUp", "RetrievalPodRestarting",
            "RetrievalAutoscalerAtMax"} <= set(by_name)


def test_a_rule_on_a_missing_metric_would_be_caught() -> None:
    assert ("encoder_queue_size", {}) in selectors("sum(encoder_queue_size) / on (job) encoder_queue_capacity")
    assert "encoder_queue_size" not in exported()
    assert "model" in exported()["encoder_queue_depth"] and "model" not in exported()["encoder_queue_capacity"]


def test_label_values_match_what_the_servers_record() -> None:
    """grpc_code and grpc_type values in the rules are ones the interceptor records (grpc.StatusCode names)."""
    registry = CollectorRegistry()
    GrpcServerMetrics(registry).precreate([encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]])
    recorded: dict[str, set[str]] = {"grpc_code": set(), "grpc_type": set()}
    for family in registry.collect():
        for sample in family.samples:
            for label in recorded:
                if label in sample.labels:
                    recorded[label].add(sample.labels[label])
    used = {label: {v for r in rules() for _, labels in selectors(r["expr"]) if label in labels
                    for v in labels[label].split("|")} for label in recorded}
    assert used["grpc_code"] and used["grpc_code"] <= recorded["grpc_code"]
    assert used["grpc_type"] == {"unary"} <= recorded["grpc_type"]


def _load_sync_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sync_prometheusrule", SYNC_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prometheus_rule_carries_the_same_groups(rendered: dict[str, list[Obj]]) -> None:
    rule = find(rendered["overlays/production"], "PrometheusRule", "retrieval")
    assert rule is not None
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "run: python deploy/prometheus/sync_prometheusrule.py")
    sync = _load_sync_script()
    assert Path(sync.TARGET).read_text() == sync.render(), "run: python deploy/prometheus/sync_prometheusrule.py"


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", sorted(RULE_TESTS.glob("*.yml")), ids=lambda p: p.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
