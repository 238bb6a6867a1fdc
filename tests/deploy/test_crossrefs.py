"""The rendered objects refer to each other consistently; each check also fails on a broken copy."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from tests.deploy import checks
from tests.deploy.manifests import Obj, find, kustomizations, overlays

Check = Callable[[list[Obj]], list[str]]


def scenarios() -> list[tuple[str, str | None]]:
    """Each overlay alone, and each Job next to each overlay (it uses that overlay's objects)."""
    jobs = [name for name in kustomizations() if name.startswith("jobs/")]
    return [(o, None) for o in overlays()] + [(o, j) for o in overlays() for j in jobs]


def objects(rendered: dict[str, list[Obj]], overlay: str, job: str | None) -> list[Obj]:
    return rendered[overlay] + (rendered[job] if job else [])


@pytest.mark.parametrize("check", checks.ALL_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("overlay", "job"), scenarios())
def test_consistent(rendered: dict[str, list[Obj]], overlay: str, job: str | None, check: Check) -> None:
    assert check(objects(rendered, overlay, job)) == []


def _broken(rendered: dict[str, list[Obj]], overlay: str = "overlays/production") -> list[Obj]:
    return copy.deepcopy(rendered[overlay])


def _get(objs: list[Obj], kind: str, name: str) -> Obj:
    obj = find(objs, kind, name)
    assert obj is not None, f"{kind}/{name} missing"
    return obj


def _container(objs: list[Obj], kind: str, name: str) -> Obj:
    return dict(_get(objs, kind, name)["spec"]["template"]["spec"]["containers"][0])


def test_a_service_selecting_nothing_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "Service", "encoder-headless")["spec"]["selector"] = {"app.kubernetes.io/name": "encoderr"}
    assert any("encoder-headless" in p and "matches no pod" in p for p in checks.service_selectors(objs))


def test_a_service_target_port_missing_from_the_pods_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "Service", "search-headless")["spec"]["ports"][1]["targetPort"] = "metrix"
    assert any("'metrix'" in p for p in checks.service_selectors(objs))


def test_a_grpc_probe_on_the_metrics_port_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    deployment = _get(objs, "Deployment", "encoder")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = 9101
    assert any("readinessProbe" in p for p in checks.probe_ports(objs))


def test_an_http_probe_on_an_undeclared_port_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    sts = _get(objs, "StatefulSet", "qdrant")
    sts["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = "rest"
    assert any("livenessProbe" in p and "'rest'" in p for p in checks.probe_ports(objs))


def test_a_service_monitor_port_name_missing_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "ServiceMonitor", "retrieval")["spec"]["endpoints"][0]["port"] = "prometheus"
    assert any("'prometheus'" in p for p in checks.service_monitors(objs))


def test_a_missing_secret_key_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    secret = _get(objs, "Secret", "retrieval-api-token")
    secret["data"] = {"api-token": secret["data"]["token"]}
    problems = checks.config_references(objs)
    assert {p.split(" ")[0] for p in problems if "has no key 'token'" in p} == {
        "Deployment/encoder", "Deployment/search", "Deployment/evaluator"}


def test_a_missing_config_map_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = [o for o in _broken(rendered) if not (o["kind"] == "ConfigMap" and o["metadata"]["name"] == "qdrant")]
    assert any("envFrom ConfigMap qdrant does not exist" in p for p in checks.config_references(objs))


def test_a_missing_claim_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = [o for o in _broken(rendered) if o["kind"] != "PersistentVolumeClaim"]
    assert any("encoder-weights does not exist" in p for p in checks.config_references(objs))


def test_a_network_policy_port_name_missing_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "NetworkPolicy", "search")["spec"]["egress"][0]["ports"][1]["port"] = "grcp"
    assert any("'grcp'" in p for p in checks.network_policies(objs))


def test_an_address_to_a_clusterip_service_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    config = _get(objs, "ConfigMap", "evaluator")
    config["data"]["EVALUATOR_ENCODER_ADDRESS"] = "dns:///encoder.retrieval.svc.cluster.local:50051"
    assert any("headless" in p for p in checks.service_addresses(objs))


def test_an_address_in_another_namespace_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "ConfigMap", "search")["data"]["SEARCH_URL"] = "http://qdrant.default.svc.cluster.local:6333"
    assert any("no Service qdrant in namespace default" in p for p in checks.service_addresses(objs))


def test_a_statefulset_without_its_headless_service_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "Service", "qdrant-headless")["spec"]["clusterIP"] = "10.0.0.10"
    assert any("qdrant-headless" in p for p in checks.statefulset_services(objs))


def test_an_unpinned_image_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "StatefulSet", "qdrant")["spec"]["template"]["spec"]["containers"][0]["image"] = "qdrant/qdrant"
    _get(objs, "Deployment", "search")["spec"]["template"]["spec"]["containers"][0]["image"] = "x/y:latest"
    assert len(checks.pinned_images(objs)) == 2


def test_a_writable_root_filesystem_and_missing_limits_are_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    container = _get(objs, "Deployment", "evaluator")["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    del container["resources"]["limits"]["memory"]
    problems = checks.hardening(objs)
    assert any("writable" in p for p in problems) and any("no limits for memory" in p for p in problems)


def test_a_pdb_and_an_hpa_pointing_nowhere_are_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    _get(objs, "HorizontalPodAutoscaler", "search")["spec"]["scaleTargetRef"]["name"] = "searcher"
    _get(objs, "PodDisruptionBudget", "qdrant")["spec"]["selector"]["matchLabels"] = {"app": "qdrant"}
    problems = checks.workload_selectors(objs)
    assert any("searcher" in p for p in problems) and any("PodDisruptionBudget/qdrant" in p for p in problems)


def test_a_network_policy_peer_matching_nothing_is_caught(rendered: dict[str, list[Obj]]) -> None:
    objs = _broken(rendered)
    peers = _get(objs, "NetworkPolicy", "clients-egress")["spec"]["egress"][0]["to"]
    peers[1]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] = "serch"
    assert any("'serch'" in p and "matches no pod" in p for p in checks.network_policies(objs))
