"""A dataset indexed for browsing: one kept collection per (dataset, model), as ``retrieval index`` builds it.

Evaluation runs index their catalogue in a collection of their own and drop it afterwards (an exact,
disposable index per run, so that concurrent runs never collide). A collection people search is a
different thing: kept, named by convention (``services.common.ids.collection_name``), updated in
place. Indexing is idempotent: point ids derive from (dataset, path), so indexing again overwrites
the same points; images no longer in the dataset are deleted from the collection. Embeddings come
from the evaluator's cache when a run already computed them (and go into it otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from services.common.clients import EncoderClient, SearchClient
from services.common.errors import InvalidArgument
from services.common.ids import collection_name
from services.evaluator.cache import CachedEmbeddings, EmbeddingCache, cache_key
from services.evaluator.datasets import Dataset, check_images

RANDOM_INIT = "random-init"

Progress = Callable[[str, int, int], None]
"""Called with (stage, done, total)."""


@dataclass(frozen=True)
class IndexResult:
    """What ``index_dataset`` did.

    Attributes:
        collection: the collection written.
        dataset: the dataset's name (the points' payload ``dataset``).
        model: the model id that embedded the images.
        indexed: points written (one per readable, decodable image).
        excluded: (path, reason) of the images left out.
        removed: points deleted because their image is no longer in the dataset.
        from_cache: whether the embeddings came from the cache.
    """

    collection: str
    dataset: str
    model: str
    indexed: int
    excluded: tuple[tuple[str, str], ...]
    removed: int
    from_cache: bool


def index_dataset(encoder: EncoderClient, search: SearchClient, dataset: Dataset, model: str = "",
                  cache: EmbeddingCache | None = None, collection: str = "", batch: int = 32,
                  progress: Progress | None = None, cancelled: threading.Event | None = None) -> IndexResult:
    """Embeds ``dataset`` with ``model`` and writes it to its collection (created when missing).

    Args:
        encoder, search: the services.
        dataset: the images (from ``datasets.open_dataset``: inside the allowed roots).
        model: encoder model id ('' is the encoder's default).
        cache: the embedding cache shared with evaluation runs (None: always embed).
        collection: collection name (default: ``collection_name(dataset.name, model)``).
        batch: images per ``StreamEmbedImages`` message.
        progress: called with (stage, done, total) while embedding and writing.
        cancelled: stops the work (``Cancelled`` is raised).

    Raises:
        ServiceError: a service refused (e.g. ``FailedPrecondition`` when the collection exists with
            another dimension), or no image of the dataset could be embedded (``InvalidArgument``).
    """
    report = progress or (lambda *_: None)
    info = encoder.model(model)
    name = collection or collection_name(dataset.name, info.id)
    checked = check_images(dataset)
    paths = [item.path for item in checked.dataset.items]
    excluded = [(u.path, u.reason) for u in checked.unreadable]
    random_init = info.weights_source == RANDOM_INIT  # never cached: vectors differ between processes
    key = cache_key(checked.fingerprint, info.id, info.weights_sha256)
    cached = None if random_init or cache is None else cache.load(key)
    if cached is not None and cached.paths == [p for p in paths if p not in cached.failed]:
        vectors, failed = cached.vectors, cached.failed
        report("embedding", len(paths), len(paths))
    else:
        cached = None
        embedded = encoder.embed_files(checked.dataset.root, paths, model=info.id, batch=batch,
                                       progress=lambda d, t: report("embedding", d, t), cancelled=cancelled)
        failed = {paths[i]: e.message for i, e in embedded.errors.items()}
        vectors = embedded.vectors[embedded.ok]
        if cache is not None and not random_init:
            cache.store(key, CachedEmbeddings([p for p in paths if p not in failed], vectors, failed))
    excluded += [(p, f"encoder: {message}") for p, message in failed.items()]
    kept = [item for item in checked.dataset.items if item.path not in failed]
    if not kept:
        raise InvalidArgument(f"dataset {dataset.name!r}: none of its {len(dataset)} images could be indexed "
                              f"(first problem: {excluded[0][0]}: {excluded[0][1]})" if excluded else
                              f"dataset {dataset.name!r} has no images")

    search.create_collection(name, int(info.dim), info.id, dataset.name, exist_ok=True)
    written = search.upsert(name, dataset.name, [i.path for i in kept], [i.labels for i in kept], vectors,
                            progress=lambda d, t: report("indexing", d, t), cancelled=cancelled)
    # Points of images that left the dataset (renamed, deleted, now unreadable) go too.
    current = set(written.ids)
    stale = [p.id for p in search.scroll(name) if p.id not in current]
    removed = sum(search.delete(name, stale[i:i + 1000]) for i in range(0, len(stale), 1000))
    return IndexResult(name, dataset.name, info.id, len(kept), tuple(excluded), removed, cached is not None)
