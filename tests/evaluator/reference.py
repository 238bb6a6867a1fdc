"""Slow, obvious reference implementations of the metrics: one query at a time, sklearn for AP."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve


def relevance(query_labels: list[set[int]], catalogue_labels: list[set[int]]) -> np.ndarray:
    """rel[i, j]: query i and catalogue item j share at least one label."""
    return np.array([[bool(q & c) for c in catalogue_labels] for q in query_labels], dtype=bool)


def _valid(n_catalogue: int, exclude: int) -> np.ndarray:
    return np.array([j for j in range(n_catalogue) if j != exclude], dtype=np.int64)


def sklearn_ap(scores: np.ndarray, rel: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Per-query ``average_precision_score`` over the catalogue minus the excluded item; NaN without positives."""
    out = np.full(scores.shape[0], np.nan)
    for i in range(scores.shape[0]):
        keep = _valid(scores.shape[1], -1 if exclude is None else int(exclude[i]))
        if rel[i, keep].any():
            out[i] = average_precision_score(rel[i, keep], scores[i, keep])
    return out


def ranking(row: np.ndarray, keep: np.ndarray) -> list[int]:
    """Catalogue indices by descending score, ties by ascending index."""
    return sorted(keep.tolist(), key=lambda j: (-float(row[j]), j))


def at_k(
    scores: np.ndarray, rel: np.ndarray, ks: list[int], exclude: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """P@k, R@k and AP@k per query (rows) and k (columns), straight from the definitions."""
    n = scores.shape[0]
    out = {name: np.full((n, len(ks)), np.nan) for name in ("p", "r", "ap")}
    for i in range(n):
        keep = _valid(scores.shape[1], -1 if exclude is None else int(exclude[i]))
        order = ranking(scores[i], keep)
        big_r = int(rel[i, keep].sum())
        for c, k in enumerate(ks):
            top = order[:k]
            hits = sum(bool(rel[i, j]) for j in top)
            out["p"][i, c] = hits / k
            if big_r:
                out["r"][i, c] = hits / big_r
                total, seen = 0.0, 0
                for rank, j in enumerate(top, start=1):
                    if rel[i, j]:
                        seen += 1
                        total += seen / rank
                out["ap"][i, c] = total / min(big_r, k)
    return out


def top_indices(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The first k of each query's ranking, -1 past the end."""
    out = np.full((scores.shape[0], k), -1, dtype=np.int64)
    for i in range(scores.shape[0]):
        order = ranking(scores[i], _valid(scores.shape[1], -1 if exclude is None else int(exclude[i])))[:k]
        out[i, : len(order)] = order
    return out


def pr11(scores: np.ndarray, rel: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """11-point interpolated precision per query from sklearn's precision_recall_curve; NaN without positives."""
    out = np.full((scores.shape[0], 11), np.nan)
    for i in range(scores.shape[0]):
        keep = _valid(scores.shape[1], -1 if exclude is None else int(exclude[i]))
        y = rel[i, keep]
        if not y.any():
            continue
        precision, recall, _ = precision_recall_curve(y, scores[i, keep])
        precision, recall = precision[:-1], recall[:-1]  # drop the artificial (recall 0, precision 1) end
        tp = np.rint(recall * y.sum())
        for level in range(11):
            out[i, level] = precision[10 * tp >= level * y.sum()].max()
    return out
