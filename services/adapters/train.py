"""Training of one adapter head on embeddings, and the optuna search over its hyperparameters.

The head (``HeadModule``) maps a base model's L2-normalised embeddings to a new space where items of
a class lie together; it is trained with a metric-learning loss of pytorch-metric-learning on
class-balanced batches, and stopped early on the mean average precision of a held-out validation
part (``validation_map``). Everything here sees only the arrays it is given: which items those are
(the catalogue, never the queries) is decided by ``services.adapters.data``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from services.common.adapters import Head

log = logging.getLogger(__name__)

LOSSES = ("supcon", "triplet", "contrastive", "softmax")
MINERS = {"supcon": ("none",), "triplet": ("semihard", "hard"), "contrastive": ("hard", "semihard"),
          "softmax": ("none",)}


@dataclass(frozen=True)
class Hyper:
    """One point of the search space.

    Attributes:
        loss: ``supcon`` (supervised contrastive, all pairs of the batch), ``triplet`` (triplet margin
            loss on mined triplets), ``contrastive`` (contrastive loss on mined pairs), or ``softmax``
            (cross-entropy over the catalogue's classes; the embedding is the class posterior, the
            "classification is a strong baseline for metric learning" head: closed-set, see README).
        miner: online mining of the batch: ``semihard`` (negatives farther than the positive but
            within the margin), ``hard`` (the hardest positive and negative of each anchor), or
            ``none`` (supcon uses every pair).
        temperature: supcon's temperature (cosine similarities are divided by it).
        margin: triplet margin, or contrastive negative margin, in normalised Euclidean distance (0 to 2).
        label_smoothing: softmax's label smoothing (0 to 1).
        out_dim: the adapter's embedding dimension (softmax: the number of classes, whatever this says).
        hidden_dim: 0 for a linear head, else the width of the one hidden layer of a two-layer MLP.
        lr: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        batch_size: items per batch.
        per_class: items of each class drawn together into a batch (positives for every anchor).
    """

    loss: str = "supcon"
    miner: str = "none"
    temperature: float = 0.1
    margin: float = 0.2
    label_smoothing: float = 0.1
    out_dim: int = 256
    hidden_dim: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    per_class: int = 4


class HeadModule(nn.Module):
    """The head as torch computes it: L2-normalise, then linear layers with GELU between them (the
    forward returns the last layer's output, the loss's input; ``embed`` what is served).

    Its ``to_head()`` is the ``services.common.adapters.Head`` the encoder serves; the forward here
    is the same function (tests check it against ``apply_head``).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 0, softmax: bool = False) -> None:
        super().__init__()
        self.softmax = softmax
        # Unit-norm inputs have coordinates of about 1/sqrt(in_dim): scaled back to about 1, the
        # default initialisation and learning rates fit (folded into the first layer on export).
        self.scale = math.sqrt(in_dim)
        dims = [in_dim, hidden_dim, out_dim] if hidden_dim else [in_dim, out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter serves, before the L2 normalisation: the output, or its softmax."""
        h = self(x)
        return torch.softmax(h, dim=1) if self.softmax else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.normalize(x, dim=1) * self.scale
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = nn.functional.gelu(h)
        return h

    def to_head(self) -> Head:
        linears = [cast(nn.Linear, layer) for layer in self.layers]
        weights = [layer.weight.detach().cpu().double() for layer in linears]
        weights[0] = weights[0] * self.scale
        return Head(tuple(w.numpy().astype(np.float32) for w in weights),
                    tuple(layer.bias.detach().cpu().numpy().astype(np.float32) for layer in linears),
                    "gelu" if len(self.layers) > 1 else "identity", "softmax" if self.softmax else "linear")


def validation_map(queries: torch.Tensor, query_labels: torch.Tensor, catalogue: torch.Tensor,
                   catalogue_labels: torch.Tensor) -> float:
    """Mean average precision of ``queries`` against ``catalogue`` (cosine similarity), for selection.

    AP of a query: the non-interpolated average precision over the full ranking of the catalogue,
    relevant = same class, equal to ``sklearn.metrics.average_precision_score`` including tied
    scores: with ``ge(s)`` the catalogue items scoring at least ``s`` and ``rel_ge(s)`` the relevant
    ones, AP = mean over relevant items j of rel_ge(s_j) / ge(s_j). The mean is over queries with at
    least one relevant catalogue item. Single-label class ids. Each row is sorted once (values only)
    and every relevant score located in it by binary search: no argsort of the score matrix.
    """
    q = nn.functional.normalize(queries.detach().float(), dim=1).numpy()
    c = nn.functional.normalize(catalogue.detach().float(), dim=1).numpy()
    q_labels, c_labels = query_labels.numpy(), catalogue_labels.numpy()
    members = {int(k): np.flatnonzero(c_labels == k) for k in np.unique(c_labels)}
    n = c.shape[0]
    total, counted = 0.0, 0
    for start in range(0, len(q), 1024):
        scores = q[start:start + 1024] @ c.T
        ordered = np.sort(scores, axis=1)
        for row, label in enumerate(q_labels[start:start + 1024]):
            relevant = members.get(int(label))
            if relevant is None:
                continue
            mine = np.sort(scores[row, relevant])
            ge = n - np.searchsorted(ordered[row], mine, side="left")
            rel_ge = len(mine) - np.searchsorted(mine, mine, side="left")
            total += float(np.mean(rel_ge / ge))
            counted += 1
    return total / counted if counted else float("nan")


def class_balanced_batches(labels: np.ndarray, batch_size: int, per_class: int,
                           rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches: every item once (classes smaller than ``per_class`` are topped up by
    repeating their items), in groups of ``per_class`` items of one class, groups shuffled and cut
    into batches of ``batch_size // per_class`` groups, so that every anchor has positives."""
    groups: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) % per_class:
            extra = rng.choice(members, per_class - len(members) % per_class, replace=len(members) < per_class)
            members = np.concatenate([members, extra])
        groups += list(members.reshape(-1, per_class))
    order = rng.permutation(len(groups))
    per_batch = max(1, batch_size // per_class)
    return [np.concatenate([groups[g] for g in order[i:i + per_batch]]) for i in range(0, len(order), per_batch)]


def _loss_and_miner(h: Hyper) -> tuple[Any, Any]:
    from pytorch_metric_learning import losses, miners

    if h.loss == "softmax":
        return nn.CrossEntropyLoss(label_smoothing=h.label_smoothing), None

    if h.loss == "supcon":
        return losses.SupConLoss(temperature=h.temperature), None
    if h.loss == "triplet":
        return (losses.TripletMarginLoss(margin=h.margin),
                miners.TripletMarginMiner(margin=h.margin, type_of_triplets=h.miner))
    if h.loss == "contrastive":
        miner = (miners.BatchHardMiner() if h.miner == "hard"
                 else miners.TripletMarginMiner(margin=h.margin, type_of_triplets="semihard"))
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=h.margin), miner
    raise ValueError(f"loss {h.loss!r} is not one of {', '.join(LOSSES)}")


@dataclass
class Fit:
    """The outcome of training one head.

    Attributes:
        hyper: its hyperparameters.
        head: the weights of the best epoch (by validation mAP).
        best_map: that epoch's validation mAP.
        best_epoch: 1-based (a refit: the last epoch).
        curve: per epoch: {"epoch", "train_loss", "validation_map", "seconds"} (seconds since start).
        stopped: why training ended: ``patience``, ``max_epochs``, ``deadline``, ``pruned`` or ``refit``.
    """

    hyper: Hyper
    head: Head
    best_map: float
    best_epoch: int
    curve: list[dict[str, float]] = field(default_factory=list)
    stopped: str = ""


class Pruned(Exception):
    """The search stopped this trial early (it was not going to beat the others)."""


def fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, hyper: Hyper, *,
        n_classes: int, seed: int = 0, max_epochs: int = 60, patience: int = 8, stop_after: int = 0,
        deadline: float | None = None, on_epoch: Callable[[int, float], None] | None = None) -> Fit:
    """Trains a head on (``x_train``, ``y_train``), keeping the epoch with the best validation mAP.

    Args:
        x_train, x_val: float32 (n, in_dim) base embeddings; y_train, y_val: int class ids in
            0..n_classes-1 (``x_val`` may be empty: no validation, every epoch counts as the best).
        n_classes: the number of classes (the softmax head's outputs).
        hyper: the hyperparameters.
        seed: seeds the initial weights and the batches (same inputs and seed: same weights, on
            the same machine and thread count).
        max_epochs: at most this many passes over the training items.
        patience: stop after this many epochs without a better validation mAP.
        stop_after: train this many epochs of the ``max_epochs`` schedule and keep the last (a refit
            on every item, without validation); 0: until ``max_epochs`` or patience.
        deadline: ``time.monotonic()`` time after which no new epoch starts.
        on_epoch: called with (epoch, validation mAP) after each epoch; may raise ``Pruned``.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x_train, np.float32)), torch.from_numpy(y_train.astype(np.int64))
    xv, yv = torch.from_numpy(np.ascontiguousarray(x_val, np.float32)), torch.from_numpy(y_val.astype(np.int64))
    validate = len(xv) > 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        model = HeadModule(xt.shape[1], n_classes if hyper.loss == "softmax" else hyper.out_dim,
                           hyper.hidden_dim, softmax=hyper.loss == "softmax")
    loss_fn, miner = _loss_and_miner(hyper)
    optimiser = torch.optim.AdamW(model.parameters(), lr=hyper.lr, weight_decay=hyper.weight_decay)
    batches_per_epoch = len(class_balanced_batches(y_train, hyper.batch_size, hyper.per_class,
                                                   np.random.default_rng(0)))
    # One cycle over max_epochs, whatever stops training earlier: a refit that stops at the selected
    # epoch follows the same learning-rate path as the run that selected it.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=hyper.lr, epochs=max_epochs,
                                                   steps_per_epoch=batches_per_epoch, pct_start=0.1)
    start = time.monotonic()
    result = Fit(hyper, model.to_head(), -math.inf, 0)
    since_best = 0
    for epoch in range(1, (stop_after or max_epochs) + 1):
        if deadline is not None and time.monotonic() > deadline:
            result.stopped = "deadline"
            break
        model.train()
        losses = []
        for batch in class_balanced_batches(y_train, hyper.batch_size, hyper.per_class, rng)[:batches_per_epoch]:
            index = torch.from_numpy(batch)
            embeddings, labels = model(xt[index]), yt[index]
            loss = loss_fn(embeddings, labels, miner(embeddings, labels)) if miner else loss_fn(embeddings, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        point = {"epoch": epoch, "train_loss": round(float(np.mean(losses)), 6)}
        if not validate:
            result.head, result.best_epoch = model.to_head(), epoch
            result.curve.append({**point, "seconds": round(time.monotonic() - start, 3)})
            continue
        model.eval()
        with torch.no_grad():
            score = validation_map(model.embed(xv), yv, model.embed(xt), yt)
        result.curve.append({**point, "validation_map": round(score, 6), "seconds": round(time.monotonic() - start, 3)})
        if score > result.best_map:
            result.best_map, result.best_epoch, result.head, since_best = score, epoch, model.to_head(), 0
        else:
            since_best += 1
        if on_epoch is not None:
            try:
                on_epoch(epoch, score)
            except Pruned:
                result.stopped = "pruned"
                return result
        if since_best >= patience:
            result.stopped = "patience"
            break
    else:
        result.stopped = "max_epochs" if validate else "refit"
    return result


def hyper_dict(h: Hyper) -> dict[str, Any]:
    """The hyperparameters a card records (the ones the loss does not use are left out)."""
    out = asdict(h)
    unused = {"supcon": ("margin", "label_smoothing"), "softmax": ("margin", "temperature", "out_dim")}
    for key in unused.get(h.loss, ("temperature", "label_smoothing")):
        out.pop(key)
    return out
