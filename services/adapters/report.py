"""The figures of an adapter's training: its validation curve, and the validation items' embeddings
before (base model) and after (the selected head, which never trained on them) as t-SNE maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from services.adapters.data import Catalogue
from services.adapters.train import Fit
from services.common.adapters import apply_head


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figures(out: Path, catalogue: Catalogue, validation: np.ndarray, best: Fit, base_map: float,
                  name: str, max_points: int = 2000, seed: int = 0) -> dict[str, str]:
    """Writes ``validation_curve.png`` and ``tsne_before_after.png`` into ``out``; returns their names."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    epochs = [p["epoch"] for p in best.curve if "validation_map" in p]
    scores = [p["validation_map"] for p in best.curve if "validation_map" in p]
    losses = [p["train_loss"] for p in best.curve]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(epochs, scores, marker="o", markersize=3, label="validation mAP (adapter)")
    ax.axhline(base_map, color="grey", linestyle="--", label=f"validation mAP (base) {base_map:.3f}")
    ax.axvline(best.best_epoch, color="green", alpha=0.4, label=f"selected epoch {best.best_epoch}")
    ax.set(xlabel="epoch", ylabel="mAP", title=f"{name}: {best.hyper.loss}, validation curve")
    loss_ax = ax.twinx()
    loss_ax.plot(range(1, len(losses) + 1), losses, color="tab:orange", alpha=0.5, label="training loss")
    loss_ax.set_ylabel("training loss")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "validation_curve.png")
    plt.close(fig)

    index = np.flatnonzero(validation)
    rng = np.random.default_rng(seed)
    if len(index) > max_points:
        index = np.sort(rng.choice(index, max_points, replace=False))
    labels = catalogue.labels[index]
    before = catalogue.vectors[index]
    after = apply_head(best.head, before)
    fig, axes = plt.subplots(1, 2, figsize=(12, 6), dpi=110)
    for ax, vectors, title in ((axes[0], before, "before: base embeddings"),
                               (axes[1], after, "after: adapter (trained without these items)")):
        perplexity = min(30.0, max(2.0, (len(index) - 1) / 3))
        points = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(vectors)
        ax.scatter(points[:, 0], points[:, 1], s=5, c=labels, cmap="tab20" if len(set(labels)) <= 20 else "gist_ncar",
                   alpha=0.8)
        ax.set(title=f"{title} ({len(index)} validation items)", xticks=[], yticks=[])
    fig.suptitle(f"{name}: t-SNE of the held-out validation items, coloured by class")
    fig.tight_layout()
    fig.savefig(out / "tsne_before_after.png")
    plt.close(fig)
    return {"validation_curve_png": "validation_curve.png", "tsne_png": "tsne_before_after.png"}
