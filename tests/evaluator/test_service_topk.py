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
