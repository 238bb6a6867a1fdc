"""Day two: what an operator's `kubectl apply -k`, a rollout, a drain, a backup and an upgrade rely on.

Each point of issue 14 is pinned here (or by a check in checks.py, run on every overlay by
test_crossrefs.py and shown to fail on a broken copy below), so that it cannot come back.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import yaml

from services.search.config import SearchSettings
from tests.deploy import checks
from tests.deploy.crd_schemas import PROMETHEUS_TRIGGER_KEYS
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    Obj,
    container_env,
    find,
    image_name_tag,
    our_containers,
    overlays,
    pods,
    render,
)
from tests.deploy.test_validate import validation_errors

RULES = DEPLOY / "prometheus" / "rules" / "retrieval.rules.yml"
PRODUCTION = K8S / "overlays" / "production"


def _get(objs: list[Obj], kind: str, name: str) -> Obj:
    obj = find(objs, kind, name)
    assert obj is not None, f"{kind}/{name} missing"
    return obj


def _container(obj: Obj) -> Obj:
    spec = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    return dict(spec["template"]["spec"]["containers"][0])


def _production(rendered: dict[str, list[Obj]]) -> list[Obj]:
    return copy.deepcopy(rendered["overlays/production"])


# -- 1. `kubectl apply -k` does not undo the autoscaler --------------------------------------------------

def test_a_replicas_field_on_an_autoscaled_workload_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _production(rendered)
    _get(objs, "Deployment", "encoder")["spec"]["replicas"] = 2
    _get(objs, "Deployment", "search")["spec"]["replicas"] = 3
    problems = checks.autoscaled_targets(objs)
    assert {p.split(":")[0] for p in problems} == {"ScaledObject/encoder", "HorizontalPodAutoscaler/search"}


def test_two_autoscalers_on_one_workload_are_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _production(rendered)
    hpa = copy.deepcopy(_get(objs, "HorizontalPodAutoscaler", "search"))
    hpa["metadata"]["name"], hpa["spec"]["scaleTargetRef"]["name"] = "encoder-cpu", "encoder"
    objs.append(hpa)
    assert any("both scale Deployment/encoder" in p for p in checks.autoscaled_targets(objs))


# -- 2. The encoder scales on its queue saturation, not on CPU -------------------------------------------

def _encoder_scalers(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in checks.AUTOSCALER_KINDS
            and o["spec"]["scaleTargetRef"]["name"] == "encoder"]


@pytest.mark.parametrize("overlay", overlays())
def test_no_encoder_autoscaler_follows_cpu_or_memory(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for scaler in _encoder_scalers(rendered[overlay]):
        metrics = scaler["spec"].get("metrics", []) + scaler["spec"].get("triggers", [])
        kinds = {m.get("resource", {}).get("name") or m.get("type") for m in metrics}
        assert kinds and not kinds & {"cpu", "memory"}, f"{overlay}: {scaler['metadata']['name']} scales on {kinds}"


def test_production_encoder_scales_on_recorded_queue_saturation(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    [scaler] = _encoder_scalers(objs)
    assert scaler["kind"] == "ScaledObject" and validation_errors(scaler) == []
    [trigger] = scaler["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) <= PROMETHEUS_TRIGGER_KEYS, set(metadata) - PROMETHEUS_TRIGGER_KEYS
    # The query reads a series the rules record, in the namespace the overlay deploys to.
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    series = re.findall(r"([a-z_:]+)\{", metadata["query"])
    assert series and set(series) <= recorded, series
    assert 'namespace="retrieval"' in metadata["query"] and scaler["metadata"]["namespace"] == "retrieval"
    assert 0 < float(metadata["threshold"]) < 0.8  # below EncoderQueueSaturated's 0.8: scale before it fires
    assert metadata["ignoreNullValues"] == "false" and scaler["spec"]["fallback"]["replicas"] >= 2
    # Scale down slowly: a new encoder takes minutes to warm up.
    behavior = scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_a_misspelt_scaled_object_field_or_trigger_key_is_rejected(rendered: dict[str, list[Obj]]) -> None:
    scaler = _get(_production(rendered), "ScaledObject", "encoder")
    assert validation_errors(scaler) == []
    broken = copy.deepcopy(scaler)
    broken["spec"]["minReplicas"] = 2  # the field is minReplicaCount
    assert any("minReplicas" in e for e in validation_errors(broken))
    wrong_type = copy.deepcopy(scaler)
    wrong_type["spec"]["triggers"][0]["metadata"]["threshold"] = 0.5  # metadata values are strings
    assert any("threshold" in e or "0.5" in e for e in validation_errors(wrong_type))
    assert "serverAdress" not in PROMETHEUS_TRIGGER_KEYS and "serverAddress" in PROMETHEUS_TRIGGER_KEYS


# -- 3. Slow GPU rollouts are not reported as failed; a full pool can roll out ---------------------------

def test_a_deadline_shorter_than_the_startup_budget_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _production(rendered)
    encoder = _get(objs, "Deployment", "encoder")
    assert checks.startup_budget(_container(encoder)["startupProbe"]) >= 900
    del encoder["spec"]["progressDeadlineSeconds"]  # the default, 600 s
    assert any("Deployment/encoder" in p for p in checks.rollout_deadlines(objs))


def test_the_fixed_pool_component_rolls_out_without_a_spare_gpu(tmp_path: Path, k8s_copy: Path) -> None:
    overlay = tmp_path / "k8s"
    shutil.copytree(k8s_copy, overlay)
    kustomization = overlay / "overlays" / "production" / "kustomization.yaml"
    config = yaml.safe_load(kustomization.read_text())
    config["components"].append("../../components/gpu-fixed-pool")
    kustomization.write_text(yaml.safe_dump(config))
    objs = render(kustomization.parent)
    assert [e for o in objs for e in validation_errors(o)] == []
    strategy = _get(objs, "Deployment", "encoder")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert all(check(objs) == [] for check in checks.ALL_CHECKS)


# -- 4. Liveness does not use the gRPC worker pool -------------------------------------------------------

def test_a_grpc_liveness_probe_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _production(rendered)
    container = _get(objs, "Deployment", "encoder")["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"] = {"grpc": {"port": 50051, "service": "retrieval.v1.EncoderService"}}
    assert [p.split(" ")[0] for p in checks.liveness_probes(objs)] == ["Deployment/encoder"]


# -- 5. Backups: scheduled snapshots to an object store, credentials from a Secret ----------------------

def test_a_snapshot_cronjob_sends_qdrant_snapshots_off_the_cluster(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    cron = _get(objs, "CronJob", "qdrant-snapshot")
    assert len(cron["spec"]["schedule"].split()) == 5 and cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = _container(cron)
    assert container["command"] == ["python", "-m", "services.search.snapshots"] and container["args"][0] == "create"
    assert (Path(__file__).resolve().parents[2] / "services" / "search" / "snapshots.py").exists()
    # It reaches Qdrant as the search service does, with the full-access key (snapshots are writes).
    pod = next(p for p in pods(objs) if p.name == "CronJob/qdrant-snapshot")
    env = container_env(objs, pod, container)
    assert env["SEARCH_URL"].startswith("http://qdrant.") and env["SEARCH_API_KEY"] == "placeholder-qdrant-key"
    # Qdrant itself writes the snapshots to the bucket, with credentials from the Secret.
    qdrant = next(p for p in pods(objs) if p.name == "StatefulSet/qdrant")
    qenv = container_env(objs, qdrant, qdrant.containers()[0])
    assert qenv["QDRANT__STORAGE__SNAPSHOTS_CONFIG__SNAPSHOTS_STORAGE"] == "s3"
    assert qenv["QDRANT__STORAGE__SNAPSHOTS_CONFIG__S3_CONFIG__BUCKET"]
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in qdrant.containers()[0]["env"] if "valueFrom" in v}
    for var in ("ACCESS_KEY", "SECRET_KEY"):
        assert refs[f"QDRANT__STORAGE__SNAPSHOTS_CONFIG__S3_CONFIG__{var}"]["name"] == "qdrant-backup-s3"
    # One folder per peer: the start script appends the pod name to the prefix.
    script = " ".join(qdrant.containers()[0]["args"])
    assert 'S3_CONFIG__PREFIX="${QDRANT_SNAPSHOTS_S3_PREFIX}/${HOSTNAME}"' in script


def test_the_backup_job_can_reach_qdrant_and_qdrant_the_object_store(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    qdrant = _get(objs, "NetworkPolicy", "qdrant")["spec"]
    assert any(peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "qdrant-snapshot"}
               for rule in qdrant["ingress"] for peer in rule["from"])
    assert any({"protocol": "TCP", "port": 443} in rule.get("ports", []) for rule in qdrant["egress"])
    assert find(objs, "NetworkPolicy", "qdrant-snapshot") is not None


# -- 6. Qdrant: shard number from settings, zones, read-only scrape key ---------------------------------

@pytest.mark.parametrize("overlay", overlays())
def test_collections_get_an_explicit_layout_that_fits_the_cluster(rendered: dict[str, list[Obj]],
                                                                  overlay: str) -> None:
    objs = rendered[overlay]
    search = _get(objs, "ConfigMap", "search")["data"]
    qdrant = _get(objs, "ConfigMap", "qdrant")["data"]
    peers = _get(objs, "StatefulSet", "qdrant")["spec"]["replicas"]
    settings = SearchSettings(shard_number=search["SEARCH_SHARD_NUMBER"],
                              replication_factor=search["SEARCH_REPLICATION_FACTOR"],
                              write_consistency_factor=search["SEARCH_WRITE_CONSISTENCY_FACTOR"])
    assert settings.shard_number is not None and settings.replication_factor is not None
    # Every peer holds shards, each shard's copies fit on distinct peers, and the server's defaults agree.
    assert settings.shard_number >= peers and settings.replication_factor <= peers
    assert settings.replication_factor == int(qdrant["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"])


def test_production_leaves_room_to_grow_without_resharding(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    shards = int(_get(objs, "ConfigMap", "search")["data"]["SEARCH_SHARD_NUMBER"])
    peers = _get(objs, "StatefulSet", "qdrant")["spec"]["replicas"]
    assert shards >= 2 * peers and int(_get(objs, "ConfigMap", "search")["data"]["SEARCH_REPLICATION_FACTOR"]) >= 2


def test_prometheus_scrapes_qdrant_with_the_read_only_key(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    credentials = _get(objs, "ServiceMonitor", "qdrant")["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert credentials == {"name": "qdrant-api-key", "key": "read-only-api-key"}
    qdrant = next(p for p in pods(objs) if p.name == "StatefulSet/qdrant")
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"]["key"] for v in qdrant.containers()[0]["env"] if "valueFrom" in v}
    assert refs["QDRANT__SERVICE__READ_ONLY_API_KEY"] == "read-only-api-key"


@pytest.mark.parametrize("overlay", overlays())
def test_pods_spread_over_zones(rendered: dict[str, list[Obj]], overlay: str) -> None:
    for name in ("Deployment/encoder", "Deployment/search", "StatefulSet/qdrant"):
        pod = next(p for p in pods(rendered[overlay]) if p.name == name)
        keys = {c["topologyKey"] for c in pod.spec["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name


# -- 8. Network policies: namespaces by name; NodeLocal DNSCache ------------------------------------------

def test_a_namespace_selector_by_label_or_empty_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _production(rendered)
    ingress = _get(objs, "NetworkPolicy", "encoder")["spec"]["ingress"]
    ingress[0]["from"][1]["namespaceSelector"] = {}
    ingress[1]["from"][0]["namespaceSelector"] = {"matchLabels": {"retrieval.platform/client": "true"}}
    assert len(checks.namespace_selectors(objs)) == 2


def test_dns_egress_allows_nodelocal_dnscache(rendered: dict[str, list[Obj]]) -> None:
    dns = _get(rendered["overlays/production"], "NetworkPolicy", "allow-dns")["spec"]["egress"][0]
    assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in dns["to"]
    assert {"protocol": "UDP", "port": 53} in dns["ports"] and {"protocol": "TCP", "port": 53} in dns["ports"]


# -- 9. Images pinned by digest or by an explicit override; slim image for search and the evaluator ----

def test_production_pins_every_image_by_digest_or_an_explicit_override(rendered: dict[str, list[Obj]]) -> None:
    overrides = {i["name"]: i for i in yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())["images"]}
    assert all("newTag" in o or "digest" in o for o in overrides.values())
    base_images = {c["image"] for o in overlays() if o != "overlays/production"
                   for p in pods(rendered[o]) for c in p.containers()}
    problems = []
    for pod in pods(rendered["overlays/production"]):
        for container in pod.containers():
            if "@sha256:" in container["image"]:
                continue
            named = [n for n, o in overrides.items() if container["image"].startswith(o.get("newName", n) + ":")]
            if not named:
                problems.append(f"{pod.name}: {container['image']} is neither a digest nor set in images:")
    assert problems == []
    # Each base image name is covered (a new image added to base would otherwise run unpinned).
    assert {image_name_tag(i)[0] for i in base_images} <= set(overrides)


def test_an_image_without_an_override_is_caught(rendered: dict[str, list[Obj]]) -> None:
    overrides = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())["images"]
    assert "docker.io/qdrant/qdrant" in {o["name"] for o in overrides}
    unlisted = "docker.io/library/busybox:1.36"
    assert not any(unlisted.startswith(o.get("newName", o["name"]) + ":") for o in overrides)


def test_search_and_the_evaluator_run_the_slim_image(rendered: dict[str, list[Obj]]) -> None:
    for name, objs in rendered.items():
        for pod, container, service in our_containers(objs):
            repository = image_name_tag(container["image"])[0].rsplit("/", 1)[-1]
            if service != "encoder":
                assert repository == "retrieval-platform-slim", f"{name} {pod.name}"


# -- 10. Operations polish: PDBs, storage classes, claims ------------------------------------------------

def test_a_pdb_without_always_allow_and_a_read_only_many_claim_are_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _production(rendered)
    del _get(objs, "PodDisruptionBudget", "qdrant")["spec"]["unhealthyPodEvictionPolicy"]
    _get(objs, "PersistentVolumeClaim", "encoder-weights")["spec"]["accessModes"] = ["ReadOnlyMany"]
    assert [p.split(":")[0] for p in checks.disruption_budgets(objs)] == ["PodDisruptionBudget/qdrant"]
    assert [p.split(":")[0] for p in checks.claims(objs)] == ["PersistentVolumeClaim/encoder-weights"]


def test_production_claims_name_their_storage_class(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    found = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    templates = _get(objs, "StatefulSet", "qdrant")["spec"]["volumeClaimTemplates"]
    found |= {t["metadata"]["name"]: t["spec"] for t in templates}
    assert {name: spec.get("storageClassName") for name, spec in found.items()} == {
        "retrieval-datasets": "retrieval-shared", "evaluator-data": "retrieval-shared",
        "encoder-weights": "retrieval-shared", "qdrant-storage": "retrieval-ssd", "qdrant-snapshots": "retrieval-ssd"}
