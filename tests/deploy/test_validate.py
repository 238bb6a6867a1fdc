"""Every kustomization renders, and every object validates strictly against the pinned Kubernetes version."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.crd_schemas import SCHEMAS
from tests.deploy.manifests import K8S_VERSION, Obj, find, kustomizations, overlays


def validation_errors(obj: Obj) -> list[str]:
    """Strict schema errors of one object: kubernetes-validate, or our CRD subset for CRD kinds."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        schema = SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        if schema is None:
            return [f"{where}: no schema for {obj['apiVersion']} {obj['kind']} (add one to crd_schemas.py)"]
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
    except kubernetes_validate.ValidationError as exc:
        return [f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_the_pinned_version_has_schemas() -> None:
    # A newer kubernetes-validate without 1.37 schemas would otherwise fall back silently.
    assert K8S_VERSION in kubernetes_validate.utils.all_versions()


def test_every_overlay_and_job_is_found() -> None:
    assert {"overlays/cpu-dev", "overlays/production", "jobs/benchmark-run"} <= set(kustomizations())


@pytest.mark.parametrize("name", sorted(kustomizations()))
def test_objects_validate_strictly(rendered: dict[str, list[Obj]], name: str) -> None:
    objs = rendered[name]
    assert objs, f"{name} rendered nothing"
    errors = [e for obj in objs for e in validation_errors(obj)]
    assert errors == []


def test_a_misspelt_field_is_rejected(rendered: dict[str, list[Obj]]) -> None:
    deployment = find(rendered["overlays/cpu-dev"], "Deployment", "encoder")
    assert deployment is not None and validation_errors(deployment) == []
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["serviceName"] = "x"
    assert any("serviceName" in e for e in validation_errors(broken))
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    assert any("replicas" in e for e in validation_errors(wrong_type))


def test_a_broken_custom_resource_is_rejected(rendered: dict[str, list[Obj]]) -> None:
    monitor = find(rendered["overlays/production"], "ServiceMonitor", "qdrant")
    assert monitor is not None and validation_errors(monitor) == []
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # the field is `interval`
    assert any("scrapeInterval" in e for e in validation_errors(broken))
    rule = find(rendered["overlays/production"], "PrometheusRule", "retrieval")
    assert rule is not None and validation_errors(rule) == []
    bad_duration = copy.deepcopy(rule)
    bad_duration["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"
    assert any("5 minutes" in e for e in validation_errors(bad_duration))


def test_the_kubernetes_validate_command_accepts_the_render_and_rejects_a_broken_one(
        rendered: dict[str, list[Obj]], tmp_path: Path) -> None:
    """The PyPI command itself, as CI scripts would call it, on a whole overlay."""
    good = tmp_path / "production.yaml"
    good.write_text(yaml.safe_dump_all(rendered["overlays/production"]))
    objs = copy.deepcopy(rendered["overlays/production"])
    statefulset = next(o for o in objs if o["kind"] == "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    bad = tmp_path / "broken.yaml"
    bad.write_text(yaml.safe_dump_all(objs))
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, "--quiet", "--no-warn"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    failed = subprocess.run([*command, str(bad)], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert "readOnlyRootFilesytem" in failed.stdout


@pytest.mark.parametrize("name", overlays())
def test_every_object_lands_in_one_namespace(rendered: dict[str, list[Obj]], name: str) -> None:
    namespaces = {o["metadata"].get("namespace") for o in rendered[name] if o["kind"] != "Namespace"}
    declared = [o["metadata"]["name"] for o in rendered[name] if o["kind"] == "Namespace"]
    assert namespaces == set(declared) and len(declared) == 1
