"""Evaluation protocols as objects (DESIGN §5): each one owns which items query and which form the
catalogue, how queries reach the search service, how relevance is built, and which metric call it
makes. The runner orchestrates them and knows none of these details; adding a protocol is adding a
class here and registering it in ``PROTOCOLS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from services.common.clients import SearchClient, TopK
from services.common.errors import InvalidArgument
from services.evaluator import metrics as mx
from services.evaluator.datasets import (
    CheckedDataset,
    Dataset,
    Item,
    open_dataset,
    read_list,
    read_split_folders,
    read_split_lists,
    read_split_side,
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
    """What a protocol may ask of the runner: embed a dataset with a model (through the cache), or
    texts with the model's text tower."""

    def embed(self, dataset: Dataset, model: str, stage: str) -> Side: ...

    def embed_texts(self, texts: Sequence[str], model: str, stage: str) -> np.ndarray:
        """(len(texts), dim) float32 L2-normalised; a text the encoder refuses fails the run."""
        ...


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

    def top_k(self, search: SearchClient, collection: str, catalogue_ids: Sequence[str], queries: Side,
              depth: int, progress: Progress) -> TopK:
        """The search service's top-``depth`` for every query of the indexed catalogue (by default:
        each query's own vector)."""
        return search.top_k(collection, depth, vectors=queries.vectors, progress=progress)

    def exact(self, catalogue: Side, queries: Side, relevance: Relevance, ks: Sequence[int], top_k: int,
              progress: Progress) -> mx.RetrievalMetrics:
        """The full-ranking metrics from the embeddings (by default: each query ranked against the
        catalogue, without the catalogue items ``relevance.exclude`` names for it)."""
        return mx.catalogue_query(queries.vectors, relevance.query_labels, catalogue.vectors,
                                  relevance.catalogue_labels, exclude=relevance.exclude, ks=ks, top_k=top_k,
                                  class_names=relevance.classes, progress=progress)

    def depth(self, n_catalogue: int, ks: Sequence[int], relevance: Relevance) -> int:
        """How deep to ask the search service: the deepest k, plus room for junk removed afterwards."""
        return min(max(ks) + relevance.max_excluded, n_catalogue)

    def ks(self, requested: Sequence[int]) -> tuple[int, ...]:
        """The cut-offs reported: the run spec's (a protocol may add the ones its literature reports)."""
        return tuple(requested)

    def extra_metrics(self, catalogue: Side, queries: Side, relevance: Relevance) -> dict[str, float]:
        """Metrics of this protocol beyond the retrieval ones (reported and in the run's headline)."""
        return {}


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


def _image_catalogue(dataset: str, catalogue: str, display_name: str, allowed_roots: Sequence[Path]) -> Dataset:
    """The searched images of a text or composed run: the ``catalogue`` list (relative to the dataset
    root, classes from its list_of_images.txt), or every image of the dataset."""
    path = resolve_allowed(dataset, allowed_roots)
    name = display_name or None
    if catalogue:
        base = path if path.is_dir() else path.parent
        return read_split_side(base / catalogue, allowed_roots=allowed_roots, root=base, name=name)
    if path.is_file():
        return read_list(path, allowed_roots=allowed_roots, name=name)
    return open_dataset(path, allowed_roots=allowed_roots, name=name)


def _text_side(root: Path, name: str, items: Sequence[Item], vectors: np.ndarray, content: str,
               seconds: float, excluded: Sequence[dict[str, str]] = ()) -> Side:
    """A query side that is not image files (texts, composed queries): items named by what they are,
    fingerprinted by ``content`` (the prompts or the query file)."""
    import hashlib

    dataset = Dataset(name, root, tuple(items))
    checked = CheckedDataset(dataset, (), hashlib.sha256(content.encode()).hexdigest())
    return Side(dataset, checked, vectors, list(excluded), seconds, False)


# CLIP's ensemble of seven prompts chosen on ImageNet (Radford et al., "prompt engineering" notebook),
# plus the plain "a photo of a {}.": each class's query is the mean of its normalised prompt embeddings,
# normalised again (CLIP_benchmark's zero-shot classifier).
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)
TEXT_KS: tuple[int, ...] = (5, 10, 20, 50)


def prompt_name(label: str) -> str:
    """A class label as a prompt says it: '_' and '-' become spaces ("Faces_easy" -> "Faces easy")."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


class TextToImage(EvaluationProtocol):
    """Text to image (CLIP-type models): each class name, in every prompt template, queries the image
    catalogue; the class's query vector is the normalised mean of its normalised prompt embeddings.
    Relevant: the catalogue images of that class. Also reports zero-shot accuracy (each catalogue
    image classified by its most similar class query) and mAP@k for k in 5, 10, 20, 50."""

    name = "text"
    description = "each class name in prompt templates queries the image catalogue (text to image)"

    def __init__(self, templates: Sequence[str] = PROMPT_TEMPLATES) -> None:
        self.templates = tuple(templates)

    def check(self, catalogue: str, queries: str) -> None:
        if queries:
            raise InvalidArgument("run spec: the text protocol's queries are the class names; give no queries list")

    def plan(self, dataset: str, catalogue: str, queries: str, display_name: str,
             allowed_roots: Sequence[Path]) -> Plan:
        ds = _image_catalogue(dataset, catalogue, display_name, allowed_roots)
        if len(ds.classes) < 2:
            raise InvalidArgument(f"dataset {ds.name!r} has {len(ds.classes)} class(es); text queries need 2 or more")
        return Plan(ds.name, ds, None)

    def prompts(self, label: str) -> list[str]:
        return [t.format(prompt_name(label)) for t in self.templates]

    def embed_queries(self, embedder: Embedder, plan: Plan, catalogue: Side, model: str) -> Side:
        import time

        start = time.perf_counter()
        classes = catalogue.dataset.classes
        texts = [p for c in classes for p in self.prompts(c)]
        vectors = embedder.embed_texts(texts, model, "embedding prompts").reshape(len(classes), len(self.templates), -1)
        mean = vectors.astype(np.float64).mean(axis=1)
        queries = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
        items = [Item(f"text: {prompt_name(c)}", (c,)) for c in classes]
        return _text_side(catalogue.dataset.root, plan.name, items, queries, "\n".join(texts),
                          time.perf_counter() - start)

    def relevance(self, catalogue: Side, queries: Side) -> Relevance:
        classes, query_labels, catalogue_labels = _encode(catalogue.dataset, queries.dataset)
        return Relevance(classes, query_labels, catalogue_labels, None)

    def ks(self, requested: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({*requested, *TEXT_KS}))

    def extra_metrics(self, catalogue: Side, queries: Side, relevance: Relevance) -> dict[str, float]:
        # Query row c is class c (queries are the sorted classes, as relevance's columns).
        return {"zero_shot_accuracy": mx.zero_shot_accuracy(catalogue.vectors, relevance.catalogue_labels,
                                                            queries.vectors)}


COMPOSED_FILE_FORMAT = "reference/path<TAB>modifier text<TAB>target class"


@dataclass(frozen=True)
class ComposedPlan(Plan):
    """A composed run's plan: the catalogue, the queries as items (labelled with the target class), and
    per query its reference image's path (an item of the catalogue) and its modifier text."""

    references: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    content: str = ""


@dataclass(frozen=True)
class ComposedSide(Side):
    """The embedded composed queries: ``vectors`` are the composed query vectors; ``references`` the
    catalogue index of each query's reference image, ``text_vectors`` its modifier's embedding."""

    references: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    text_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


class ComposedQueries(EvaluationProtocol):
    """Composed queries: a reference image plus a modifier text, looking for a target class (DESIGN §5
    "Composed"). The queries file (the spec's ``queries``, relative to the dataset root) has one line
    per query, ``reference/path<TAB>modifier text<TAB>target class``; references are catalogue
    images. The query vector is normalise(w_image * image + w_text * text) over the normalised
    embeddings; the search service composes it from the stored reference point and the text vector
    (the evaluator composes the same for the full ranking). Relevant: catalogue images of the target
    class; the reference image is left out of its own query's ranking."""

    name = "composed"
    description = "reference image + modifier text queries for a target class"

    def __init__(self, image_weight: float = 0.5, text_weight: float = 0.5) -> None:
        self.weights = (image_weight, text_weight)

    def check(self, catalogue: str, queries: str) -> None:
        if not queries:
            raise InvalidArgument(f"run spec: the composed protocol needs a queries file ({COMPOSED_FILE_FORMAT})")

    def plan(self, dataset: str, catalogue: str, queries: str, display_name: str,
             allowed_roots: Sequence[Path]) -> ComposedPlan:
        ds = _image_catalogue(dataset, catalogue, display_name, allowed_roots)
        path = resolve_allowed(ds.root / queries, allowed_roots)
        content = path.read_text(encoding="utf-8")
        known = {item.path for item in ds.items}
        items, references, texts = [], [], []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            where = f"{path}:{number}"
            if len(fields) != 3 or not all(f.strip() for f in fields):
                raise InvalidArgument(f"{where}: expected '{COMPOSED_FILE_FORMAT}', got {line!r}")
            reference, text, target = (f.strip() for f in fields)
            if reference not in known:
                raise InvalidArgument(f"{where}: reference {reference!r} is not an image of the catalogue")
            items.append(Item(f"{reference} + {text}", (target,)))
            references.append(reference)
            texts.append(text)
        if not items:
            raise InvalidArgument(f"{path}: no composed queries")
        return ComposedPlan(ds.name, ds, Dataset(ds.name, ds.root, tuple(items)), tuple(references), tuple(texts),
                            content)

    def embed_queries(self, embedder: Embedder, plan: Plan, catalogue: Side, model: str) -> Side:
        import time

        from services.common.vectors import compose

        if not isinstance(plan, ComposedPlan) or plan.queries is None:
            raise ValueError("a composed run needs a ComposedPlan")
        start = time.perf_counter()
        index = {item.path: j for j, item in enumerate(catalogue.dataset.items)}
        keep = [i for i, ref in enumerate(plan.references) if ref in index]
        excluded = [{"path": plan.queries.items[i].path, "reason": f"reference {plan.references[i]} was not embedded"}
                    for i in range(len(plan.references)) if plan.references[i] not in index]
        if not keep:
            raise InvalidArgument(f"dataset {plan.name!r}: no composed query has an embedded reference image")
        texts = embedder.embed_texts([plan.texts[i] for i in keep], model, "embedding modifiers")
        references = np.array([index[plan.references[i]] for i in keep], dtype=np.int64)
        vectors = compose([catalogue.vectors[references], texts], self.weights)
        if not np.isfinite(vectors).all():
            raise InvalidArgument("a composed query's weighted image and text embeddings sum to zero")
        side = _text_side(catalogue.dataset.root, plan.name, [plan.queries.items[i] for i in keep], vectors,
                          plan.content, time.perf_counter() - start, excluded)
        return ComposedSide(side.dataset, side.checked, side.vectors, side.excluded, side.embed_seconds, False,
                            references, texts)

    def relevance(self, catalogue: Side, queries: Side) -> Relevance:
        classes, query_labels, catalogue_labels = _encode(catalogue.dataset, queries.dataset)
        junk = junk_lists(queries.dataset, catalogue.dataset)
        refs = queries.references if isinstance(queries, ComposedSide) else np.zeros(0, dtype=np.int64)
        exclude = pad([sorted({int(r), *j}) for r, j in zip(refs, junk, strict=True)])
        return Relevance(classes, query_labels, catalogue_labels, exclude)

    def top_k(self, search: SearchClient, collection: str, catalogue_ids: Sequence[str], queries: Side,
              depth: int, progress: Progress) -> TopK:
        from services.common.clients import QueryPart

        if not isinstance(queries, ComposedSide):
            raise ValueError("composed queries expected")
        image_weight, text_weight = self.weights
        composed = [[QueryPart(image_weight, point_id=catalogue_ids[int(r)]), QueryPart(text_weight, vector=t)]
                    for r, t in zip(queries.references, queries.text_vectors, strict=True)]
        return search.top_k(collection, depth, composed=composed, progress=progress)

    def depth(self, n_catalogue: int, ks: Sequence[int], relevance: Relevance) -> int:
        # The service already leaves the reference out; other junk is removed afterwards.
        return min(max(ks) + max(0, relevance.max_excluded - 1), n_catalogue - 1)


PROTOCOLS: dict[str, EvaluationProtocol] = {
    p.name: p for p in (LeaveOneOut(), CatalogueQuery(), TextToImage(), ComposedQueries())}


def register(protocol: EvaluationProtocol) -> None:
    """Adds (or replaces) a protocol under its name."""
    PROTOCOLS[protocol.name] = protocol


def protocol_named(name: str) -> EvaluationProtocol:
    """The protocol called ``name``; InvalidArgument naming the known ones otherwise."""
    if name not in PROTOCOLS:
        raise InvalidArgument(f"run spec: protocol {name!r} is not one of {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]
