"""P@k, R@k, mAP@k, top-k lists, the 11-point PR curve and the per-class table against references."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluator.metrics import PR_LEVELS, evaluate_scores, leave_one_out
from tests.evaluator import reference
from tests.evaluator.test_metrics_ap import tied_scores, unit_vectors


@pytest.mark.parametrize(("leave_out", "dtype"), [(False, np.float32), (True, np.float32), (True, np.float64)])
def test_at_k_metrics_match_the_reference_with_ties(leave_out: bool, dtype: type) -> None:
    rng = np.random.default_rng(10)
    n, ks = 60, [1, 2, 5, 17, 59, 60, 250]  # 59/60: the whole catalogue with and without the query; 250: past it
    scores = tied_scores(rng, (n, n), dtype)
    labels = rng.integers(0, 6, n)
    exclude = np.arange(n) if leave_out else None
    m = evaluate_scores(scores, labels, labels, exclude=exclude, ks=ks)
    rel = labels[:, None] == labels[None, :]
    ref = reference.at_k(scores, rel, ks, exclude)
    np.testing.assert_allclose(m["precision_at_k_per_query"], ref["p"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["recall_at_k_per_query"], ref["r"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(m["ap_at_k_per_query"], ref["ap"], rtol=0, atol=1e-12, equal_nan=True)
    scored = ~np.isnan(ref["ap"][:, 0])
    for c, k in enumerate(ks):
        assert m["precision_at_k"][k] == pytest.approx(ref["p"][scored, c].mean(), abs=1e-12)
        assert m["recall_at_k"][k] == pytest.approx(ref["r"][scored, c].mean(), abs=1e-12)
        assert m["map_at_k"][k] == pytest.approx(ref["ap"][scored, c].mean(), abs=1e-12)
    width = min(max(ks), n)
    np.testing.assert_array_equal(m["top_indices"], reference.top_indices(scores, width, exclude))


def test_ties_at_the_top_k_boundary_are_broken_by_catalogue_index() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]], dtype=np.float32)
    m = evaluate_scores(scores, np.array([0]), np.array([1, 1, 0, 1, 0]), ks=[1, 3])
    assert m["top_indices"].tolist() == [[1, 3, 0]]
    np.testing.assert_array_equal(m["top_scores"], np.array([[0.9, 0.9, 0.5]], dtype=np.float32))
    # Item 2 (relevant) ties item 0 (not relevant) at rank 3; the lower index, item 0, is ranked first.
    assert m["precision_at_k"] == {1: 0.0, 3: 0.0}


def test_k_larger_than_the_catalogue() -> None:
    scores = np.array([[0.9, 0.2, 0.7]], dtype=np.float32)
    m = evaluate_scores(scores, np.array([0]), np.array([0, 1, 0]), ks=[2, 10])
    assert m["top_indices"].tolist() == [[0, 2, 1]]  # width is capped at the catalogue size
    assert m["precision_at_k"] == {2: 1.0, 10: pytest.approx(0.2)}  # P@10 keeps the denominator 10
    assert m["recall_at_k"] == {2: 1.0, 10: 1.0}
    assert m["map_at_k"] == {2: 1.0, 10: 1.0}
    # Leave-one-out over 3 items: 2 candidates each; the missing places of the top-3 list are padded.
    x = np.eye(3, dtype=np.float32)
    loo = leave_one_out(x, np.array([0, 0, 1]), ks=[3])
    assert loo["top_indices"][:, 2].tolist() == [-1, -1, -1]
    assert np.isnan(loo["top_scores"][:, 2]).all()
    assert loo["precision_at_k"][3] == pytest.approx(1 / 3)


def test_ap_at_k_equals_ap_when_k_covers_the_catalogue_without_ties() -> None:
    rng = np.random.default_rng(11)
    x = unit_vectors(rng, 80)
    m = leave_one_out(x, rng.integers(0, 5, 80), ks=[79])
    np.testing.assert_allclose(m["ap_at_k_per_query"][:, 0], m["ap"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["recall_at_k_per_query"][:, 0], 1.0)


@pytest.mark.parametrize("leave_out", [False, True])
def test_pr_curve_matches_sklearn_interpolated(leave_out: bool) -> None:
    rng = np.random.default_rng(12)
    n = 70
    scores = tied_scores(rng, (n, n))
    labels = rng.integers(0, 4, n)
    labels[:3] = 9  # a class of three: recall levels 1/3 and 2/3 fall between the 11 points
    exclude = np.arange(n) if leave_out else None
    m = evaluate_scores(scores, labels, labels, exclude=exclude, class_names=[f"c{i}" for i in range(10)])
    expected = reference.pr11(scores, labels[:, None] == labels[None, :], exclude)
    np.testing.assert_allclose(m["pr_precision_per_query"], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["pr_precision"], expected.mean(0), atol=1e-12)
    np.testing.assert_array_equal(m["pr_recall"], PR_LEVELS)
    assert (np.diff(m["pr_precision_per_query"], axis=1) <= 0).all()  # interpolation makes it non-increasing


def test_per_class_table() -> None:
    rng = np.random.default_rng(13)
    n = 90
    scores = tied_scores(rng, (n, n))
    member = np.zeros((n, 4), dtype=bool)
    member[np.arange(n), rng.integers(0, 3, n)] = True
    member[:10, 3] = True  # ten two-label items: they count in both of their classes
    m = evaluate_scores(scores, member, member, exclude=np.arange(n), class_names=["a", "b", "c", "d"])
    table = m["per_class"]
    assert table["classes"] == ["a", "b", "c", "d"]
    for c in range(4):
        mine = member[:, c]
        assert table["n_queries"][c] == mine.sum() and table["n_scored"][c] == mine.sum()
        assert table["ap"][c] == pytest.approx(m["ap"][mine].mean(), abs=1e-12)
        np.testing.assert_allclose(table["pr_precision"][c], m["pr_precision_per_query"][mine].mean(0), atol=1e-12)


def test_class_without_scored_queries_has_nan_ap() -> None:
    scores = np.array([[0.3, 0.1], [0.2, 0.4]], dtype=np.float32)
    m = evaluate_scores(scores, np.array([0, 2]), np.array([0, 1]), class_names=["a", "b", "c", "unused"])
    assert m["per_class"]["classes"] == ["a", "b", "c", "unused"]
    assert m["per_class"]["n_queries"].tolist() == [1, 0, 1, 0]
    assert m["per_class"]["n_scored"].tolist() == [1, 0, 0, 0]
    assert m["per_class"]["ap"][0] == 1.0 and np.isnan(m["per_class"]["ap"][1:]).all()
    assert m["map"] == 1.0 and m["n_queries_without_relevant"] == 1


def test_a_single_item_has_nothing_to_retrieve() -> None:
    m = leave_one_out(np.array([[1.0, 0.0]], dtype=np.float32), np.array([0]), ks=[1])
    assert m["n_queries_without_relevant"] == 1 and np.isnan(m["map"]) and np.isnan(m["precision_at_k"][1])
    assert m["top_indices"].tolist() == [[-1]]
