"""`retrieval index`'s core: a dataset kept in its conventional collection, idempotent, stale points
removed, embeddings shared with evaluation runs through the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.common.clients import EncoderClient, SearchClient
from services.common.errors import InvalidArgument
from services.common.ids import collection_name, point_id
from services.evaluator.cache import EmbeddingCache
from services.evaluator.config import EvaluatorSettings
from services.evaluator.datasets import open_dataset
from services.evaluator.indexing import index_dataset

pytestmark = pytest.mark.slow  # real EfficientNet-Lite0 on Caltech-101 images


def test_index_keeps_a_searchable_collection_updated_in_place(stack: tuple[EvaluatorSettings, object],
                                                              dataset: Path, tmp_path: Path) -> None:
    settings, _ = stack
    copy = shutil.copytree(dataset, tmp_path / "indexed")
    cache = EmbeddingCache(tmp_path / "cache")
    with EncoderClient(settings.encoder_address) as encoder, SearchClient(settings.search_address) as search:
        first = index_dataset(encoder, search, open_dataset(copy, allowed_roots=[copy]), "", cache=cache)
        assert first.collection == collection_name("indexed", "efficientnet-lite0") and first.indexed == 48
        assert not first.from_cache and first.removed == 0
        info = search.collection(first.collection)
        assert (info.points_count, info.dim, info.model, info.dataset) == (48, 1280, "efficientnet-lite0", "indexed")
        # Payloads say where each image is and what it shows; ids derive from (dataset, path).
        item = open_dataset(copy, allowed_roots=[copy]).items[0]
        hits = search.search_by_id(first.collection, point_id("indexed", item.path), 3)
        assert hits and all(h.dataset == "indexed" and h.labels for h in hits)

        # Again: nothing embedded (the cache), nothing duplicated.
        again = index_dataset(encoder, search, open_dataset(copy, allowed_roots=[copy]), "efficientnet-lite0",
                              cache=cache)
        assert again.from_cache and search.count(first.collection) == 48

        # An image leaves the list and another becomes unreadable: their points go.
        lines = (copy / "list_of_images.txt").read_text().splitlines()
        (copy / "list_of_images.txt").write_text("\n".join(lines[1:]) + "\n")
        (copy / lines[1].split("\t")[0]).write_bytes(b"")
        third = index_dataset(encoder, search, open_dataset(copy, allowed_roots=[copy]), "efficientnet-lite0",
                              cache=cache)
        assert third.indexed == 46 and third.removed == 2 and search.count(first.collection) == 46
        assert [p for p, _ in third.excluded] == [lines[1].split("\t")[0]]


def test_a_dataset_without_a_usable_image_is_refused(stack: tuple[EvaluatorSettings, object],
                                                     tmp_path: Path) -> None:
    settings, _ = stack
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "a.jpg").write_bytes(b"not an image")
    with EncoderClient(settings.encoder_address) as encoder, SearchClient(settings.search_address) as search, \
            pytest.raises(InvalidArgument, match="none of its 1 images could be indexed"):
        index_dataset(encoder, search, open_dataset(tmp_path / "bad", allowed_roots=[tmp_path]), "")
