"""The hyperparameter search (optuna, within a time budget) and the whole ``adapt train`` job.

The search trains heads on the catalogue less its validation part and ranks them by validation mAP
(``train.validation_map``: validation items as queries against the training items). The best
configuration is then refitted on the whole catalogue for the number of epochs that validation
chose, and written as an adapter (``services.common.adapters``) with its card and figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.adapters.data import Catalogue, validation_split
from services.adapters.train import MINERS, Fit, Hyper, Pruned, fit, hyper_dict
from services.common.adapters import check_name, write_adapter
from services.common.errors import FailedPrecondition

log = logging.getLogger(__name__)

# Tried first, before the sampler explores: the two configurations that did best on a held-out part
# of the Caltech-101 *catalogue* during development (the query split was never used to choose them),
# one metric-learning loss and the classifier head. The search space around them is below.
STARTING_POINTS = (
    Hyper(loss="softmax", label_smoothing=0.1, lr=1e-3),
    Hyper(loss="supcon", temperature=0.1, out_dim=256, lr=1e-3),
)


@dataclass(frozen=True)
class SearchSettings:
    """How much searching and training a job does.

    Attributes:
        budget_seconds: wall time of the whole search (no trial starts after it, a running trial
            stops at its next epoch); the refit comes on top.
        max_trials: at most this many configurations.
        max_epochs: epochs of one training run (its learning-rate cycle).
        patience: early stopping: epochs without a better validation mAP.
        validation_fraction: the share of each class held out for validation.
        seed: seeds the split, the sampler and every training run.
        losses: the losses the search may pick.
    """

    budget_seconds: float = 45.0
    max_trials: int = 40
    max_epochs: int = 40
    patience: int = 6
    validation_fraction: float = 0.15
    seed: int = 0
    losses: tuple[str, ...] = ("supcon", "triplet", "contrastive", "softmax")


@dataclass
class SearchResult:
    """The trials and the one selected.

    Attributes:
        best: the selected trial's training (on the catalogue less validation).
        trials: per trial: number, hyperparameters, validation mAP, epochs, why it stopped, seconds.
        base_map: validation mAP of the base embeddings (what the adapter has to beat).
        seconds: wall time of the search.
    """

    best: Fit
    trials: list[dict[str, Any]] = field(default_factory=list)
    base_map: float = float("nan")
    seconds: float = 0.0


def _suggest(trial: Any, settings: SearchSettings) -> Hyper:
    loss = trial.suggest_categorical("loss", list(settings.losses))
    miner = trial.suggest_categorical(f"miner_{loss}", list(MINERS[loss])) if len(MINERS[loss]) > 1 else "none"
    params: dict[str, Any] = {"loss": loss, "miner": miner,
                              "lr": trial.suggest_float("lr", 2e-4, 1e-2, log=True),
                              "hidden_dim": trial.suggest_categorical("hidden_dim", [0, 1024])}
    if loss == "supcon":
        params["temperature"] = trial.suggest_float("temperature", 0.03, 0.3, log=True)
    elif loss == "triplet":
        params["margin"] = trial.suggest_float("margin_triplet", 0.05, 0.5)
    elif loss == "contrastive":
        params["margin"] = trial.suggest_float("margin_contrastive", 0.3, 1.2)
    else:
        params["label_smoothing"] = trial.suggest_float("label_smoothing", 0.0, 0.3)
    if loss != "softmax":
        params["out_dim"] = trial.suggest_categorical("out_dim", [128, 256, 512])
    return Hyper(**params)


def _as_params(h: Hyper) -> dict[str, Any]:
    """A starting point in the sampler's parameter names (for ``study.enqueue_trial``)."""
    out: dict[str, Any] = {"loss": h.loss, "lr": h.lr, "hidden_dim": h.hidden_dim}
    if len(MINERS[h.loss]) > 1:
        out[f"miner_{h.loss}"] = h.miner
    if h.loss == "supcon":
        out["temperature"] = h.temperature
    elif h.loss == "softmax":
        out["label_smoothing"] = h.label_smoothing
    else:
        out[f"margin_{h.loss}"] = h.margin
    if h.loss != "softmax":
        out["out_dim"] = h.out_dim
    return out


def search(x: np.ndarray, y: np.ndarray, n_classes: int, validation: np.ndarray, settings: SearchSettings,
           progress: Callable[[str], None] | None = None) -> SearchResult:
    """Searches heads on ``x[~validation]``, ranked by validation mAP on ``x[validation]``.

    Seeded TPE sampler, median pruner (a trial whose validation mAP is below the median of earlier
    trials at the same epoch stops), the ``STARTING_POINTS`` first.
    """
    import optuna

    from services.adapters.train import validation_map

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    say = progress or (lambda _m: None)
    start = time.monotonic()
    deadline = start + settings.budget_seconds
    xt, yt, xv, yv = x[~validation], y[~validation], x[validation], y[validation]
    base_map = validation_map(torch.from_numpy(xv), torch.from_numpy(yv), torch.from_numpy(xt), torch.from_numpy(yt))
    say(f"validation mAP of the base embeddings: {base_map:.4f} ({len(yv)} validation items against "
        f"{len(yt)} training items)")
    fits: dict[int, Fit] = {}
    rows: list[dict[str, Any]] = []
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=6)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=8)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    for point in STARTING_POINTS:
        if point.loss in settings.losses:
            study.enqueue_trial(_as_params(point))

    def objective(trial: Any) -> float:
        hyper = _suggest(trial, settings)
        started = time.monotonic()

        def on_epoch(epoch: int, score: float) -> None:
            trial.report(score, epoch)
            if trial.should_prune():
                raise Pruned

        result = fit(xt, yt, xv, yv, hyper, n_classes=n_classes, seed=settings.seed, max_epochs=settings.max_epochs,
                     patience=settings.patience, deadline=deadline, on_epoch=on_epoch)
        fits[trial.number] = result
        rows.append({"trial": trial.number, "hyperparameters": hyper_dict(hyper),
                     "validation_map": round(result.best_map, 6), "best_epoch": result.best_epoch,
                     "epochs": len(result.curve), "stopped": result.stopped,
                     "seconds": round(time.monotonic() - started, 2)})
        say(f"trial {trial.number}: {hyper.loss} {hyper_dict(hyper)} -> validation mAP {result.best_map:.4f} "
            f"at epoch {result.best_epoch} ({result.stopped}, {time.monotonic() - started:.1f} s)")
        if result.stopped == "pruned":
            raise optuna.TrialPruned
        return result.best_map

    study.optimize(objective, n_trials=settings.max_trials, timeout=settings.budget_seconds, catch=())
    scored = [t for t in study.trials if t.number in fits and fits[t.number].best_epoch > 0]
    if not scored:
        raise RuntimeError("no trial finished an epoch within the budget; raise --budget-seconds")
    best = max(scored, key=lambda t: (fits[t.number].best_map, -t.number))
    return SearchResult(fits[best.number], rows, base_map, time.monotonic() - start)


@dataclass(frozen=True)
class TrainedAdapter:
    """What ``train_adapter`` wrote and measured."""

    directory: Path
    model_id: str
    head_sha256: str
    card: dict[str, Any]
    train_seconds: float


def train_adapter(catalogue: Catalogue, *, name: str, out: Path, base_model: str, base_weights_sha256: str,
                  settings: SearchSettings, dataset_description: dict[str, Any],
                  progress: Callable[[str], None] | None = None, figures: bool = True) -> TrainedAdapter:
    """Searches, refits on the whole catalogue, and writes the adapter into ``out`` (``head.npz``,
    ``card.json``, ``SHA256SUMS``, and with ``figures`` the validation curve and the before/after
    t-SNE maps of the validation items).

    ``train_seconds`` is the search plus the refit (not the embedding, not the figures).

    Raises:
        FailedPrecondition: no configuration beat the base embeddings on validation (an adapter
            that makes retrieval worse is never written).
    """
    check_name(name)
    say = progress or (lambda _m: None)
    torch.manual_seed(settings.seed)
    start = time.monotonic()
    validation = validation_split(catalogue.labels, settings.validation_fraction, settings.seed)
    n_classes = len(catalogue.classes)
    result = search(catalogue.vectors, catalogue.labels, n_classes, validation, settings, say)
    best = result.best
    if not best.best_map > result.base_map:
        raise FailedPrecondition(
            f"no adapter beat the base embeddings on the held-out part of the catalogue (validation mAP "
            f"{best.best_map:.4f} against {result.base_map:.4f} for {base_model} alone, {len(result.trials)} "
            "trials); nothing was written. A larger --budget-seconds, or more images per class, may help")
    say(f"selected: {best.hyper.loss} {hyper_dict(best.hyper)}, validation mAP {best.best_map:.4f} at epoch "
        f"{best.best_epoch}; refitting on all {len(catalogue.labels)} catalogue items")
    refit = fit(catalogue.vectors, catalogue.labels, catalogue.vectors[:0], catalogue.labels[:0], best.hyper,
                n_classes=n_classes, seed=settings.seed, max_epochs=settings.max_epochs, stop_after=best.best_epoch)
    train_seconds = time.monotonic() - start
    say(f"trained in {train_seconds:.1f} s ({len(result.trials)} trials in {result.seconds:.1f} s, refit "
        f"{refit.curve[-1]['seconds'] if refit.curve else 0:.1f} s)")
    n_multi = sum(len(item.labels) > 1 for item in catalogue.dataset.items)
    card: dict[str, Any] = {
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": {"model": base_model, "weights_sha256": base_weights_sha256, "dim": int(catalogue.vectors.shape[1])},
        "head": {"kind": "mlp" if best.hyper.hidden_dim else "linear", "hidden_dim": best.hyper.hidden_dim},
        "loss": best.hyper.loss,
        "miner": best.hyper.miner,
        "hyperparameters": hyper_dict(best.hyper),
        "classes": catalogue.classes if best.hyper.loss == "softmax" else [],
        "training": {
            "dataset": {**dataset_description, "fingerprint": catalogue.checked.fingerprint,
                        "n_items": len(catalogue.labels), "n_classes": n_classes, "n_multi_label_items": n_multi,
                        "n_excluded": len(catalogue.excluded), "excluded": catalogue.excluded[:100],
                        "embeddings": catalogue.source},
            "validation": {"fraction": settings.validation_fraction, "seed": settings.seed,
                           "n_items": int(validation.sum()),
                           "what": "held out of the catalogue, stratified by class; queries are never read"},
            "base_validation_map": round(result.base_map, 6),
            "best_validation_map": round(best.best_map, 6),
            "best_epoch": best.best_epoch,
            "validation_curve": best.curve,
            "refit": {"epochs": refit.best_epoch, "items": len(catalogue.labels),
                      "note": "the served head is refitted on the whole catalogue (validation included) for the "
                              "selected number of epochs; its validation mAP cannot be measured"},
            "search": {"budget_seconds": settings.budget_seconds, "max_trials": settings.max_trials,
                       "max_epochs": settings.max_epochs, "patience": settings.patience,
                       "seconds": round(result.seconds, 2), "trials": result.trials},
            "train_seconds": round(train_seconds, 2),
            "torch_threads": torch.get_num_threads(),
        },
    }
    digest = write_adapter(out, refit.head, card)
    if figures:
        from services.adapters.report import write_figures

        artifacts = write_figures(out, catalogue, validation, best, result.base_map, name)
        card["artifacts"] = artifacts
        digest = write_adapter(out, refit.head, card)
    say(f"wrote {out} (head SHA-256 {digest[:16]}...)")
    return TrainedAdapter(out, f"{base_model}+{name}", digest, card, train_seconds)
