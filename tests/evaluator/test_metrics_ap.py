"""Full-ranking AP and mAP against sklearn, with many ties, multi-label data and exclusions."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluator.metrics import (
    average_precision,
    catalogue_query,
    evaluate_scores,
    leave_one_out,
)
from tests.evaluator import reference


def tied_scores(rng: np.random.Generator, shape: tuple[int, int], dtype: type = np.float32) -> np.ndarray:
    """Scores rounded to one decimal: about 20 distinct values per row, so ties are everywhere."""
    return np.round(rng.uniform(-1, 1, shape), 1).astype(dtype)


def unit_vectors(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ap_matches_sklearn_with_many_ties(dtype: type) -> None:
    rng = np.random.default_rng(0)
    scores = tied_scores(rng, (80, 300), dtype)
    q_lab, c_lab = rng.integers(0, 6, 80), rng.integers(0, 5, 300)  # class 5 has no catalogue item
    m = evaluate_scores(scores, q_lab, c_lab)
    rel = q_lab[:, None] == c_lab[None, :]
    expected = reference.sklearn_ap(scores, rel)
    np.testing.assert_allclose(m["ap"], expected, rtol=0, atol=1e-9, equal_nan=True)
    without = np.flatnonzero(q_lab == 5)
    assert without.size > 0 and m["n_queries_without_relevant"] == without.size
    np.testing.assert_array_equal(m["queries_without_relevant"], without)
    assert m["map"] == pytest.approx(np.nanmean(expected), abs=1e-12)
    assert m["n_scored_queries"] == 80 - without.size
    np.testing.assert_array_equal(m["n_relevant"], rel.sum(1))


def test_average_precision_with_signed_zeros_and_constant_rows() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(-0.2, 0.2, (40, 50)), 1)
    scores[scores == 0] = np.where(rng.random(int((scores == 0).sum())) < 0.5, -0.0, 0.0)  # -0.0 ties 0.0
    scores[:3] = 0.25  # every item tied: AP is the share of relevant items
    rel = rng.random((40, 50)) < 0.3
    rel[:, 0] = True
    expected = reference.sklearn_ap(scores, rel)
    np.testing.assert_allclose(average_precision(scores, rel), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(average_precision(scores, rel)[:3], rel[:3].mean(1), atol=1e-12)


def test_multilabel_relevance_is_any_shared_label() -> None:
    rng = np.random.default_rng(2)
    n_classes = 70  # more than 64 labels: two packed words per item
    q_member = rng.random((50, n_classes)) < 0.04
    c_member = rng.random((200, n_classes)) < 0.04
    q_member[:5] = False  # queries without any label have no relevant item
    scores = tied_scores(rng, (50, 200))
    m = evaluate_scores(scores, q_member, c_member, ks=[1, 5, 300])
    rel = reference.relevance([set(np.flatnonzero(r)) for r in q_member], [set(np.flatnonzero(r)) for r in c_member])
    np.testing.assert_allclose(m["ap"], reference.sklearn_ap(scores, rel), rtol=0, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(m["n_relevant"], rel.sum(1))
    ref = reference.at_k(scores, rel, [1, 5, 300])
    np.testing.assert_allclose(m["precision_at_k_per_query"], ref["p"], atol=1e-12)
    np.testing.assert_allclose(m["ap_at_k_per_query"], ref["ap"], atol=1e-12, equal_nan=True)


def test_leave_one_out_excludes_the_query_itself() -> None:
    rng = np.random.default_rng(3)
    n = 120
    labels = rng.integers(0, 8, n)
    labels[0] = 99  # a class of one: no relevant item once the query is excluded
    scores = tied_scores(rng, (n, n))
    np.fill_diagonal(scores, 5.0)  # the query would rank itself first if it were not excluded
    m = evaluate_scores(scores, labels, labels, exclude=np.arange(n), ks=[1, 10])
    rel = labels[:, None] == labels[None, :]
    expected = reference.sklearn_ap(scores, rel, exclude=np.arange(n))
    np.testing.assert_allclose(m["ap"], expected, rtol=0, atol=1e-9, equal_nan=True)
    assert m["queries_without_relevant"].tolist() == [0]
    np.testing.assert_array_equal(m["n_relevant"], rel.sum(1) - 1)
    assert not (m["top_indices"] == np.arange(n)[:, None]).any()
    assert (m["top_indices"] >= 0).all()


def test_leave_one_out_from_embeddings_equals_the_score_matrix_path() -> None:
    rng = np.random.default_rng(4)
    x = unit_vectors(rng, 150)
    labels = rng.integers(0, 7, 150)
    from_embeddings = leave_one_out(x, labels, ks=[1, 5])
    from_scores = evaluate_scores(x @ x.T, labels, labels, exclude=np.arange(150), ks=[1, 5])
    np.testing.assert_array_equal(from_embeddings["ap"], from_scores["ap"])
    np.testing.assert_array_equal(from_embeddings["top_indices"], from_scores["top_indices"])
    assert from_embeddings["protocol"] == "leave_one_out"


def test_catalogue_query_from_embeddings_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    q, c = unit_vectors(rng, 40), unit_vectors(rng, 160)
    q_lab, c_lab = rng.integers(0, 4, 40), rng.integers(0, 4, 160)
    m = catalogue_query(q, q_lab, c, c_lab, ks=[3])
    expected = reference.sklearn_ap(q @ c.T, q_lab[:, None] == c_lab[None, :])
    np.testing.assert_allclose(m["ap"], expected, rtol=0, atol=1e-9)
    assert m["n_catalogue"] == 160 and m["n_queries"] == 40


def test_block_size_does_not_change_results() -> None:
    rng = np.random.default_rng(6)
    scores = tied_scores(rng, (90, 130))
    labels = rng.integers(0, 5, 130)
    whole = evaluate_scores(scores, labels[:90], labels, exclude=np.arange(90), ks=[1, 7])
    progress: list[tuple[int, int]] = []
    row_by_row = evaluate_scores(scores, labels[:90], labels, exclude=np.arange(90), ks=[1, 7], max_chunk_bytes=1,
                                 progress=lambda done, total: progress.append((done, total)))
    assert progress[0] == (1, 90) and progress[-1] == (90, 90) and len(progress) == 90
    np.testing.assert_array_equal(whole["ap"], row_by_row["ap"])
    np.testing.assert_array_equal(whole["pr_precision_per_query"], row_by_row["pr_precision_per_query"])
    np.testing.assert_array_equal(whole["ap_at_k_per_query"], row_by_row["ap_at_k_per_query"])
    np.testing.assert_array_equal(whole["top_indices"], row_by_row["top_indices"])
    np.testing.assert_array_equal(whole["top_scores"], row_by_row["top_scores"])
