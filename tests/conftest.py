"""Shared fixtures. Offline mode is set before any model library is imported (no hub retries)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("RETRIEVAL_SHARED_DIR", REPO.parent / "shared"))
CALTECH101 = SHARED / "datasets" / "caltech101"


def _require(path: Path) -> Path:
    if not path.exists():
        # Not a skip: CI always has ../shared beside the clone; a missing copy is a broken setup.
        pytest.fail(f"{path} is missing: clone the repository with ../shared beside it "
                    "(or set RETRIEVAL_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def caltech101_dir() -> Path:
    """Root of the real Caltech-101 set (list_of_images.txt, split_*.txt, images/)."""
    return _require(CALTECH101 / "list_of_images.txt").parent


def require_binary(name: str, package: str = "prometheus") -> str:
    """The path of a system tool the test needs: fails in CI (which installs it), skips elsewhere."""
    import shutil

    found = shutil.which(name)
    if found is None:
        message = f"{name} is not on PATH (Debian/Ubuntu: apt-get install {package})"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{message}: CI installs it and must run this test")
        pytest.skip(message)
    return found


def sample_caltech(classes: int, per_class: int, seed: int = 0) -> list[tuple[Path, str]]:
    """A seeded sample of (image path, class) from Caltech-101: ``classes`` x ``per_class`` images."""
    lines = _require(CALTECH101 / "list_of_images.txt").read_text().splitlines()
    by_class: dict[str, list[str]] = {}
    for line in lines:
        if line.strip():
            path, label = line.split("\t")
            by_class.setdefault(label, []).append(path)
    rng = random.Random(seed)
    chosen = rng.sample(sorted(c for c, ps in by_class.items() if len(ps) >= per_class), classes)
    return [(CALTECH101 / p, c) for c in chosen for p in rng.sample(by_class[c], per_class)]
