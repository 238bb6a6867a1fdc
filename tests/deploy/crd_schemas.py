"""Strict schemas for the prometheus-operator objects, which kubernetes-validate has no schema for.

A subset of the monitoring.coreos.com/v1 CRDs (prometheus-operator
example/prometheus-operator-crd-full/monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml):
the fields these manifests may use, with the CRDs' names, types and patterns, and no others, so a
misspelt field fails here as it would fail the API server's structural-schema pruning silently.
"""

from __future__ import annotations

from typing import Any

_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SECRET_KEY = {"type": "object", "additionalProperties": False, "required": ["key"],
               "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
_METADATA = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                            "labels": _STRING_MAP, "annotations": _STRING_MAP}}


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind},
                           "metadata": _METADATA, "spec": spec}}


SERVICE_MONITOR = _object("ServiceMonitor", {
    "type": "object", "additionalProperties": False, "required": ["selector"],
    "properties": {
        "jobLabel": {"type": "string"},
        "targetLabels": {"type": "array", "items": {"type": "string"}},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"},
                                             "matchNames": {"type": "array", "items": {"type": "string"}}}},
        "endpoints": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "port": {"type": "string"},
                "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                "path": {"type": "string"},
                "scheme": {"type": "string"},
                "interval": _DURATION,
                "scrapeTimeout": _DURATION,
                "honorLabels": {"type": "boolean"},
                "authorization": {"type": "object", "additionalProperties": False,
                                  "properties": {"type": {"type": "string"}, "credentials": _SECRET_KEY}},
            }}},
    },
})

PROMETHEUS_RULE = _object("PrometheusRule", {
    "type": "object", "additionalProperties": False,
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": _DURATION,
            "limit": {"type": "integer"},
            "labels": _STRING_MAP,
            "rules": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["expr"],
                "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                "properties": {
                    "record": {"type": "string"},
                    "alert": {"type": "string"},
                    "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "for": _DURATION,
                    "keep_firing_for": _DURATION,
                    "labels": _STRING_MAP,
                    "annotations": _STRING_MAP,
                }}},
        }}}},
})

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
