"""Embeddings cached on disk, keyed by dataset fingerprint, model id and weights checksum.

A second run of the same dataset with the same weights skips encoding. Random-initialised
weights are never cached (their vectors differ from process to process).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.files import atomic_write, atomic_write_text


@dataclass(frozen=True)
class CachedEmbeddings:
    """Vectors of one dataset under one model.

    Attributes:
        paths: relative image paths, in dataset order, of the embedded images.
        vectors: float32 (len(paths), dim), L2-normalised.
        failed: relative path -> error message, for images the encoder refused.
    """

    paths: list[str]
    vectors: np.ndarray
    failed: dict[str, str]


def cache_key(fingerprint: str, model_id: str, weights_sha256: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{model_id}\n{weights_sha256}".encode()).hexdigest()[:32]


class EmbeddingCache:
    """``<dir>/<key>.npz`` (vectors) + ``<key>.json`` (paths, failures), written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, key: str) -> CachedEmbeddings | None:
        meta_path, data_path = self.directory / f"{key}.json", self.directory / f"{key}.npy"
        if not (meta_path.is_file() and data_path.is_file()):
            return None
        meta = json.loads(meta_path.read_text())
        vectors = np.load(data_path)
        if vectors.shape[0] != len(meta["paths"]):
            return None  # a torn or foreign file: re-embed rather than trust it
        return CachedEmbeddings(paths=meta["paths"], vectors=vectors, failed=meta["failed"])

    def store(self, key: str, embeddings: CachedEmbeddings) -> None:
        # Vectors first, then the list that makes them valid: a crash between leaves no usable entry.
        atomic_write(self.directory / f"{key}.npy", lambda f: np.save(f, embeddings.vectors))
        meta = {"paths": embeddings.paths, "failed": embeddings.failed}
        atomic_write_text(self.directory / f"{key}.json", json.dumps(meta))
