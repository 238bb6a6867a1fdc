"""Renders every kustomization once per session (overlays with placeholder secrets; see manifests.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import Obj, copy_with_secret_placeholders, kustomizations, render


@pytest.fixture(scope="session")
def k8s_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_with_secret_placeholders(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="session")
def rendered(k8s_copy: Path) -> dict[str, list[Obj]]:
    """'overlays/<name>' or 'jobs/<name>' -> the rendered objects."""
    return {name: render(k8s_copy / name) for name in kustomizations()}
