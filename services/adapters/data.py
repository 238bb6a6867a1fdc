"""What an adapter is trained on: the catalogue's items, their labels and base embeddings, and the
held-out validation part carved out of the catalogue.

Only the catalogue list is read (and the labelled list, for the classes of the catalogue's paths);
no other image is ever opened, so a query set cannot influence training or model selection. The
embeddings come from the evaluator's embedding cache (same key: catalogue fingerprint, model id,
weights SHA-256) when it has them, else from the encoder service, and are then stored in that cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.clients import EncoderClient
from services.common.errors import FailedPrecondition, InvalidArgument
from services.evaluator.cache import CachedEmbeddings, EmbeddingCache, cache_key
from services.evaluator.datasets import CheckedDataset, Dataset, check_images, open_dataset, read_split_side

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class Catalogue:
    """The catalogue as the trainer sees it.

    Attributes:
        dataset: the items that have an embedding and a class, in list order.
        checked: the catalogue as listed (fingerprint, unreadable files).
        vectors: float32 (len(dataset), dim) L2-normalised base embeddings.
        labels: int64 (len(dataset),) class ids, indices into ``classes``.
        classes: sorted class names.
        source: where the embeddings came from: ``evaluator cache`` or ``encoder service``.
        excluded: {"path", "reason"} of every listed item left out.
        seconds: wall time of getting the embeddings.
    """

    dataset: Dataset
    checked: CheckedDataset
    vectors: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str
    excluded: list[dict[str, str]]
    seconds: float


def read_catalogue(dataset: Path, catalogue: str, allowed_roots: Sequence[Path]) -> CheckedDataset:
    """The catalogue of ``dataset``: the list ``catalogue`` (relative to the dataset root, classes from
    its ``list_of_images.txt``), or with ``catalogue`` empty the whole dataset; checked and fingerprinted
    exactly as the evaluator's catalogue/query protocol does (so its cached embeddings are found)."""
    root = dataset.resolve()
    if catalogue:
        base = root if root.is_dir() else root.parent
        listed = read_split_side(base / catalogue, allowed_roots=allowed_roots, root=base)
    else:
        listed = open_dataset(root, allowed_roots=allowed_roots)
    return check_images(listed)


def embed_catalogue(checked: CheckedDataset, model: str, weights_sha256: str, cache: EmbeddingCache | None,
                    encoder: EncoderClient | None, batch: int = 32) -> Catalogue:
    """The catalogue's base embeddings: from ``cache`` when present, else through ``encoder`` (then
    stored in ``cache``, unless the weights are random-initialised).

    Raises:
        FailedPrecondition: not in the cache and no encoder to embed them.
        InvalidArgument: fewer than two classes with an embedded item.
    """
    start = time.perf_counter()
    paths = [item.path for item in checked.dataset.items]
    key = cache_key(checked.fingerprint, model, weights_sha256)
    cached = cache.load(key) if cache is not None and weights_sha256 != RANDOM_INIT else None
    if cached is not None and cached.paths == [p for p in paths if p not in cached.failed]:
        vectors, failed, source = cached.vectors, cached.failed, "evaluator cache"
    elif encoder is None:
        raise FailedPrecondition(f"no cached {model} embeddings of this catalogue ({len(paths)} images, fingerprint "
                                 f"{checked.fingerprint[:12]}) in the evaluator cache; give --encoder-address to embed "
                                 "them through the encoder service (or run the evaluator on it first)")
    else:
        log.info("embedding %d catalogue images with %s through %s", len(paths), model, encoder.where)
        embedded = encoder.embed_files(checked.dataset.root, paths, model=model, batch=batch)
        failed = {paths[i]: f"{paths[i]}: {e.message}" for i, e in embedded.errors.items()}
        vectors = embedded.vectors[embedded.ok]
        if cache is not None and weights_sha256 != RANDOM_INIT:
            cache.store(key, CachedEmbeddings([p for p in paths if p not in failed], vectors, failed))
        source = "encoder service"
    usable = checked.dataset.without(failed) if failed else checked.dataset
    excluded = [{"path": u.path, "reason": u.reason} for u in checked.unreadable]
    excluded += [{"path": p, "reason": f"encoder: {m}"} for p, m in failed.items()]
    keep = np.array([bool(item.labels) for item in usable.items], dtype=bool)
    excluded += [{"path": item.path, "reason": "no class"} for item in usable.items if not item.labels]
    items = tuple(item for item in usable.items if item.labels)
    classes = sorted({item.labels[0] for item in items})
    if len(classes) < 2:
        raise InvalidArgument(f"the catalogue has {len(classes)} class(es) with embedded images; an adapter needs "
                              "at least 2")
    index = {name: i for i, name in enumerate(classes)}
    # Multi-label items train on their first class (sorted); the card counts them.
    labels = np.array([index[item.labels[0]] for item in items], dtype=np.int64)
    return Catalogue(Dataset(usable.name, usable.root, items), checked,
                     np.ascontiguousarray(vectors[keep], dtype=np.float32), labels, classes, source, excluded,
                     time.perf_counter() - start)


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of the held-out validation items: ``fraction`` of each class (rounded, at least
    one for a class of two or more items, never all of a class), chosen with a seeded permutation
    per class, so the split depends only on the labels, the fraction and the seed."""
    if not 0.0 < fraction < 1.0:
        raise InvalidArgument(f"validation fraction {fraction} is not between 0 and 1")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, round(len(members) * fraction)))
        mask[rng.permutation(members)[:count]] = True
    return mask
