"""Evaluation protocols as objects (DESIGN §5): each one owns which items query and which form the
catalogue, how queries reach the search service, how relevance is built, and which metric call it
makes. The runner orchestrates them and knows none of these details; adding a protocol is adding a
class here and registering it in ``PROTOCOLS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from services.common.clients import SearchClient, TopK
from services.common.errors import InvalidArgument
from services.evaluator import metrics as mx
from services.evaluator.datasets import (
    CheckedDataset,
    Dataset,
    open_dataset,
    read_list,
    read_split_folders,
    read_split_lists,
    resolve_allowed,
)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Plan:
    """What a run evaluates: the dataset's display name, the catalogue, and the query set (None when
    the queries are the catalogue itself, as in leave-one-out)."""

    name: str
    catalogue: Dataset
    queries: Dataset | None


@dataclass(frozen=True)
class Side:
    """One embedded set of items: its (usable) dataset, fingerprint, vectors and what was excluded.

    Attributes:
        dataset: the items that have a vector, in vector order.
        checked: the dataset as listed, with its fingerprint and the files that could not be used.
        vectors: float32 (len(dataset), dim), L2-normalised.
        excluded: {"path", "reason"} of every item left out (unreadable file, encoder refusal).
        embed_seconds: wall time of embedding it (or of reading it from the cache).
        cached: whether the vectors came from the embedding cache.
    """

    dataset: Dataset
    checked: CheckedDataset
    vectors: np.ndarray
    excluded: list[dict[str, str]]
    embed_seconds: float
    cached: bool


@dataclass(frozen=True)
class Relevance:
    """Who is relevant to whom, as the metric functions take it.

    Attributes:
        classes: the label columns.
        query_labels, catalogue_labels: class ids, or membership matrices (``metrics.encode_labels``).
        exclude: (n_queries, J) catalogue indices removed from each query's ranking (the query
            itself in leave-one-out, and its junk), -1 padded; None when nothing is.
    """

    classes: list[str]
    query_labels: np.ndarray
    catalogue_labels: np.ndarray
    exclude: np.ndarray | None

    @property
    def max_excluded(self) -> int:
        return 0 if self.exclude is None else int((self.exclude >= 0).sum(axis=1).max(initial=0))


class Embedder(Protocol):
    """What a protocol may ask of the runner: embed a dataset with a model (through the cache)."""

    def embed(self, dataset: Dataset, model: str, stage: str) -> Side: ...


def junk_lists(queries: Dataset, catalogue: Dataset) -> list[list[int]]:
    """For each query, the catalogue items marked junk for one of its classes (``Item.junk``)."""
    by_class: dict[str, list[int]] = {}
    for j, item in enumerate(catalogue.items):
        for name in item.junk:
            by_class.setdefault(name, []).append(j)
    if not by_class:
        return [[] for _ in queries.items]
    return [sorted({j for name in item.labels for j in by_class.get(name, ())}) for item in queries.items]


def pad(rows: Sequence[Sequence[int]]) -> np.ndarray | None:
    """Ragged lists of catalogue indices as an (n, J) int64 matrix, -1 padded; None when all are empty."""
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return None
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class EvaluationProtocol(ABC):
    """One protocol. Subclasses set ``name`` and ``description`` and implement the steps."""

    name: ClassVar[str]
    description: ClassVar[str]

    @abstractmethod
    def check(self, catalogue: str, queries: str) -> None:
        """Refuses spec fields the protocol does not use (or misses ones it needs)."""

    @abstractmethod
    def plan(self, dataset: str, catalogue: str, queries: str, display_name: str,
             allowed_roots: Sequence[Path]) -> Plan:
        """Reads the datasets (under the allowed roots) and says which items query which."""

    @abstractmethod
    def embed_queries(self, embedder: Embedder, plan: Plan, catalogue: Side, model: str) -> Side:
        """The embedded queries (the catalogue itself, or another set)."""

    @abstractmethod
    def relevance(self, catalogue: Side, queries: Side) -> Relevance:
        """Labels of both sides, and what each query must not see of the catalogue."""

    @abstractmethod
    def top_k(self, search: SearchClient, collection: str, catalogue_ids: Sequence[str], queries: Side,
              depth: int, progress: Progress) -> TopK:
        """The search service's top-``depth`` for every query of the indexed catalogue."""

    @abstractmethod
    def exact(self, catalogue: Side, queries: Side, relevance: Relevance, ks: Sequence[int], top_k: int,
              progress: Progress) -> mx.RetrievalMetrics:
        """The full-ranking metrics from the embeddings."""

    def depth(self, n_catalogue: int, ks: Sequence[int], relevance: Relevance) -> int:
        """How deep to ask the search service: the deepest k, plus room for junk removed afterwards."""
        return min(max(ks) + relevance.max_excluded, n_catalogue)


def _encode(catalogue: Dataset, queries: Dataset) -> tuple[list[str], np.ndarray, np.ndarray]:
    classes = sorted(set(catalogue.classes) | set(queries.classes))
    return classes, mx.encode_labels(queries.labels, classes)[1], mx.encode_labels(catalogue.labels, classes)[1]


class LeaveOneOut(EvaluationProtocol):
    """Every image is a query against all the others; the query itself is excluded (junk)."""

    name = "leave_one_out"
    description = "every image queries all the others, itself excluded"

    def check(self, catalogue: str, queries: str) -> None:
        if catalogue or queries:
            raise InvalidArgument("run spec: catalogue/queries lists need protocol catalogue_query")

    def plan(self, dataset: str, catalogue: str, queries: str, display_name: str,
             allowed_roots: Sequence[Path]) -> Plan:
        path = resolve_allowed(dataset, allowed_roots)
        ds = (read_list(path, allowed_roots=allowed_roots, name=display_name or None) if path.is_file()
              else open_dataset(path, allowed_roots=allowed_roots, name=display_name or None))
        if len(ds) < 2:
            raise InvalidArgument(f"dataset {ds.name!r} has {len(ds)} readable image(s); leave-one-out needs at "
                                  "least 2 (each image queries the others)")
        return Plan(ds.name, ds, None)

    def embed_queries(self, embedder: Embedder, plan: Plan, catalogue: Side, model: str) -> Side:
        if len(catalogue.dataset) < 2:  # images the encoder refused are gone now
            raise InvalidArgument(f"dataset {plan.name!r} has {len(catalogue.dataset)} embeddable image(s); "
                                  "leave-one-out needs at least 2")
        return catalogue

    def relevance(self, catalogue: Side, queries: Side) -> Relevance:
        classes, labels, _ = _encode(catalogue.dataset, catalogue.dataset)
        itself = [[i] for i in range(len(catalogue.dataset))]
        junk = junk_lists(catalogue.dataset, catalogue.dataset)
        exclude = pad([sorted({i, *j}) for i, j in zip(range(len(itself)), junk, strict=True)])
        return Relevance(classes, labels, labels, exclude)

    def top_k(self, search: SearchClient, collection: str, catalogue_ids: Sequence[str], queries: Side,
              depth: int, progress: Progress) -> TopK:
        # Each stored point queries with its own vector, itself excluded: no vector travels.
        return search.top_k(collection, depth, point_ids=catalogue_ids, progress=progress)

    def depth(self, n_catalogue: int, ks: Sequence[int], relevance: Relevance) -> int:
        # The service already leaves the query out; other junk is removed afterwards.
        return min(max(ks) + max(0, relevance.max_excluded - 1), n_catalogue - 1)

    def exact(self, catalogue: Side, queries: Side, relevance: Relevance, ks: Sequence[int], top_k: int,
              progress: Progress) -> mx.RetrievalMetrics:
        exclude = relevance.exclude
        junk = None if exclude is None or exclude.shape[1] == 1 else exclude
        return mx.leave_one_out(catalogue.vectors, relevance.catalogue_labels, junk=junk, ks=ks, top_k=top_k,
                                class_names=relevance.classes, progress=progress)


class CatalogueQuery(EvaluationProtocol):
    """Each query image against the catalogue only (a split given as two lists or two folders)."""

    name = "catalogue_query"
    description = "each query image against the catalogue only"

    def check(self, catalogue: str, queries: str) -> None:
        if bool(catalogue) != bool(queries):
            raise InvalidArgument("run spec: give both catalogue and queries lists, or neither (train/ and test/ "
                                  "folders)")

    def plan(self, dataset: str, catalogue: str, queries: str, display_name: str,
             allowed_roots: Sequence[Path]) -> Plan:
        name = display_name or None
        if catalogue:
            root = resolve_allowed(dataset, allowed_roots)
            base = root if root.is_dir() else root.parent
            split = read_split_lists(base / catalogue, base / queries,  # absolute paths stay absolute
                                     allowed_roots=allowed_roots, root=base, name=name)
        else:
            split = read_split_folders(dataset, allowed_roots=allowed_roots, name=name)
        if not len(split.catalogue) or not len(split.queries):
            raise InvalidArgument(f"dataset {split.name!r}: the catalogue has {len(split.catalogue)} images and the "
                           f"queries {len(split.queries)}; both need at least one")
        return Plan(split.name, split.catalogue, split.queries)

    def embed_queries(self, embedder: Embedder, plan: Plan, catalogue: Side, model: str) -> Side:
        if plan.queries is None:
            raise ValueError("a catalogue/query plan without queries")  # plan() always sets them
        return embedder.embed(plan.queries, model, "embedding queries")

    def relevance(self, catalogue: Side, queries: Side) -> Relevance:
        classes, query_labels, catalogue_labels = _encode(catalogue.dataset, queries.dataset)
        return Relevance(classes, query_labels, catalogue_labels, pad(junk_lists(queries.dataset, catalogue.dataset)))

    def top_k(self, search: SearchClient, collection: str, catalogue_ids: Sequence[str], queries: Side,
              depth: int, progress: Progress) -> TopK:
        return search.top_k(collection, depth, vectors=queries.vectors, progress=progress)

    def exact(self, catalogue: Side, queries: Side, relevance: Relevance, ks: Sequence[int], top_k: int,
              progress: Progress) -> mx.RetrievalMetrics:
        return mx.catalogue_query(queries.vectors, relevance.query_labels, catalogue.vectors,
                                  relevance.catalogue_labels, exclude=relevance.exclude, ks=ks, top_k=top_k,
                                  class_names=relevance.classes, progress=progress)


PROTOCOLS: dict[str, EvaluationProtocol] = {p.name: p for p in (LeaveOneOut(), CatalogueQuery())}


def register(protocol: EvaluationProtocol) -> None:
    """Adds (or replaces) a protocol under its name."""
    PROTOCOLS[protocol.name] = protocol


def protocol_named(name: str) -> EvaluationProtocol:
    """The protocol called ``name``; InvalidArgument naming the known ones otherwise."""
    if name not in PROTOCOLS:
        raise InvalidArgument(f"run spec: protocol {name!r} is not one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]
