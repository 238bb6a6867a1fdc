"""One benchmark run: datasets x encoders through the encoder and search services, then metrics and
reports. Plain Python (no gRPC server): the EvaluatorService and the CLI both drive this core.

Who computes what (DESIGN §5): full-ranking metrics (AP, mAP, PR curves, per-class AP) need every
score, so they come from the embeddings the encoder returned (chunked matrix products in
``metrics``); the top-k part (P@k, mAP@k, the retrieval grids) comes from the search service, as a
user would see it, and the report states how far the index's top-k agrees with the exact top-k.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.common.clients import EncoderClient, SearchClient, TopK
from services.common.errors import Cancelled, InvalidArgument
from services.evaluator import metrics as mx
from services.evaluator.cache import CachedEmbeddings, EmbeddingCache, cache_key
from services.evaluator.datasets import (
    CheckedDataset,
    Dataset,
    check_images,
    open_dataset,
    read_list,
    read_split_folders,
    read_split_lists,
    resolve_allowed,
)
from services.evaluator.reports import (
    REPORT_SCHEMA,
    plot_pr_curves,
    plot_retrieval_grid,
    plot_tsne,
    report_name,
    write_json,
)

log = logging.getLogger(__name__)

LEAVE_ONE_OUT = "leave_one_out"
CATALOGUE_QUERY = "catalogue_query"
PROTOCOLS = (LEAVE_ONE_OUT, CATALOGUE_QUERY)
RANDOM_INIT = "random-init"
MAX_K = 1000  # deepest cut-off: the top-k of every query comes back through the search service
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Progress = Callable[[str, int, int, str], None]
"""Called with (stage, done, total, message)."""


@dataclass(frozen=True)
class RunSpec:
    """What to evaluate.

    Attributes:
        dataset: dataset root (``list_of_images.txt`` or class folders; ``train/`` + ``test/`` for a
            folder split) or a list file.
        models: encoder model ids to compare.
        protocol: ``leave_one_out`` or ``catalogue_query``.
        catalogue, queries: list files of a catalogue/query split (empty: ``train/`` and ``test/``
            folders under ``dataset``).
        ks: cut-offs of P@k, R@k and mAP@k.
        name: dataset display name (empty: the folder's name).
        tsne: draw the t-SNE map (seconds to a minute on a CPU).
        run_name: the run's report folder under the runner's report directory (empty: that
            directory itself). Clients name runs; only the server decides where reports go.
    """

    dataset: str
    models: tuple[str, ...]
    protocol: str = LEAVE_ONE_OUT
    catalogue: str = ""
    queries: str = ""
    ks: tuple[int, ...] = (1, 5, 10, 20, 100)
    name: str = ""
    tsne: bool = True
    run_name: str = ""

    def validate(self) -> None:
        if not self.dataset:
            raise InvalidArgument("run spec: dataset is empty")
        if not self.models:
            raise InvalidArgument("run spec: no models")
        if self.protocol not in PROTOCOLS:
            raise InvalidArgument(f"run spec: protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if bool(self.catalogue) != bool(self.queries):
            raise InvalidArgument("run spec: give both catalogue and queries lists, or neither")
        if self.protocol == LEAVE_ONE_OUT and self.catalogue:
            raise InvalidArgument("run spec: catalogue/queries lists need protocol catalogue_query")
        if not self.ks or min(self.ks) < 1:
            raise InvalidArgument(f"run spec: ks must be positive integers, got {list(self.ks)}")
        if max(self.ks) > MAX_K:
            raise InvalidArgument(f"run spec: ks must be at most {MAX_K}, got {max(self.ks)}")
        for what, value in (("run_name", self.run_name), ("name", self.name)):
            if value and not _RUN_NAME.fullmatch(value):
                raise InvalidArgument(f"run spec: {what} {value!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
                                      "starting with a letter or digit")


@dataclass
class ModelResult:
    """The outcome of one (dataset, model, protocol)."""

    model: str
    report_path: Path
    metrics: dict[str, float] = field(default_factory=dict)


def code_version() -> str:
    """``git describe`` of the checkout when there is one, else the package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrieval-platform")
    except PackageNotFoundError:
        return "unknown"


def collection_name(dataset: str, model: str, protocol: str, run_id: str) -> str:
    """The collection of one run's evaluation index: unique per run (concurrent runs of one dataset
    and model never share one), Qdrant-safe, deleted when the run's model is done."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", f"eval__{dataset}__{model}__{protocol}")[:180]
    return f"{stem}__{re.sub(r'[^A-Za-z0-9_-]', '_', run_id)[:40]}"


@dataclass
class _Side:
    """One embedded side of a run (the whole dataset, or the catalogue, or the queries)."""

    dataset: Dataset
    checked: CheckedDataset
    vectors: np.ndarray
    excluded: list[dict[str, str]]
    embed_seconds: float
    cached: bool


class Runner:
    """Executes run specs against an encoder and a search service."""

    def __init__(self, encoder: EncoderClient, search: SearchClient, cache: EmbeddingCache,
                 allowed_roots: Sequence[Path], output_dir: Path, embed_batch: int = 32) -> None:
        self.encoder = encoder
        self.search = search
        self.cache = cache
        self.allowed_roots = list(allowed_roots)
        self.output_dir = output_dir
        self.embed_batch = embed_batch

    # -- datasets ---------------------------------------------------------------------------------

    def _open(self, spec: RunSpec) -> tuple[str, Dataset, Dataset | None]:
        """(name, catalogue-or-whole dataset, queries or None)."""
        if spec.protocol == LEAVE_ONE_OUT:
            path = resolve_allowed(spec.dataset, self.allowed_roots)
            ds = (read_list(path, allowed_roots=self.allowed_roots, name=spec.name or None) if path.is_file()
                  else open_dataset(path, allowed_roots=self.allowed_roots, name=spec.name or None))
            return ds.name, ds, None
        if spec.catalogue:
            root = resolve_allowed(spec.dataset, self.allowed_roots)
            base = root if root.is_dir() else root.parent
            split = read_split_lists(base / spec.catalogue, base / spec.queries,  # absolute paths stay absolute
                                     allowed_roots=self.allowed_roots, root=base, name=spec.name or None)
        else:
            split = read_split_folders(spec.dataset, allowed_roots=self.allowed_roots, name=spec.name or None)
        return split.name, split.catalogue, split.queries

    def _embed(self, dataset: Dataset, model: str, info_sha: str, random_init: bool, stage: str,
               progress: Progress, cancelled: threading.Event) -> _Side:
        checked = check_images(dataset)
        usable = checked.dataset
        excluded = [{"path": u.path, "reason": u.reason} for u in checked.unreadable]
        key = cache_key(checked.fingerprint, model, info_sha)
        start = time.perf_counter()
        cached = None if random_init else self.cache.load(key)
        paths = [item.path for item in usable.items]
        if cached is not None and cached.paths == [p for p in paths if p not in cached.failed]:
            progress(stage, len(paths), len(paths), f"{model}: {len(paths)} embeddings from the cache")
            vectors, failed = cached.vectors, cached.failed
        else:
            progress(stage, 0, len(paths), f"{model}: embedding {len(paths)} images")
            try:
                embedded = self.encoder.embed_files(usable.root, paths, model=model, batch=self.embed_batch,
                                                    progress=lambda d, t: progress(stage, d, t, model),
                                                    cancelled=cancelled)
            except Cancelled:
                raise Cancelled("run cancelled") from None
            failed = {paths[i]: f"{paths[i]}: {e.message}" for i, e in embedded.errors.items()}
            vectors = embedded.vectors[embedded.ok]
            if not random_init:
                self.cache.store(key, CachedEmbeddings([p for p in paths if p not in failed], vectors, failed))
        excluded += [{"path": p, "reason": f"encoder: {msg}"} for p, msg in failed.items()]
        return _Side(usable.without(failed) if failed else usable, checked, vectors, excluded,
                     time.perf_counter() - start, cached is not None)

    # -- one run ------------------------------------------------------------------------------------

    def run(self, spec: RunSpec, progress: Progress | None = None,
            cancelled: threading.Event | None = None, run_id: str = "") -> list[ModelResult]:
        """Evaluates every model of ``spec``; writes one JSON report per model.

        Reports go to the runner's directory (``/ spec.run_name`` when named). ``run_id`` names the
        run's search collections (a fresh one when empty), so concurrent runs never collide.
        """
        spec.validate()
        progress = progress or (lambda *_: None)
        cancelled = cancelled or threading.Event()
        run_id = run_id or uuid.uuid4().hex[:12]
        name, first, queries = self._open(spec)
        if spec.protocol == LEAVE_ONE_OUT and len(first) < 2:
            raise InvalidArgument(f"dataset {name!r} has {len(first)} readable image(s); leave-one-out needs at "
                                  "least 2 (each image queries the others)")
        if queries is not None and (len(first) == 0 or len(queries) == 0):
            raise InvalidArgument(f"dataset {name!r}: the catalogue has {len(first)} images and the queries "
                                  f"{len(queries)}; both need at least one")
        out_dir = self.output_dir / spec.run_name if spec.run_name else self.output_dir
        results = []
        for model in spec.models:
            if cancelled.is_set():
                raise Cancelled("run cancelled")
            results.append(self._run_model(spec, name, first, queries, model, out_dir, progress, cancelled, run_id))
        return results

    def _run_model(self, spec: RunSpec, name: str, first: Dataset, queries_ds: Dataset | None, model: str,
                   out_dir: Path, progress: Progress, cancelled: threading.Event, run_id: str) -> ModelResult:
        info = self.encoder.model(model)
        random_init = info.weights_source == RANDOM_INIT
        catalogue = self._embed(first, model, info.weights_sha256, random_init, "embedding", progress, cancelled)
        query = (catalogue if queries_ds is None else
                 self._embed(queries_ds, model, info.weights_sha256, random_init, "embedding queries", progress,
                             cancelled))
        classes = sorted(set(catalogue.dataset.classes) | set(query.dataset.classes))
        cat_members = membership(mx.encode_labels(catalogue.dataset.labels, classes)[1], len(classes))
        query_members = membership(mx.encode_labels(query.dataset.labels, classes)[1], len(classes))
        loo = spec.protocol == LEAVE_ONE_OUT
        n_cat = len(catalogue.dataset)
        top = min(max(spec.ks), n_cat - 1 if loo else n_cat)

        # Index the catalogue in a collection of this run (exact search for evaluation), query it
        # (by stored id in leave-one-out, by vector otherwise), and drop it.
        start = time.perf_counter()
        collection = collection_name(name, model, spec.protocol, run_id)
        self.search.recreate_collection(collection, int(info.dim), model, name)
        try:
            ids = self.search.upsert(collection, name, [i.path for i in catalogue.dataset.items],
                                     catalogue.dataset.labels, catalogue.vectors, cancelled=cancelled,
                                     progress=lambda d, t: progress("indexing", d, t, model)).ids
            index_seconds = time.perf_counter() - start
            start = time.perf_counter()
            report_progress = lambda d, t: progress("querying", d, t, model)  # noqa: E731
            found: TopK = (
                self.search.top_k(collection, top, point_ids=ids, progress=report_progress) if loo else
                self.search.top_k(collection, top, vectors=query.vectors, progress=report_progress))
        except Cancelled:
            raise Cancelled("run cancelled") from None
        finally:
            self.search.delete_collection(collection, missing_ok=True)
        index_of = {point_id: i for i, point_id in enumerate(ids)}
        service_top = np.full((len(found.ids), top), -1, dtype=np.int64)
        for q, row in enumerate(found.ids):
            service_top[q, : len(row)] = [index_of.get(pid, -1) for pid in row[:top]]
        query_seconds = time.perf_counter() - start
        if cancelled.is_set():
            raise Cancelled("run cancelled")

        # Full-ranking metrics from the embeddings.
        start = time.perf_counter()
        metric_progress = lambda d, t: progress("metrics", d, t, model)  # noqa: E731
        if loo:
            result = mx.leave_one_out(catalogue.vectors, cat_members, ks=spec.ks, top_k=top, class_names=classes,
                                     progress=metric_progress)
        else:
            result = mx.catalogue_query(query.vectors, query_members, catalogue.vectors, cat_members, ks=spec.ks,
                                       top_k=top, class_names=classes, progress=metric_progress)
        topk = service_topk_metrics(service_top, query_members, cat_members, result["n_relevant"], spec.ks)
        agreement = index_recall(service_top, result["top_indices"], spec.ks)
        metrics_seconds = time.perf_counter() - start

        # Report.
        progress("report", 0, 1, model)
        stem = report_name(name, model, spec.protocol)
        figures = out_dir / "figures"
        pr_png = plot_pr_curves({model: (result["pr_recall"].tolist(), result["pr_precision"].tolist())},
                                f"{name} - {model} - {spec.protocol}", figures / f"pr__{stem}.png")
        examples = best_and_worst(result, catalogue, query, service_top, found.scores, query_members, cat_members,
                                  loo)
        grid_png = plot_retrieval_grid(examples["best"] + examples["worst"], catalogue.dataset.root,
                                       f"{name} - {model}: best 5 and worst 5 queries (top-5 | worst-ranked relevant)",
                                       figures / f"grid__{stem}.png")
        artifacts = {"pr_curve_png": str(pr_png.relative_to(out_dir)), "grid_png": str(grid_png.relative_to(out_dir))}
        if spec.tsne:
            everything = catalogue.vectors if loo else np.concatenate([catalogue.vectors, query.vectors])
            labels = [item.labels[0] for item in catalogue.dataset.items] + (
                [] if loo else [item.labels[0] for item in query.dataset.items])
            artifacts["tsne_png"] = str(plot_tsne(everything, labels, f"{name} - {model}",
                                                  figures / f"tsne__{stem}.png").relative_to(out_dir))
        report = build_report(spec, name, catalogue, query, info, result, topk, agreement, examples, artifacts,
                              timings={"embed_seconds": catalogue.embed_seconds + (0 if loo else query.embed_seconds),
                                       "index_seconds": index_seconds, "query_seconds": query_seconds,
                                       "metrics_seconds": metrics_seconds},
                              loo=loo)
        path = write_json(report, out_dir / f"{stem}.json")
        progress("report", 1, 1, f"{model}: mAP {result['map']:.4f} -> {path}")
        headline = {"map": float(result["map"]), **{f"P@{k}": float(v) for k, v in topk["precision_at_k"].items()}}
        return ModelResult(model=model, report_path=path, metrics=headline)


def membership(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """An (n, C) boolean membership matrix from class ids (n,) or a membership matrix."""
    return labels.astype(bool) if labels.ndim == 2 else np.eye(n_classes, dtype=bool)[labels]


def service_topk_metrics(top: np.ndarray, query_members: np.ndarray, cat_members: np.ndarray,
                         n_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, Any]:
    """P@k, R@k and mAP@k (definitions as in ``metrics``) of the rankings the search service returned.

    ``top`` holds catalogue indices (-1 where the service returned fewer hits); queries without a
    relevant item are left out of the means, as in ``metrics``.
    """
    valid = top >= 0
    safe = np.where(valid, top, 0)
    rel = (query_members[:, None, :] & cat_members[safe]).any(axis=2) & valid
    scored = n_relevant > 0
    hits_at = np.cumsum(rel, axis=1)
    precision_at_i = hits_at / np.arange(1, top.shape[1] + 1)
    out: dict[str, dict[int, float]] = {"precision_at_k": {}, "recall_at_k": {}, "map_at_k": {}}
    for k in ks:
        kk = min(k, top.shape[1])
        found = hits_at[:, kk - 1] if kk else np.zeros(len(top))
        out["precision_at_k"][k] = float(np.mean(found[scored] / k)) if scored.any() else float("nan")
        out["recall_at_k"][k] = float(np.mean(found[scored] / n_relevant[scored])) if scored.any() else float("nan")
        ap_k = (precision_at_i[:, :kk] * rel[:, :kk]).sum(axis=1) / np.maximum(np.minimum(n_relevant, k), 1)
        out["map_at_k"][k] = float(np.mean(ap_k[scored])) if scored.any() else float("nan")
    return out


def index_recall(service_top: np.ndarray, exact_top: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of the index: |service top-k ∩ exact top-k| / |exact top-k|, averaged over queries."""
    out = {}
    for k in ks:
        kk = min(k, exact_top.shape[1], service_top.shape[1])
        if kk == 0:
            continue
        exact, got = exact_top[:, :kk], service_top[:, :kk]
        overlap = np.array([len(np.intersect1d(e[e >= 0], g[g >= 0])) / max(1, int((e >= 0).sum()))
                            for e, g in zip(exact, got, strict=True)])
        out[k] = float(overlap.mean())
    return out


def best_and_worst(result: mx.RetrievalMetrics, catalogue: _Side, query: _Side, service_top: np.ndarray,
                   service_scores: np.ndarray, query_members: np.ndarray, cat_members: np.ndarray, loo: bool,
                   n: int = 5, shown: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The ``n`` best and worst queries by AP, each with its top ``shown`` retrievals (from the search
    service) and its ``shown`` worst-ranked relevant items (from the exact full ranking)."""
    ap = result["ap"]
    order = np.argsort(np.where(np.isnan(ap), np.inf, -ap), kind="stable")
    scored = order[: int((~np.isnan(ap)).sum())]
    picks = {"best": scored[:n], "worst": scored[::-1][:n]}
    items = catalogue.dataset.items
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, queries in picks.items():
        rows = []
        for q in queries:
            q = int(q)
            top = []
            for j, score in zip(service_top[q][:shown], service_scores[q][:shown], strict=False):
                if j < 0:
                    continue
                top.append({"path": items[j].path, "score": round(float(score), 5),
                            "relevant": bool((query_members[q] & cat_members[j]).any())})
            scores = catalogue.vectors @ query.vectors[q]
            if loo:
                scores[q] = -np.inf
            relevant = np.flatnonzero((cat_members & query_members[q]).any(axis=1))
            relevant = relevant[relevant != q] if loo else relevant
            # Rank (1-based) in descending score, ties broken by catalogue index as in ``metrics``.
            ranks = np.array([int((scores > scores[j]).sum() + (scores[:j] == scores[j]).sum()) + 1
                              for j in relevant])
            worst = relevant[np.argsort(-ranks, kind="stable")][:shown]
            rank_of = dict(zip(relevant.tolist(), ranks.tolist(), strict=True))
            rows.append({"query": query.dataset.items[q].path, "query_label": ",".join(query.dataset.items[q].labels),
                         "ap": round(float(ap[q]), 6), "top": top,
                         "worst_relevant": [{"path": items[j].path, "rank": rank_of[int(j)], "relevant": True}
                                            for j in worst]})
        out[kind] = rows
    return out


def build_report(spec: RunSpec, name: str, catalogue: _Side, query: _Side, info: Any, result: mx.RetrievalMetrics,
                 topk: dict[str, Any], agreement: dict[int, float], examples: dict[str, Any],
                 artifacts: dict[str, str], timings: dict[str, float], loo: bool) -> dict[str, Any]:
    """The self-describing JSON of one (dataset, model, protocol)."""
    per_class = result["per_class"]

    def finite(v: float) -> float | None:
        return None if np.isnan(v) else round(float(v), 6)

    dataset: dict[str, Any] = {
        "name": name, "root": str(catalogue.dataset.root), "fingerprint": catalogue.checked.fingerprint,
        "n_images": len(catalogue.dataset) + (0 if loo else len(query.dataset)),
        "n_classes": len(per_class["classes"]),
        "n_excluded": len(catalogue.excluded) + (0 if loo else len(query.excluded)),
        "excluded": catalogue.excluded + ([] if loo else query.excluded),
    }
    if not loo:
        dataset["queries_fingerprint"] = query.checked.fingerprint
        dataset["n_catalogue"], dataset["n_queries"] = len(catalogue.dataset), len(query.dataset)
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "spec": {"dataset": spec.dataset, "protocol": spec.protocol, "catalogue": spec.catalogue,
                 "queries": spec.queries, "ks": list(spec.ks), "model": info.id},
        "protocol": spec.protocol,
        "dataset": dataset,
        "model": {"id": info.id, "family": info.family, "dim": info.dim, "device": info.device, "dtype": info.dtype,
                  "weights_source": info.weights_source, "weights_sha256": info.weights_sha256,
                  "embeddings_cached": catalogue.cached},
        "metrics": {
            "map": finite(result["map"]),
            "n_queries": result["n_queries"], "n_scored_queries": result["n_scored_queries"],
            "n_queries_without_relevant": result["n_queries_without_relevant"],
            "precision_at_k": {str(k): finite(v) for k, v in topk["precision_at_k"].items()},
            "recall_at_k": {str(k): finite(v) for k, v in topk["recall_at_k"].items()},
            "map_at_k": {str(k): finite(v) for k, v in topk["map_at_k"].items()},
            "exact_precision_at_k": {str(k): finite(v) for k, v in result["precision_at_k"].items()},
            "exact_map_at_k": {str(k): finite(v) for k, v in result["map_at_k"].items()},
            "pr_curve": {"recall": result["pr_recall"].round(6).tolist(),
                         "precision": [finite(v) for v in result["pr_precision"]]},
            "per_class": [{"class": c, "n_queries": int(per_class["n_queries"][i]), "ap": finite(per_class["ap"][i]),
                           "pr_precision": [finite(v) for v in per_class["pr_precision"][i]]}
                          for i, c in enumerate(per_class["classes"])],
        },
        "index": {"exact": True, "recall_at_k": {str(k): round(v, 6) for k, v in agreement.items()}},
        "examples": examples,
        "artifacts": artifacts,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
