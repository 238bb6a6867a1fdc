"""Vector arithmetic shared by the services: the composed query of DESIGN §5."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def compose(parts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Composed queries (image + text, ...): ``normalise(sum_i w_i * normalise(v_i))``, row by row.

    Args:
        parts: k arrays of the same shape, (dim,) for one query or (n, dim) for n queries; each row
            is L2-normalised before weighting (any non-zero norm).
        weights: k finite weights (any sign; e.g. 0.5 and 0.5).

    Returns:
        float32 unit vectors of the parts' shape; a row whose weighted sum is zero (or not finite)
        is NaN there, for the caller to refuse.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"{len(parts)} parts and {len(weights)} weights")
    total = np.zeros(np.shape(parts[0]), dtype=np.float64)
    for part, weight in zip(parts, weights, strict=True):
        v = np.asarray(part, dtype=np.float64)
        total += float(weight) * v / np.linalg.norm(v, axis=-1, keepdims=True)
    norm = np.linalg.norm(total, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norm > 1e-12, total / norm, np.nan)
    return out.astype(np.float32)
