"""What the overlays promise: GPU only for the encoder, Qdrant's own cluster, probes, scaling, policies."""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import REPO, Obj, container_env, find, image_name_tag, our_containers, overlays, pods

PROTOS = REPO / "protos" / "retrieval" / "v1"


def _pod_spec(objs: list[Obj], kind: str, name: str) -> Obj:
    obj = find(objs, kind, name)
    assert obj is not None, f"{kind}/{name} missing"
    return dict(obj["spec"]["template"]["spec"])


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity ("4", "500m") in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def health_service_name(service: str) -> str:
    """retrieval.v1.<Name>Service from the service's .proto, the name its health status is set under."""
    text = (PROTOS / f"{service}.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.M)
    name = re.search(r"^service\s+(\w+)\s*\{", text, re.M)
    assert package and name
    return f"{package[1]}.{name[1]}"


@pytest.mark.parametrize("overlay", overlays())
def test_gpus_only_for_the_encoder(rendered: dict[str, list[Obj]], overlay: str) -> None:
    with_gpu = {(pod.name, c["name"]) for pod in pods(rendered[overlay]) for c in pod.containers()
                if "nvidia.com/gpu" in {**c.get("resources", {}).get("limits", {}),
                                        **c.get("resources", {}).get("requests", {})}}
    expected = {("Deployment/encoder", "encoder")} if overlay == "overlays/production" else set()
    assert with_gpu == expected


def test_production_encoder_runs_on_gpu_nodes_with_the_cuda_image(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    spec = _pod_spec(objs, "Deployment", "encoder")
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert image_name_tag(container["image"])[0].endswith("/retrieval-platform-cuda")
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    # Big models load for minutes: the startup budget must cover that, readiness must not.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert container_env(objs, next(p for p in pods(objs) if p.name == "Deployment/encoder"),
                         container)["ENCODER_DEVICE"] == "cuda"


@pytest.mark.parametrize("overlay", overlays())
def test_services_listen_on_their_named_ports_with_native_grpc_probes(
        rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    found = set()
    for pod, container, service in our_containers(objs):
        if pod.owner["kind"] != "Deployment":
            continue  # Jobs and CronJobs run a command to its end: no ports, no probes
        env = container_env(objs, pod, container)
        prefix = service.upper()
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert set(ports) == {"grpc", "metrics"}
        assert env[f"{prefix}_HOST"] == "0.0.0.0"
        assert (int(env[f"{prefix}_PORT"]), int(env[f"{prefix}_METRICS_PORT"])) == (ports["grpc"], ports["metrics"])
        health = health_service_name(service)
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["grpc"] == {"port": ports["grpc"], "service": health}, probe
        # Liveness is a TCP check on the gRPC port: the health call would need a free worker of the pool
        # that serves real calls (and search's health follows Qdrant's reachability).
        liveness = container["livenessProbe"]
        assert {k: v for k, v in liveness.items() if k in ("grpc", "tcpSocket")} == {"tcpSocket": {"port": "grpc"}}
        found.add(service)
    assert found == {"encoder", "search", "evaluator"}


@pytest.mark.parametrize("overlay", overlays())
def test_search_uses_the_qdrant_server_backend(rendered: dict[str, list[Obj]], overlay: str) -> None:
    config = find(rendered[overlay], "ConfigMap", "search")
    assert config is not None
    assert config["data"]["SEARCH_BACKEND"] == "server"
    assert config["data"]["SEARCH_URL"].startswith("http://qdrant.")


def test_production_qdrant_is_a_replicated_three_peer_cluster(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    sts = find(objs, "StatefulSet", "qdrant")
    config = find(objs, "ConfigMap", "qdrant")
    assert sts is not None and config is not None
    assert sts["spec"]["replicas"] == 3
    assert config["data"]["QDRANT__CLUSTER__ENABLED"] == "true"
    assert int(config["data"]["QDRANT__STORAGE__COLLECTION__REPLICATION_FACTOR"]) >= 2
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"docker\.io/qdrant/qdrant:v\d+\.\d+\.\d+", container["image"])
    p2p = int(config["data"]["QDRANT__CLUSTER__P2P__PORT"])
    assert {"name": "p2p", "containerPort": p2p, "protocol": "TCP"} in container["ports"]
    headless = find(objs, "Service", sts["spec"]["serviceName"])
    assert headless is not None and headless["spec"]["publishNotReadyAddresses"] is True
    assert p2p in {p["port"] for p in headless["spec"]["ports"]}
    spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {(c["topologyKey"], c["whenUnsatisfiable"]) for c in spread} == {
        ("topology.kubernetes.io/zone", "DoNotSchedule"), ("kubernetes.io/hostname", "DoNotSchedule")}
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["qdrant-storage"] == config["data"]["QDRANT__STORAGE__STORAGE_PATH"]
    assert {"qdrant-storage", "qdrant-snapshots"} <= claims


def test_production_scales_and_survives_disruptions(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/production"]
    hpas = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"search"} and hpas["search"]["minReplicas"] >= 2
    # The encoder's HPA is KEDA's, made from its ScaledObject.
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o["spec"] for o in objs if o["kind"] == "ScaledObject"}
    assert set(scaled) == {"encoder"} and scaled["encoder"]["minReplicaCount"] >= 2
    budgets = {o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert budgets == {p.owner["metadata"]["name"] for p in pods(objs) if p.owner["kind"] in ("Deployment",
                                                                                               "StatefulSet")}
    deny = find(objs, "NetworkPolicy", "default-deny")
    assert deny is not None and deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_cpu_dev_is_one_small_replica_each(rendered: dict[str, list[Obj]]) -> None:
    objs = rendered["overlays/cpu-dev"]
    assert {p.name: p.owner["spec"].get("replicas") for p in pods(objs)} == {
        "Deployment/encoder": 1, "Deployment/search": 1, "Deployment/evaluator": 1, "StatefulSet/qdrant": 1}
    assert not [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]


@pytest.mark.parametrize("overlay", overlays())
def test_encoder_thread_pools_fit_the_cpu_limit(rendered: dict[str, list[Obj]], overlay: str) -> None:
    """Thread counts default to the node's cores; under a CPU limit that oversubscribes the container."""
    objs = rendered[overlay]
    pod, container, _ = next(t for t in our_containers(objs) if t[2] == "encoder")
    env = container_env(objs, pod, container)
    limit = cpu_cores(str(container["resources"]["limits"]["cpu"]))
    for var in ("ENCODER_DECODE_WORKERS", "ENCODER_TORCH_THREADS"):
        assert 0 < int(env[var]) <= limit, var
