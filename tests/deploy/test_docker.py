"""The Dockerfiles install the package as the README does, and build the images the manifests name.

No Docker engine here: these are static checks of the Dockerfiles against pyproject.toml,
scripts/setup.sh (the README's install) and the rendered manifests.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.deploy.manifests import DEPLOY, REPO, Obj, image_name_tag, our_containers

DOCKER = DEPLOY / "docker"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# Image (name:tag) -> the Dockerfile that builds it (deploy/docker/build.sh tags them so).
VARIANTS = {f"retrieval-platform:{VERSION}": DOCKER / "Dockerfile.cpu",
            f"retrieval-platform-cuda:{VERSION}": DOCKER / "Dockerfile.cuda",
            f"retrieval-platform-slim:{VERSION}": DOCKER / "Dockerfile.slim"}
# What each one installs: the encoder's images the `encoder` extra (torch, the models), slim the core only.
INSTALLS = {DOCKER / "Dockerfile.cpu": ".[encoder]", DOCKER / "Dockerfile.cuda": ".[encoder]",
            DOCKER / "Dockerfile.slim": "."}
SLIM = f"retrieval-platform-slim:{VERSION}"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def pip_installs(command: str) -> list[tuple[list[str], bool]]:
    """(targets, editable) of each `pip install` in a shell command line (options dropped)."""
    found = []
    for part in re.split(r"&&|;|\n", command):
        words = shlex.split(part, comments=True)
        if "pip" in words and words[words.index("pip") + 1:words.index("pip") + 2] == ["install"]:
            args = words[words.index("pip") + 2:]
            found.append(([a for a in args if not a.startswith("-")], "-e" in args or "--editable" in args))
    return found


def package_roots() -> set[str]:
    """Top-level source folders the package is built from (setuptools packages.find + readme)."""
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    roots = set()
    for where in find["where"]:
        for pattern in find["include"]:
            for path in (REPO / where).glob(pattern.rstrip("*")):
                if path.is_dir() and (path / "__init__.py").exists():
                    roots.add(str(path.relative_to(REPO).parts[0]))
    return roots | {"pyproject.toml", PYPROJECT["project"]["readme"]}


@pytest.mark.parametrize("dockerfile", sorted(VARIANTS.values()), ids=lambda p: p.name)
def test_installs_the_package_as_the_readme_does(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    readme = [t for t, _ in pip_installs((REPO / "scripts" / "setup.sh").read_text()) if t != ["pip"]]
    assert readme == [[".[encoder,dev]"]], "scripts/setup.sh (the README's install) changed: update this test"
    installs = [i for op, rest in steps if op == "RUN" for i in pip_installs(rest) if i[0] != ["pip"]]
    # The same target as the README, the repository itself, but not editable and without the dev extra.
    assert installs == [([INSTALLS[dockerfile]], False)], installs
    copied = {src.rstrip("/").removeprefix("./") for op, rest in steps if op == "COPY" and "--from" not in rest
              for src in shlex.split(rest)[:-1]}
    assert package_roots() <= copied, f"not copied into the build: {package_roots() - copied}"
    ignore = (Path(f"{dockerfile}.dockerignore")).read_text().splitlines()
    assert {line[1:].split("/")[0] for line in ignore if line.startswith("!")} >= package_roots()


@pytest.mark.parametrize("dockerfile", sorted(VARIANTS.values()), ids=lambda p: p.name)
def test_runs_non_root_offline_with_the_retrieval_entrypoint(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    bases = [rest.split()[0] for op, rest in steps if op == "FROM"]
    assert all(":" in b and not b.endswith(":latest") for b in bases), bases
    assert [rest for op, rest in steps if op == "USER"] == ["10001:10001"]
    assert [rest for op, rest in steps if op == "ENTRYPOINT"] == ['["retrieval"]']
    env = " ".join(rest for op, rest in steps if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env.split()


def test_cuda_image_uses_a_cuda_base_and_the_others_a_python_one() -> None:
    def bases(path: Path) -> set[str]:
        return {rest.split()[0] for op, rest in instructions(path) if op == "FROM"}
    assert all(b.startswith("nvidia/cuda:") for b in bases(VARIANTS[f"retrieval-platform-cuda:{VERSION}"]))
    assert all(b.startswith("python:3.11") for b in bases(VARIANTS[f"retrieval-platform:{VERSION}"]))
    assert all(b.startswith("python:3.11") for b in bases(VARIANTS[SLIM]))


def test_the_slim_image_installs_no_encoder_dependency() -> None:
    """The core dependencies hold none of the encoder extra's packages (torch, torchvision, the models)."""
    project = PYPROJECT["project"]
    core = {re.split(r"[=<>\[; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    encoder = {re.split(r"[=<>\[; ]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["encoder"]}
    assert {"torch", "torchvision", "timm", "open-clip-torch", "transformers"} <= encoder
    assert not core & encoder


def test_build_script_tags_what_the_manifests_use() -> None:
    script = (DOCKER / "build.sh").read_text()
    builds = re.findall(r'docker build -f (\S+) -t "\$name([^:]*):\$version"', script)
    assert {(REPO / path, f"retrieval-platform{suffix}:{VERSION}") for path, suffix in builds} == {
        (path, image) for image, path in VARIANTS.items()}
    assert 'version=$(sed -n' in script and "pyproject.toml" in script


def test_manifest_images_are_the_ones_built(rendered: dict[str, list[Obj]]) -> None:
    # The pods' runAsUser is the UID each image was built to run as (its USER line).
    uids = {image: rest.split(":")[0]
            for image, path in VARIANTS.items() for op, rest in instructions(path) if op == "USER"}
    seen = set()
    for name, objs in rendered.items():
        for pod, container, service in our_containers(objs):
            repository, tag = image_name_tag(container["image"])
            image = f"{repository.rsplit('/', 1)[-1]}:{tag}"
            assert image in VARIANTS, f"{name} {pod.name}: {container['image']} is not built by deploy/docker"
            # Only the encoder needs torch; everything else runs the slim image.
            assert (service == "encoder") == (image != SLIM), f"{name} {pod.name}: {service} runs {image}"
            uid = str(pod.spec["securityContext"]["runAsUser"])
            assert uid == uids[image], f"{name} {pod.name}: not the image's UID"
            seen.add(image)
    assert seen == set(VARIANTS)
