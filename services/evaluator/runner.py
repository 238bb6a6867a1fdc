"""One benchmark run: a dataset x encoders through the encoder and search services, then metrics and
reports. Plain orchestration: the protocol (``protocols``) decides who queries whom and how, the
metric maths is in ``metrics``, the report in ``reports``. The EvaluatorService and the CLI both
drive this core.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.common.clients import EncoderClient, SearchClient
from services.common.errors import Cancelled, InvalidArgument
from services.evaluator import metrics as mx
from services.evaluator import reports
from services.evaluator.cache import CachedEmbeddings, EmbeddingCache, cache_key
from services.evaluator.datasets import Dataset, check_images
from services.evaluator.protocols import PROTOCOLS, EvaluationProtocol, Plan, Side
from services.evaluator.spec import ModelResult, RunSpec

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
TEXT_BATCH = 256  # texts per EmbedTexts call

Progress = Callable[[str, int, int, str], None]
"""Called with (stage, done, total, message)."""


def collection_name(dataset: str, model: str, protocol: str, run_id: str) -> str:
    """The collection of one run's evaluation index: unique per run (concurrent runs of one dataset
    and model never share one), Qdrant-safe, deleted when the run's model is done."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", f"eval__{dataset}__{model}__{protocol}")[:180]
    return f"{stem}__{re.sub(r'[^A-Za-z0-9_-]', '_', run_id)[:40]}"


class Runner:
    """Executes run specs against an encoder and a search service."""

    def __init__(self, encoder: EncoderClient, search: SearchClient, cache: EmbeddingCache,
                 allowed_roots: Sequence[Path], output_dir: Path, embed_batch: int = 32, trec_depth: int = 100) -> None:
        self.encoder = encoder
        self.search = search
        self.cache = cache
        self.allowed_roots = list(allowed_roots)
        self.output_dir = output_dir
        self.embed_batch = embed_batch
        self.trec_depth = trec_depth

    def run(self, spec: RunSpec, progress: Progress | None = None, cancelled: threading.Event | None = None,
            run_id: str = "") -> list[ModelResult]:
        """Evaluates every model of ``spec``; writes one JSON report (and TREC files) per model.

        Reports go to the runner's directory (``/ spec.run_name`` when named). ``run_id`` names the
        run's search collections (a fresh one when empty), so concurrent runs never collide.
        """
        spec.validate()
        job = _Job(self, spec, progress or (lambda *_: None), cancelled or threading.Event(),
                   run_id or uuid.uuid4().hex[:12])
        plan = job.protocol.plan(spec.dataset, spec.catalogue, spec.queries, spec.name, self.allowed_roots)
        return [job.evaluate(plan, model) for model in spec.models]


@dataclass
class _Job:
    """One run in progress: the spec, its protocol, and how to report progress or notice cancellation."""

    runner: Runner
    spec: RunSpec
    progress: Progress
    cancelled: threading.Event
    run_id: str
    protocol: EvaluationProtocol = field(init=False)
    weights: str = ""

    def __post_init__(self) -> None:
        self.protocol = PROTOCOLS[self.spec.protocol]

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("run cancelled")

    def embed(self, dataset: Dataset, model: str, stage: str) -> Side:
        """Embeddings of ``dataset`` by ``model``, from the cache when this dataset and these weights
        were embedded before (never for random-initialised weights)."""
        self._check()
        r = self.runner
        checked = check_images(dataset)
        paths = [item.path for item in checked.dataset.items]
        key = cache_key(checked.fingerprint, model, self.weights)
        start = time.perf_counter()
        cached = None if self.weights == RANDOM_INIT else r.cache.load(key)
        if cached is not None and cached.paths == [p for p in paths if p not in cached.failed]:
            self.progress(stage, len(paths), len(paths), f"{model}: {len(paths)} embeddings from the cache")
            vectors, failed = cached.vectors, cached.failed
        else:
            self.progress(stage, 0, len(paths), f"{model}: embedding {len(paths)} images")
            try:
                embedded = r.encoder.embed_files(checked.dataset.root, paths, model=model, batch=r.embed_batch,
                                                 progress=lambda d, t: self.progress(stage, d, t, model),
                                                 cancelled=self.cancelled)
            except Cancelled:
                raise Cancelled("run cancelled") from None
            failed = {paths[i]: f"{paths[i]}: {e.message}" for i, e in embedded.errors.items()}
            vectors = embedded.vectors[embedded.ok]
            if self.weights != RANDOM_INIT:
                r.cache.store(key, CachedEmbeddings([p for p in paths if p not in failed], vectors, failed))
        excluded = [{"path": u.path, "reason": u.reason} for u in checked.unreadable]
        excluded += [{"path": p, "reason": f"encoder: {msg}"} for p, msg in failed.items()]
        usable = checked.dataset.without(failed) if failed else checked.dataset
        return Side(usable, checked, vectors, excluded, time.perf_counter() - start, cached is not None)

    def embed_texts(self, texts: Sequence[str], model: str, stage: str) -> np.ndarray:
        """Texts through the model's text tower, ``TEXT_BATCH`` per call (never cached: cheap)."""
        self._check()
        out = []
        for start in range(0, len(texts), TEXT_BATCH):
            chunk = list(texts[start:start + TEXT_BATCH])
            embedded = self.runner.encoder.embed_texts(chunk, model=model)
            if embedded.errors:
                i, error = next(iter(sorted(embedded.errors.items())))
                raise InvalidArgument(f"{model}: text {start + i} ({chunk[i][:60]!r}): {error.message}")
            out.append(embedded.vectors)
            self.progress(stage, min(start + TEXT_BATCH, len(texts)), len(texts), model)
            self._check()
        return np.concatenate(out).astype(np.float32)

    def evaluate(self, plan: Plan, model: str) -> ModelResult:
        """Embeds, indexes and queries through the services, computes the metrics, writes the report."""
        self._check()
        spec, r, timings = self.spec, self.runner, {}
        info = r.encoder.model(model)
        self.weights = RANDOM_INIT if info.weights_source == RANDOM_INIT else info.weights_sha256
        if info.adapter_sha256:  # an adapter model: its vectors depend on the head too (a retrained one differs)
            self.weights = f"{self.weights}+{info.adapter_sha256}"
        catalogue = self.embed(plan.catalogue, model, "embedding")
        queries = self.protocol.embed_queries(self, plan, catalogue, model)
        timings["embed_seconds"] = catalogue.embed_seconds + (queries.embed_seconds if queries is not catalogue else 0)
        relevance = self.protocol.relevance(catalogue, queries)
        ks = self.protocol.ks(spec.ks)
        depth = self.protocol.depth(len(catalogue.dataset), ks, relevance)

        start = time.perf_counter()
        collection = collection_name(plan.name, model, self.protocol.name, self.run_id)
        r.search.recreate_collection(collection, int(info.dim), model, plan.name, exact_only=True)
        try:
            ids = r.search.upsert(collection, plan.name, [i.path for i in catalogue.dataset.items],
                                  catalogue.dataset.labels, catalogue.vectors, cancelled=self.cancelled,
                                  progress=lambda d, t: self.progress("indexing", d, t, model)).ids
            timings["index_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            found = self.protocol.top_k(r.search, collection, ids, queries, depth,
                                        lambda d, t: self.progress("querying", d, t, model))
        except Cancelled:
            raise Cancelled("run cancelled") from None
        finally:
            r.search.delete_collection(collection, missing_ok=True)
        index_of = {point_id: i for i, point_id in enumerate(ids)}
        service_top = np.full((len(found.ids), depth), -1, dtype=np.int64)
        for q, row in enumerate(found.ids):
            service_top[q, : len(row)] = [index_of.get(pid, -1) for pid in row[:depth]]
        timings["query_seconds"] = time.perf_counter() - start
        self._check()

        start = time.perf_counter()
        exact = self.protocol.exact(catalogue, queries, relevance, ks, max(depth, r.trec_depth),
                                    lambda d, t: self.progress("metrics", d, t, model))
        service = mx.service_topk_metrics(service_top, relevance.query_labels, relevance.catalogue_labels,
                                          exact["n_relevant"], ks, relevance.exclude)
        seen = mx.drop_excluded(service_top, relevance.exclude)
        agreement = mx.index_recall(seen, exact["top_indices"], ks, exact["top_scores"],
                                    mx.similarities(queries.vectors, catalogue.vectors, seen))
        extra = self.protocol.extra_metrics(catalogue, queries, relevance)
        timings["metrics_seconds"] = time.perf_counter() - start

        self.progress("report", 0, 1, model)
        out_dir = r.output_dir / spec.run_name if spec.run_name else r.output_dir
        report = reports.ModelReport(spec=spec, protocol=self.protocol.name, dataset_name=plan.name, model=info,
                                     catalogue=catalogue, queries=queries, relevance=relevance, exact=exact,
                                     service=service, service_top=service_top, service_scores=found.scores,
                                     index_recall=agreement, timings=timings, trec_depth=r.trec_depth,
                                     extra_metrics=extra)
        path = reports.write_model_report(report, out_dir, tsne=spec.tsne)
        self.progress("report", 1, 1, f"{model}: mAP {exact['map']:.4f} -> {path}")
        headline = {"map": float(exact["map"]),
                    **{f"P@{k}": float(v) for k, v in service["precision_at_k"].items()},
                    **{name: float(v) for name, v in extra.items()}}
        return ModelResult(model=model, report_path=path, metrics=headline)
