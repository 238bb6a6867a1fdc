"""Top-k metrics of the search service's rankings, and the index-agreement figure of the report."""

from __future__ import annotations

import numpy as np

from services.evaluator import metrics as mx
from services.evaluator.metrics import index_recall, service_topk_metrics


def _data(seed: int = 0, n: int = 60, classes: int = 4, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    vectors = rng.normal(size=(n, dim)) + 2.0 * np.eye(classes, dim)[labels]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32), labels


def test_exact_rankings_reproduce_the_metrics_module() -> None:
    vectors, labels = _data()
    members = np.eye(4, dtype=bool)[labels]
    result = mx.leave_one_out(vectors, members, ks=(1, 5, 10), top_k=10)
    topk = service_topk_metrics(result["top_indices"], members, members, result["n_relevant"], (1, 5, 10))
    for k in (1, 5, 10):
        assert abs(topk["precision_at_k"][k] - result["precision_at_k"][k]) < 1e-12
        assert abs(topk["recall_at_k"][k] - result["recall_at_k"][k]) < 1e-12
        assert abs(topk["map_at_k"][k] - result["map_at_k"][k]) < 1e-12
    assert index_recall(result["top_indices"], result["top_indices"], (1, 5, 10)) == {1: 1.0, 5: 1.0, 10: 1.0}


def test_a_worse_index_shows_in_both_figures() -> None:
    vectors, labels = _data(seed=1)
    members = np.eye(4, dtype=bool)[labels]
    result = mx.leave_one_out(vectors, members, ks=(5,), top_k=5)
    exact = result["top_indices"]
    damaged = exact.copy()
    damaged[:, 4] = -1  # the index returned only 4 hits for every query
    assert abs(index_recall(damaged, exact, (5,))[5] - 0.8) < 1e-12
    topk = service_topk_metrics(damaged, members, members, result["n_relevant"], (5,))
    assert topk["precision_at_k"][5] <= result["precision_at_k"][5]


def test_a_tie_broken_the_other_way_is_not_a_miss_and_a_real_miss_still_is() -> None:
    # Catalogue 1 and 2 are the same image (equal vectors): for query 0 they tie for the first place.
    # The engine put 2 first where the exact ranking put 1 (issue 10: Caltech-101's Faces and
    # Faces_easy hold duplicates; the exact scan and Edge broke such ties differently, and the old
    # definition reported index recall@1 of 0.99977 for an exact search).
    catalogue = np.array([[1, 0, 0], [0.6, 0.8, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    queries = np.array([[0.6, 0.8, 0]], dtype=np.float32)
    exact = np.array([[1, 2, 0, 3]])
    engine = np.array([[2, 1, 0, 3]])
    exact_scores = mx.similarities(queries, catalogue, exact)
    engine_scores = mx.similarities(queries, catalogue, engine)
    np.testing.assert_allclose(engine_scores, [[1.0, 1.0, 0.6, 0.0]], atol=1e-6)
    assert index_recall(engine, exact, (1,)) == {1: 0.0}  # by ids alone: a miss
    assert index_recall(engine, exact, (1, 2, 3), exact_scores, engine_scores) == {1: 1.0, 2: 1.0, 3: 1.0}
    # A true miss: the engine's first hit is item 3 (similarity 0), well below the exact first place.
    missed = np.array([[3, 1, 2, -1]])
    assert index_recall(missed, exact, (1, 3), exact_scores, mx.similarities(queries, catalogue, missed)) == \
        {1: 0.0, 3: 2 / 3}
    # Without ties both definitions agree.
    vectors, labels = _data(seed=2)
    result = mx.leave_one_out(vectors, np.eye(4, dtype=bool)[labels], ks=(5,), top_k=5)
    top = result["top_indices"].copy()
    top[::2, 0] = top[::2, 4]  # every other row: the 5th neighbour first, the 1st missing (one real miss)
    top[::2, 4] = -1
    plain = index_recall(top, result["top_indices"], (5,))
    tied = index_recall(top, result["top_indices"], (5,), result["top_scores"],
                        mx.similarities(vectors, vectors, top))
    assert plain == tied and abs(plain[5] - 0.9) < 1e-12
