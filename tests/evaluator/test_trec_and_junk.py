"""The TREC export round-trips through ranx to our figures; junk follows revisitop's definition."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import numpy as np
import pytest

from services.evaluator import metrics as mx
from services.evaluator.datasets import Dataset, Item, check_images
from services.evaluator.protocols import CatalogueQuery, LeaveOneOut, Relevance, Side
from services.evaluator.reports import ModelReport, write_trec
from services.evaluator.spec import RunSpec


def _side(root: Path, items: list[Item], vectors: np.ndarray) -> Side:
    for item in items:
        (root / item.path).parent.mkdir(parents=True, exist_ok=True)
        (root / item.path).write_bytes(b"x")
    ds = Dataset("toy", root, tuple(items))
    return Side(ds, check_images(ds), vectors, [], 0.0, False)


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _report(side: Side, queries: Side, relevance: Relevance, exact: mx.RetrievalMetrics, depth: int) -> ModelReport:
    service = mx.service_topk_metrics(exact["top_indices"], relevance.query_labels, relevance.catalogue_labels,
                                      exact["n_relevant"], [1, 5, 10])
    return ModelReport(spec=RunSpec(dataset="toy", models=("m",)), protocol="leave_one_out", dataset_name="toy",
                       model=SimpleNamespace(id="toy-model"), catalogue=side, queries=queries, relevance=relevance,
                       exact=exact, service=service, service_top=exact["top_indices"],
                       service_scores=exact["top_scores"], index_recall={}, timings={}, trec_depth=depth)


def _ranx(tmp_path: Path, run_gz: Path, qrels_gz: Path) -> tuple[object, object]:
    ranx = pytest.importorskip("ranx")
    for gz in (run_gz, qrels_gz):
        with gzip.open(gz, "rb") as src, (tmp_path / gz.stem).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    qrels = ranx.Qrels.from_file(str(tmp_path / qrels_gz.stem), kind="trec")
    run = ranx.Run.from_file(str(tmp_path / run_gz.stem), kind="trec")
    return qrels, run


def test_trec_export_round_trips_through_ranx(tmp_path: Path) -> None:
    """On scores without ties, ranx recomputes our mAP and P@k from the exported files exactly, and
    our mAP@k once its denominator is converted: ranx divides AP@k by R, we by min(R, k)."""
    import ranx

    rng = np.random.default_rng(2)
    labels = [f"c{c}" for c in rng.integers(0, 4, 60)]
    side = _side(tmp_path / "ds", [Item(f"img {i}.jpg", (c,)) for i, c in enumerate(labels)], _unit(rng, 60))
    protocol = LeaveOneOut()
    relevance = protocol.relevance(side, side)
    exact = protocol.exact(side, side, relevance, [1, 5, 10], 59, lambda *_: None)
    report = _report(side, side, relevance, exact, depth=59)  # the whole catalogue: full-ranking AP
    write_trec(report, tmp_path / "toy.run.gz", tmp_path / "toy.qrels.gz")
    qrels, run = _ranx(tmp_path, tmp_path / "toy.run.gz", tmp_path / "toy.qrels.gz")
    ranx.evaluate(qrels, run, ["map", "precision@5", "map@10"], save_results_in_run=True)
    ids = [quote(item.path, safe="/._-+") for item in side.dataset.items]  # the export's query ids
    per_query = {metric: np.array([run.scores[metric][q] for q in ids]) for metric in ("map", "precision@5", "map@10")}
    assert len(run.scores["map"]) == 60  # every query, the ones with a space in their path included
    assert np.allclose(per_query["map"], exact["ap"], atol=1e-9)
    assert np.allclose(per_query["precision@5"], exact["precision_at_k_per_query"][:, 1], atol=1e-9)
    ours_at_10 = exact["ap_at_k_per_query"][:, 2] * np.minimum(exact["n_relevant"], 10) / exact["n_relevant"]
    assert np.allclose(per_query["map@10"], ours_at_10, atol=1e-9)


def _revisitop_positions(ranking: list[int], positives: set[int], junk: set[int]) -> np.ndarray:
    """revisitop's ``compute_map``: 0-based positions of the positives, each decreased by the junk
    images ranked before it (its loop, written out)."""
    pos = np.array([i for i, item in enumerate(ranking) if item in positives])
    junk_pos = np.array([i for i, item in enumerate(ranking) if item in junk])
    k = ij = 0
    for ip in range(len(pos)):
        while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
            k += 1
            ij += 1
        pos[ip] -= k
    return pos


def test_junk_is_removed_from_the_ranking_as_revisitop_does(tmp_path: Path) -> None:
    """A hand-made catalogue/query case: 2 queries, 10 catalogue images with distinct scores, some
    marked junk for the query's class. AP is computed from revisitop's junk-adjusted positions
    (non-interpolated here: revisitop's own AP interpolates between ranks, sklearn's does not)."""
    # Catalogue scores for query 0 (class a) and query 1 (class b), all distinct.
    scores = np.array([[0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],
                       [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]])
    items = [Item("0.jpg", (), ("a",)), Item("1.jpg", ("a",)), Item("2.jpg", ("b",), ("a",)), Item("3.jpg", ("a",)),
             Item("4.jpg", ("b",)), Item("5.jpg", (), ("a", "b")), Item("6.jpg", ("a",)), Item("7.jpg", ("b",)),
             Item("8.jpg", ("a",), ("b",)), Item("9.jpg", ("b",))]
    queries = [Item("q0.jpg", ("a",)), Item("q1.jpg", ("b",))]
    dim = 10  # vectors that give exactly these cosine scores: catalogue = identity rows, queries = score rows
    catalogue = _side(tmp_path / "c", items, np.eye(dim, dtype=np.float32))
    qvec = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    query_side = _side(tmp_path / "q", queries, qvec.astype(np.float32))
    protocol = CatalogueQuery()
    relevance = protocol.relevance(catalogue, query_side)
    assert [sorted(j for j in row if j >= 0) for row in relevance.exclude] == [[0, 2, 5], [5, 8]]
    exact = protocol.exact(catalogue, query_side, relevance, [1, 3], 10, lambda *_: None)
    for q, cls in enumerate("ab"):
        ranking = [int(j) for j in np.argsort(-scores[q])]
        positives = {j for j, item in enumerate(items) if cls in item.labels} - set(relevance.exclude[q].tolist())
        junk = {j for j, item in enumerate(items) if cls in item.junk}
        pos = _revisitop_positions(ranking, positives, junk)
        expected_ap = float(np.mean((np.arange(len(pos)) + 1) / (pos + 1)))
        assert exact["ap"][q] == pytest.approx(expected_ap, abs=1e-12)
        # P@k over the junk-free ranking: relevant among its first k, over k.
        assert exact["precision_at_k_per_query"][q, 1] == pytest.approx(float((pos < 3).sum()) / 3, abs=1e-12)
    # The junk never shows among the top-k.
    top = exact["top_indices"]
    assert not ({0, 2, 5} & set(top[0].tolist())) and not ({5, 8} & set(top[1].tolist()))
    # ...and the search service's answer (which knows nothing of junk) gets the same treatment.
    service = mx.service_topk_metrics(np.argsort(-scores, axis=1), relevance.query_labels,
                                      relevance.catalogue_labels, exact["n_relevant"], [1, 3], relevance.exclude)
    assert service["precision_at_k"] == exact["precision_at_k"]
