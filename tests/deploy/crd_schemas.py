"""Strict schemas for the custom resources, which kubernetes-validate has no schema for.

Subsets of the CRDs, written from their published openAPIV3Schema: prometheus-operator's
monitoring.coreos.com/v1 (example/prometheus-operator-crd-full/monitoring.coreos.com_{servicemonitors,
prometheusrules}.yaml) and KEDA's keda.sh/v1alpha1 ScaledObject (config/crd/bases/keda.sh_scaledobjects.yaml,
KEDA 2.12-2.16). They hold the fields these manifests may use, with the CRDs' names, types, bounds and
patterns, and no others, so a misspelt field fails here as it would be pruned silently by the API server's
structural schema.
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


def _object(kind: str, spec: dict[str, Any], api_version: str = "monitoring.coreos.com/v1") -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
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

_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_HPA_RULES = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"type": "string"},
        "policies": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["type", "value", "periodSeconds"],
            "properties": {"type": {"type": "string"}, "value": _INT32, "periodSeconds": _INT32}}},
    },
}
# The ScaledObject's metricType is a string in the CRD; KEDA accepts these three (the CRD's description).
_METRIC_TYPE = {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]}

SCALED_OBJECT = _object("ScaledObject", {
    "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                           "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                          "name": {"type": "string"},
                                          "envSourceContainerName": {"type": "string"}}},
        "pollingInterval": _INT32,
        "cooldownPeriod": _INT32,
        "initialCooldownPeriod": _INT32,
        "idleReplicaCount": _INT32,
        "minReplicaCount": _INT32,
        "maxReplicaCount": _INT32,
        "fallback": {"type": "object", "additionalProperties": False, "required": ["failureThreshold", "replicas"],
                     "properties": {"failureThreshold": _INT32, "replicas": _INT32}},
        "advanced": {"type": "object", "additionalProperties": False, "properties": {
            "restoreToOriginalReplicaCount": {"type": "boolean"},
            "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                "name": {"type": "string"},
                "behavior": {"type": "object", "additionalProperties": False,
                             "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES}}}},
            "scalingModifiers": {"type": "object", "additionalProperties": False,
                                 "properties": {"formula": {"type": "string"}, "target": {"type": "string"},
                                                "activationTarget": {"type": "string"},
                                                "metricType": _METRIC_TYPE}},
        }},
        "triggers": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
            "properties": {
                "type": {"type": "string"},
                "name": {"type": "string"},
                "metadata": _STRING_MAP,
                "metricType": _METRIC_TYPE,
                "useCachedMetrics": {"type": "boolean"},
                "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                      "properties": {"name": {"type": "string"}, "kind": {"type": "string"}}},
            }}},
    },
}, api_version="keda.sh/v1alpha1")

# The metadata keys of KEDA's `prometheus` trigger (keda.sh/docs/scalers/prometheus): the CRD types
# trigger metadata as a free string map, so a misspelt key would be ignored without this list.
PROMETHEUS_TRIGGER_KEYS = frozenset({
    "serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
    "ignoreNullValues", "queryParameters", "unsafeSsl", "timeout", "authModes"})

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
