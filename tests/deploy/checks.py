"""Cross-reference checks over rendered objects. Each returns the problems it finds ([] = consistent).

They are plain functions so that the tests can run them on the real renders (expecting no problem)
and on deliberately broken copies (expecting the problem), which shows that each check can fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from tests.deploy.manifests import Obj, Pod, find, image_name_tag, our_containers, pods, selects


def _by_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def _ns(obj: Obj) -> str:
    return str(obj["metadata"].get("namespace", ""))


def _name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _selected_pods(objs: list[Obj], namespace: str, selector: Obj | None) -> list[Pod]:
    return [p for p in pods(objs) if p.namespace == namespace and selects(selector, p.labels)]


def _port_exists(pod: Pod, container: Obj | None, port: int | str) -> bool:
    """A named port of the container (or, without one, of any container), or a declared number."""
    containers = [container] if container is not None else pod.containers()
    declared = [p for c in containers for p in c.get("ports", [])]
    if isinstance(port, str):
        return any(p.get("name") == port for p in declared)
    return any(int(p["containerPort"]) == port for p in declared)


def service_selectors(objs: list[Obj]) -> list[str]:
    """Every Service selects at least one pod template, whose containers have each targetPort."""
    problems = []
    for svc in _by_kind(objs, "Service"):
        selector = svc["spec"].get("selector")
        selected = _selected_pods(objs, _ns(svc), selector)
        if not selected:
            problems.append(f"{_name(svc)}: selector {selector} matches no pod template")
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            problems += [f"{_name(svc)}: port {port.get('name')} targets {target!r}, absent from {p.name}"
                         for p in selected if not _port_exists(p, None, target)]
    return problems


def workload_selectors(objs: list[Obj]) -> list[str]:
    """Workloads select their own template; PDBs select a workload; HPAs scale one that has CPU requests."""
    problems = []
    for pod in pods(objs):
        selector = pod.owner["spec"].get("selector")
        if pod.owner["kind"] not in ("Job", "CronJob") and not selects(selector, pod.labels):
            problems.append(f"{pod.name}: selector {selector} does not match its own pod template")
    for pdb in _by_kind(objs, "PodDisruptionBudget"):
        if not _selected_pods(objs, _ns(pdb), pdb["spec"].get("selector")):
            problems.append(f"{_name(pdb)}: selector matches no pod template")
    for hpa in _by_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = find(objs, ref["kind"], ref["name"], _ns(hpa))
        if target is None:
            problems.append(f"{_name(hpa)}: scale target {ref['kind']}/{ref['name']} does not exist")
            continue
        uses_cpu = any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", []))
        containers = target["spec"]["template"]["spec"]["containers"]
        if uses_cpu and not all("cpu" in c.get("resources", {}).get("requests", {}) for c in containers):
            problems.append(f"{_name(hpa)}: CPU utilisation needs CPU requests on every container of the target")
    return problems


def probe_ports(objs: list[Obj]) -> list[str]:
    """Probe ports exist on the container; gRPC probes (a number only) hit the port named grpc."""
    problems = []
    for pod in pods(objs):
        for container in pod.containers():
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(probe_name)
                if probe is None:
                    continue
                where = f"{pod.name} {container['name']} {probe_name}"
                if "grpc" in probe:
                    names = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
                    if names.get(probe["grpc"]["port"]) != "grpc":
                        problems.append(f"{where}: gRPC probe port {probe['grpc']['port']} is not the port named grpc")
                for action in ("httpGet", "tcpSocket"):
                    if action in probe and not _port_exists(pod, container, probe[action]["port"]):
                        problems.append(f"{where}: port {probe[action]['port']!r} is not declared")
    return problems


def service_monitors(objs: list[Obj]) -> list[str]:
    """ServiceMonitors select Services that have the endpoint's port name; credentials exist."""
    problems = []
    for monitor in _by_kind(objs, "ServiceMonitor"):
        spec = monitor["spec"]
        services = [s for s in _by_kind(objs, "Service")
                    if _ns(s) == _ns(monitor) and selects(spec["selector"], s["metadata"].get("labels", {}))]
        if not services:
            problems.append(f"{_name(monitor)}: selector matches no Service")
        for endpoint in spec.get("endpoints", []):
            problems += [f"{_name(monitor)}: {_name(s)} has no port named {endpoint.get('port')!r}"
                         for s in services if endpoint.get("port") not in {p.get("name") for p in s["spec"]["ports"]}]
            credentials = endpoint.get("authorization", {}).get("credentials")
            if credentials is not None:
                problems += _missing_key(objs, _ns(monitor), "Secret", credentials, f"{_name(monitor)} authorization")
        if spec.get("jobLabel") and any(spec["jobLabel"] not in s["metadata"].get("labels", {}) for s in services):
            problems.append(f"{_name(monitor)}: a selected Service lacks the job label {spec['jobLabel']}")
    return problems


def _missing_key(objs: list[Obj], namespace: str, kind: str, ref: Obj, where: str) -> list[str]:
    if ref.get("optional"):
        return []
    obj = find(objs, kind, ref["name"], namespace)
    if obj is None:
        return [f"{where}: {kind} {ref['name']} does not exist"]
    keys = {*obj.get("data", {}), *obj.get("stringData", {})}
    return [] if ref["key"] in keys else [f"{where}: {kind} {ref['name']} has no key {ref['key']!r}"]


def config_references(objs: list[Obj]) -> list[str]:
    """env valueFrom, envFrom, volumes (ConfigMap, Secret, PVC), volume mounts and service accounts exist."""
    problems = []
    for pod in pods(objs):
        ns = pod.namespace
        for container in pod.containers():
            where = f"{pod.name} {container['name']}"
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    problems += _missing_key(objs, ns, "ConfigMap", source["configMapKeyRef"], f"{where} {env['name']}")
                if "secretKeyRef" in source:
                    problems += _missing_key(objs, ns, "Secret", source["secretKeyRef"], f"{where} {env['name']}")
            for env_from in container.get("envFrom", []):
                for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    ref = env_from.get(field)
                    if ref and not ref.get("optional") and find(objs, kind, ref["name"], ns) is None:
                        problems.append(f"{where}: envFrom {kind} {ref['name']} does not exist")
            volumes = {v["name"] for v in pod.spec.get("volumes", [])}
            volumes |= {t["metadata"]["name"] for t in pod.owner["spec"].get("volumeClaimTemplates", [])}
            problems += [f"{where}: mounts undeclared volume {m['name']}"
                         for m in container.get("volumeMounts", []) if m["name"] not in volumes]
        for volume in pod.spec.get("volumes", []):
            for field, kind, name_field in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName"),
                                            ("persistentVolumeClaim", "PersistentVolumeClaim", "claimName")):
                ref = volume.get(field)
                if ref and not ref.get("optional") and find(objs, kind, ref[name_field], ns) is None:
                    problems.append(f"{pod.name}: volume {volume['name']}: {kind} {ref[name_field]} does not exist")
        account = pod.spec.get("serviceAccountName")
        if account and find(objs, "ServiceAccount", account, ns) is None:
            problems.append(f"{pod.name}: ServiceAccount {account} does not exist")
    return problems


def network_policies(objs: list[Obj]) -> list[str]:
    """Policies select pods; peers named by a podSelector of this namespace exist; named ports exist on
    the pods they apply to (the policy's own pods for ingress, the peers for egress)."""
    problems = []
    for policy in _by_kind(objs, "NetworkPolicy"):
        ns, spec = _ns(policy), policy["spec"]
        targets = _selected_pods(objs, ns, spec["podSelector"]) if spec["podSelector"] else list(pods(objs))
        if not targets:
            problems.append(f"{_name(policy)}: podSelector matches no pod template")
        for direction, peers_field in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction, []):
                peers = []
                # Peers in other namespaces (namespaceSelector) are outside this render: not checked.
                for peer in rule.get(peers_field, []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        matched = _selected_pods(objs, ns, peer["podSelector"])
                        if not matched:
                            problems.append(f"{_name(policy)}: {direction} peer {peer['podSelector']} matches no pod")
                        peers += matched
                problems += _named_ports(policy, rule, targets if direction == "ingress" else peers)
    return problems


def _named_ports(policy: Obj, rule: Obj, pods_: list[Pod]) -> list[str]:
    problems = []
    for port in rule.get("ports", []):
        name = port.get("port")
        if isinstance(name, str):
            problems += [f"{_name(policy)}: {p.name} has no port named {name!r}"
                         for p in pods_ if name not in p.port_names()]
    return problems


def statefulset_services(objs: list[Obj]) -> list[str]:
    """A StatefulSet's serviceName is a headless Service that selects its pods (stable peer DNS names)."""
    problems = []
    for sts in _by_kind(objs, "StatefulSet"):
        svc = find(objs, "Service", sts["spec"]["serviceName"], _ns(sts))
        labels = sts["spec"]["template"]["metadata"]["labels"]
        if svc is None or svc["spec"].get("clusterIP") != "None" or not selects(svc["spec"].get("selector"), labels):
            problems.append(f"{_name(sts)}: serviceName {sts['spec']['serviceName']} is not a headless Service "
                            "selecting its pods")
        script = " ".join(" ".join(c.get("args", [])) for c in sts["spec"]["template"]["spec"]["containers"])
        if "--bootstrap" in script and f".{sts['spec']['serviceName']}:" not in script:
            problems.append(f"{_name(sts)}: peer addresses do not use the serviceName's DNS names")
    return problems


_IN_CLUSTER = re.compile(r"^(?:(?P<scheme>[a-z]+):(?://)?/?)?(?P<host>[a-z0-9-]+\.[a-z0-9-]+\.svc\.cluster\.local)"
                         r":(?P<port>\d+)")


def service_addresses(objs: list[Obj]) -> list[str]:
    """In-cluster addresses in ConfigMaps name a Service of their namespace with that port; gRPC
    addresses of our services (dns:///) name a headless Service so that clients balance per call."""
    problems = []
    for config in _by_kind(objs, "ConfigMap"):
        for name, value in config.get("data", {}).items():
            match = _IN_CLUSTER.match(str(value))
            if match is None:
                continue
            service, namespace = match["host"].split(".")[:2]
            svc = find(objs, "Service", service, namespace)
            where = f"{_name(config)} {name}={value}"
            if svc is None:
                problems.append(f"{where}: no Service {service} in namespace {namespace}")
                continue
            if int(match["port"]) not in {p["port"] for p in svc["spec"]["ports"]}:
                problems.append(f"{where}: Service {service} has no port {match['port']}")
            if match["scheme"] == "dns" and svc["spec"].get("clusterIP") != "None":
                problems.append(f"{where}: dns:/// round robin needs a headless Service, {service} is not")
    search = find(objs, "ConfigMap", "search")
    if search is not None and "SEARCH_GRPC_PORT" in search.get("data", {}):
        host = urlsplit(search["data"]["SEARCH_URL"]).hostname or ""
        svc = find(objs, "Service", host.split(".")[0], host.split(".")[1] if "." in host else None)
        ports = {p["port"] for p in svc["spec"]["ports"]} if svc else set()
        if int(search["data"]["SEARCH_GRPC_PORT"]) not in ports:
            problems.append(f"ConfigMap/search: SEARCH_GRPC_PORT is not a port of the SEARCH_URL Service {host}")
    return problems


def pinned_images(objs: list[Obj]) -> list[str]:
    """Every image has an explicit tag other than latest, or a digest."""
    problems = []
    for pod in pods(objs):
        for container in pod.containers():
            _, tag = image_name_tag(container["image"])
            if tag in ("", "latest"):
                problems.append(f"{pod.name} {container['name']}: image {container['image']} is not pinned")
    return problems


def hardening(objs: list[Obj]) -> list[str]:
    """Non-root, read-only root filesystem, no privilege escalation, all capabilities dropped,
    requests and limits for CPU and memory, and no service-account token in the pod."""
    problems = []
    for pod in pods(objs):
        pod_security = pod.spec.get("securityContext", {})
        if pod.spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{pod.name}: mounts a service-account token")
        for container in pod.containers():
            where = f"{pod.name} {container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            if security.get("runAsNonRoot") is not True or security.get("runAsUser", 0) == 0:
                problems.append(f"{where}: may run as root")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allows privilege escalation")
            if "ALL" not in security.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: does not drop all capabilities")
            resources = container.get("resources", {})
            for section in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(section, {}))
                if missing:
                    problems.append(f"{where}: no {section} for {', '.join(sorted(missing))}")
    return problems


AUTOSCALER_KINDS = ("HorizontalPodAutoscaler", "ScaledObject")
# What the Deployment controller assumes without progressDeadlineSeconds; probe defaults likewise.
DEFAULT_PROGRESS_DEADLINE = 600
# Scheduling, an image pull and readiness after the startup probe passes: what a rollout deadline must
# allow beyond the startup budget.
ROLLOUT_MARGIN_SECONDS = 300
METADATA_NAME = "kubernetes.io/metadata.name"


def autoscaled_targets(objs: list[Obj]) -> list[str]:
    """Every HPA and KEDA ScaledObject scales an existing workload that carries no ``replicas`` (which each
    ``kubectl apply`` would reset), and no workload has two autoscalers."""
    problems = []
    owners: dict[tuple[str, str, str], str] = {}
    for scaler in [o for o in objs if o["kind"] in AUTOSCALER_KINDS]:
        ref = scaler["spec"]["scaleTargetRef"]
        kind = ref.get("kind", "Deployment")
        target = find(objs, kind, ref["name"], _ns(scaler))
        if target is None:
            problems.append(f"{_name(scaler)}: scale target {kind}/{ref['name']} does not exist")
            continue
        if "replicas" in target["spec"]:
            problems.append(f"{_name(scaler)}: its target {_name(target)} sets replicas, which kubectl apply resets")
        key = (kind, _ns(scaler), ref["name"])
        if key in owners:
            problems.append(f"{_name(scaler)} and {owners[key]} both scale {kind}/{ref['name']}")
        owners[key] = _name(scaler)
    return problems


def startup_budget(probe: Obj | None) -> int:
    """Seconds a startup probe allows before the kubelet restarts the container (0 without one)."""
    if probe is None:
        return 0
    return int(probe.get("initialDelaySeconds", 0)) + int(probe.get("periodSeconds", 10)) * int(
        probe.get("failureThreshold", 3))


def rollout_deadlines(objs: list[Obj]) -> list[str]:
    """A Deployment's progressDeadlineSeconds covers its pods' startup budget plus a margin, so that a slow,
    healthy rollout is not reported as failed."""
    problems = []
    for deployment in _by_kind(objs, "Deployment"):
        deadline = int(deployment["spec"].get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE))
        containers = deployment["spec"]["template"]["spec"]["containers"]
        budget = max(startup_budget(c.get("startupProbe")) for c in containers)
        if deadline < budget + ROLLOUT_MARGIN_SECONDS:
            problems.append(f"{_name(deployment)}: progressDeadlineSeconds {deadline} < startup budget {budget} s "
                            f"+ {ROLLOUT_MARGIN_SECONDS} s")
    return problems


def liveness_probes(objs: list[Obj]) -> list[str]:
    """Our services' liveness never asks the gRPC health service: that call needs a free worker of the pool
    that serves the real calls, so under load it would fail and restart the busiest pods."""
    return [f"{pod.name} {container['name']}: liveness uses the gRPC worker pool ({sorted(probe)})"
            for pod, container, _ in our_containers(objs)
            if (probe := container.get("livenessProbe")) is not None and "tcpSocket" not in probe]


def namespace_selectors(objs: list[Obj]) -> list[str]:
    """NetworkPolicy peers in other namespaces are named by ``kubernetes.io/metadata.name`` (set by the API
    server, so only the policy's author decides), never by a label anyone may set, never by ``{}``."""
    problems = []
    for policy in _by_kind(objs, "NetworkPolicy"):
        for direction, field in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(direction, []):
                for peer in rule.get(field, []):
                    selector = peer.get("namespaceSelector")
                    if selector is None:
                        continue
                    keys = {*selector.get("matchLabels", {}),
                            *(e["key"] for e in selector.get("matchExpressions", []) if e["operator"] == "In")}
                    others = [e for e in selector.get("matchExpressions", []) if e["operator"] != "In"]
                    if keys != {METADATA_NAME} or others:
                        problems.append(f"{_name(policy)}: {direction} namespaceSelector {selector} does not name "
                                        f"namespaces by {METADATA_NAME}")
    return problems


def disruption_budgets(objs: list[Obj]) -> list[str]:
    """PDBs let unhealthy pods be evicted (``AlwaysAllow``): a crash-looping pod must not block drains."""
    return [f"{_name(pdb)}: unhealthyPodEvictionPolicy is not AlwaysAllow"
            for pdb in _by_kind(objs, "PodDisruptionBudget")
            if pdb["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow"]


def claims(objs: list[Obj]) -> list[str]:
    """No ReadOnlyMany claims: many drivers provision them empty and nothing could fill them."""
    found = [*_by_kind(objs, "PersistentVolumeClaim"),
             *(t for sts in _by_kind(objs, "StatefulSet") for t in sts["spec"].get("volumeClaimTemplates", []))]
    return [f"PersistentVolumeClaim/{c['metadata']['name']}: ReadOnlyMany cannot be filled; use ReadWriteMany "
            "mounted read-only" for c in found if "ReadOnlyMany" in c["spec"].get("accessModes", [])]


ALL_CHECKS = (service_selectors, workload_selectors, probe_ports, service_monitors, config_references,
              network_policies, statefulset_services, service_addresses, pinned_images, hardening,
              autoscaled_targets, rollout_deadlines, liveness_probes, namespace_selectors, disruption_budgets,
              claims)

