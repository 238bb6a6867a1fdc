"""Training on embeddings: the validation split, a head that beats the base embeddings on held-out
items, determinism, and a search that stays within its budget."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from services.adapters.data import validation_split
from services.adapters.search import SearchSettings, search
from services.adapters.train import Hyper, class_balanced_batches, fit, validation_map
from services.common.adapters import apply_head


def _embeddings(n_per_class: int = 40, classes: int = 8, dim: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Classes that differ in a few directions buried under larger shared noise: the base embeddings
    retrieve poorly, a linear map can separate them."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = rng.standard_normal((classes, 6)) * 1.5
    x = rng.standard_normal((len(labels), dim))
    x[:, :6] += centres[labels]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_validation_split_is_stratified_seeded_and_never_takes_a_whole_class() -> None:
    labels = np.array([0] * 20 + [1] * 7 + [2] * 2 + [3])
    mask = validation_split(labels, 0.15, seed=4)
    assert [int(mask[labels == c].sum()) for c in range(4)] == [3, 1, 1, 0]
    assert (mask == validation_split(labels, 0.15, seed=4)).all()
    assert not (mask == validation_split(labels, 0.15, seed=5)).all()


def test_batches_cover_every_item_with_positives() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 9)
    batches = class_balanced_batches(labels, 8, 4, np.random.default_rng(0))
    seen = np.concatenate(batches)
    assert set(seen) == set(range(len(labels)))
    for batch in batches:
        _, counts = np.unique(labels[batch], return_counts=True)
        assert (counts % 4 == 0).all()


@pytest.mark.parametrize("loss", ["supcon", "triplet", "contrastive", "softmax"])
def test_every_loss_beats_the_base_on_held_out_items(loss: str) -> None:
    x, y = _embeddings()
    val = validation_split(y, 0.25, seed=0)
    hyper = Hyper(loss=loss, miner={"triplet": "semihard", "contrastive": "hard"}.get(loss, "none"), out_dim=32,
                  lr=1e-2 if loss == "softmax" else 3e-3, margin=0.3 if loss != "contrastive" else 0.8, batch_size=64)
    result = fit(x[~val], y[~val], x[val], y[val], hyper, n_classes=8, max_epochs=40, patience=40)
    t = torch.from_numpy
    base = validation_map(t(x[val]), t(y[val]), t(x[~val]), t(y[~val]))
    adapted = apply_head(result.head, x)
    measured = validation_map(t(adapted[val]), t(y[val]), t(adapted[~val]), t(y[~val]))
    assert measured == pytest.approx(result.best_map, abs=1e-4)  # the kept head is the best epoch's
    assert result.best_map > base + 0.05, (base, result.best_map)  # measured: +0.07 to +0.21
    assert [p["epoch"] for p in result.curve] == list(range(1, len(result.curve) + 1))


def test_training_is_deterministic_and_the_search_keeps_its_budget() -> None:
    x, y = _embeddings(seed=1)
    val = validation_split(y, 0.2, seed=0)
    settings = SearchSettings(budget_seconds=4.0, max_trials=50, max_epochs=15, patience=4)
    start = time.monotonic()
    result = search(x, y, 8, val, settings)
    assert time.monotonic() - start < settings.budget_seconds + 3.0  # a running trial stops at its next epoch
    assert result.trials and result.trials[0]["hyperparameters"]["loss"] == "softmax"  # the starting points first
    fixed = SearchSettings(budget_seconds=600, max_trials=2, max_epochs=15, patience=15)
    first, second = search(x, y, 8, val, fixed), search(x, y, 8, val, fixed)
    assert first.best.head.to_bytes() == second.best.head.to_bytes()
    assert first.trials == [{**t, "seconds": first.trials[i]["seconds"]} for i, t in enumerate(second.trials)]
    assert first.best.best_map > first.base_map


def test_an_adapter_that_does_not_beat_the_base_is_not_written(tmp_path: object) -> None:
    from pathlib import Path

    from services.adapters.data import Catalogue
    from services.adapters.search import train_adapter
    from services.common.errors import FailedPrecondition
    from services.evaluator.datasets import CheckedDataset, Dataset

    # Classes that the base embeddings already separate perfectly (validation mAP 1): nothing can beat them.
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(8), 40)
    x = np.eye(48, dtype=np.float32)[y] + 0.01 * rng.standard_normal((len(y), 48)).astype(np.float32)
    dataset = Dataset("noise", Path(str(tmp_path)), ())
    catalogue = Catalogue(dataset, CheckedDataset(dataset, (), "f" * 64), x, y, [f"c{i}" for i in range(8)], "test",
                          [], 0.0)
    out = Path(str(tmp_path)) / "noise"
    with pytest.raises(FailedPrecondition, match="no adapter beat the base embeddings"):
        train_adapter(catalogue, name="noise", out=out, base_model="m", base_weights_sha256="0" * 64,
                      settings=SearchSettings(budget_seconds=600, max_trials=1, max_epochs=4, patience=2),
                      dataset_description={}, figures=False)
    assert not out.exists()


def test_validation_map_is_sklearns_average_precision_with_ties() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(3)
    # Coarse values make many ties, within and across classes.
    catalogue = np.round(rng.standard_normal((40, 3)), 0).astype(np.float32) + 0.01
    queries = np.round(rng.standard_normal((12, 3)), 0).astype(np.float32) + 0.01
    c_labels, q_labels = rng.integers(0, 4, 40), rng.integers(0, 5, 12)  # class 4 has no catalogue item
    normalised = catalogue / np.linalg.norm(catalogue, axis=1, keepdims=True)
    expected = [average_precision_score(c_labels == label, normalised @ (q / np.linalg.norm(q)))
                for q, label in zip(queries, q_labels, strict=True) if (c_labels == label).any()]
    t = torch.from_numpy
    assert validation_map(t(queries), t(q_labels), t(catalogue), t(c_labels)) == pytest.approx(np.mean(expected),
                                                                                                  abs=1e-6)
