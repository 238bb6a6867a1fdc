"""Reports: one self-describing JSON per (dataset, encoder, protocol) with its figures and a TREC run
file and qrels, and the aggregation step that turns a folder of them into the comparison table
(encoders x datasets) with confidence intervals and paired comparisons, PR curves, retrieval grids,
per-class AP tables and t-SNE maps, as Markdown and HTML with PNG figures.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import os
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from services.common.files import atomic_write, atomic_write_text
from services.evaluator import metrics as mx
from services.evaluator.protocols import Relevance, Side
from services.evaluator.spec import RunSpec

REPORT_SCHEMA = "retrieval.report/v1"
BOOTSTRAP_SEED = 0  # every interval and test is seeded: a rerun of the aggregation gives the same figures
THUMB = 96  # px, side of a thumbnail in retrieval grids


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def report_name(dataset: str, model: str, protocol: str) -> str:
    """File stem of a run report: safe for any model id (``openclip:ViT-B-32/openai``)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{dataset}__{model}__{protocol}")
    return safe


def code_version() -> str:
    """``git describe`` of the checkout when there is one, else the package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retrieval-platform")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ModelReport:
    """Everything one (dataset, model, protocol) evaluation produced, for its report."""

    spec: RunSpec
    protocol: str
    dataset_name: str
    model: Any  # retrieval.v1.ModelInfo
    catalogue: Side
    queries: Side
    relevance: Relevance
    exact: mx.RetrievalMetrics
    service: mx.TopKMetrics
    service_top: np.ndarray  # (n_queries, depth) catalogue indices the search service returned
    service_scores: np.ndarray  # (n_queries, depth) their scores
    index_recall: dict[int, float]
    timings: dict[str, float]
    trec_depth: int


def _finite(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 6)


def best_and_worst(r: ModelReport, n: int = 5, shown: int = 5) -> dict[str, list[dict[str, Any]]]:
    """The ``n`` best and worst queries by AP, each with its top ``shown`` retrievals (as the search
    service returned them, junk removed) and its ``shown`` worst-ranked relevant items (from the
    exact full ranking, in which junk does not count)."""
    ap = r.exact["ap"]
    order = np.argsort(np.where(np.isnan(ap), np.inf, -ap), kind="stable")
    scored = order[: int((~np.isnan(ap)).sum())]
    items, queries = r.catalogue.dataset.items, r.queries.dataset.items
    top = mx.drop_excluded(r.service_top, r.relevance.exclude)
    out: dict[str, list[dict[str, Any]]] = {}
    for kind, picks in (("best", scored[:n]), ("worst", scored[::-1][:n])):
        rows = []
        for q in (int(x) for x in picks):
            query_labels = set(queries[q].labels)
            score_of = {int(j): float(s) for j, s in zip(r.service_top[q], r.service_scores[q], strict=True) if j >= 0}
            hits = [{"path": items[j].path, "score": round(score_of[int(j)], 5),
                     "relevant": bool(query_labels & set(items[j].labels))} for j in top[q][:shown] if j >= 0]
            excluded = set() if r.relevance.exclude is None else {int(j) for j in r.relevance.exclude[q] if j >= 0}
            scores = r.catalogue.vectors @ r.queries.vectors[q]
            ranked = np.array([j for j in range(len(items)) if j not in excluded])
            relevant = np.array([j for j in ranked if query_labels & set(items[j].labels)], dtype=np.int64)
            # Rank (1-based) in descending score among the ranked items, ties by catalogue index.
            s = scores[ranked]
            ranks = {int(j): int((s > scores[j]).sum() + (s[ranked < j] == scores[j]).sum()) + 1 for j in relevant}
            worst = sorted(ranks, key=lambda j: -ranks[j])[:shown]
            rows.append({"query": queries[q].path, "query_label": ",".join(queries[q].labels),
                         "ap": round(float(ap[q]), 6), "top": hits,
                         "worst_relevant": [{"path": items[j].path, "rank": ranks[j], "relevant": True}
                                            for j in worst]})
        out[kind] = rows
    return out


def _trec_id(path: str) -> str:
    """A TREC query or document id: the item's path, percent-encoded (TREC files split on whitespace)."""
    return quote(path, safe="/._-+")


def write_trec(r: ModelReport, run_path: Path, qrels_path: Path) -> None:
    """The exact ranking as a TREC run file (top ``trec_depth`` per query, junk removed) and the
    relevance as qrels (every relevant catalogue item per query, junk left out), both gzipped
    (fast compression: Caltech-101 leave-one-out has 2 million relevant pairs).

    trec_eval, pytrec_eval or ranx recompute P@k for k <= depth exactly from them; their AP equals
    ours when the depth covers the catalogue, is truncated at the depth otherwise, and may differ
    where scores tie (the tools re-order ties by document id; we keep them as one threshold)."""
    run_tag = _trec_id(f"{r.model.id}")
    top, scores = r.exact["top_indices"], r.exact["top_scores"]
    depth = min(r.trec_depth, top.shape[1])
    items, queries = r.catalogue.dataset.items, r.queries.dataset.items
    doc = [_trec_id(item.path) for item in items]
    with atomic_gzip_text(run_path) as run:
        for q, query in enumerate(queries):
            qid = _trec_id(query.path)
            run.write("".join(f"{qid} Q0 {doc[j]} {rank} {float(s):.7f} {run_tag}\n"
                              for rank, (j, s) in enumerate(zip(top[q, :depth], scores[q, :depth], strict=True),
                                                            start=1) if j >= 0))
    members: dict[str, list[int]] = defaultdict(list)
    for j, item in enumerate(items):
        for name in item.labels:
            members[name].append(j)
    with atomic_gzip_text(qrels_path) as qrels:
        for q, query in enumerate(queries):
            excluded = set() if r.relevance.exclude is None else {int(j) for j in r.relevance.exclude[q] if j >= 0}
            classes = query.labels
            relevant = (members[classes[0]] if len(classes) == 1 else
                        sorted({j for name in classes for j in members[name]}))
            if excluded:
                relevant = [j for j in relevant if j not in excluded]
            if relevant:
                prefix = f"{_trec_id(query.path)} 0 "
                qrels.write(prefix + f" 1\n{prefix}".join(doc[j] for j in relevant) + " 1\n")


class atomic_gzip_text:  # noqa: N801 - used as a context manager, like open()
    """A gzip text file written beside ``path`` and renamed onto it when the block ends without error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")

    def __enter__(self) -> Any:
        self.file = gzip.open(self.tmp, "wt", encoding="utf-8", compresslevel=1)
        return self.file

    def __exit__(self, kind: object, *rest: object) -> None:
        self.file.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def build_report(r: ModelReport, examples: dict[str, list[dict[str, Any]]],
                 artifacts: dict[str, str]) -> dict[str, Any]:
    """The self-describing JSON of one (dataset, model, protocol), with per-query values and 95%
    bootstrap intervals (seeded) for mAP and P@k."""
    exact, service, per_class = r.exact, r.service, r.exact["per_class"]
    two_sides = r.queries is not r.catalogue
    dataset: dict[str, Any] = {
        "name": r.dataset_name, "root": str(r.catalogue.dataset.root), "fingerprint": r.catalogue.checked.fingerprint,
        "n_images": len(r.catalogue.dataset) + (len(r.queries.dataset) if two_sides else 0),
        "n_classes": len(per_class["classes"]),
        "n_excluded": len(r.catalogue.excluded) + (len(r.queries.excluded) if two_sides else 0),
        "excluded": r.catalogue.excluded + (r.queries.excluded if two_sides else []),
        "n_junk_pairs": 0 if r.relevance.exclude is None else int((r.relevance.exclude >= 0).sum())
        - (0 if two_sides else len(r.catalogue.dataset)),
    }
    if two_sides:
        dataset["queries_fingerprint"] = r.queries.checked.fingerprint
        dataset["n_catalogue"], dataset["n_queries"] = len(r.catalogue.dataset), len(r.queries.dataset)
    ks = [int(k) for k in service["precision_at_k"]]
    # One set of resampled queries for mAP and every P@k (the same queries are kept: R >= 1).
    scored = ~np.isnan(exact["ap"])
    values = np.column_stack([exact["ap"][scored], service["precision_at_k_per_query"][scored]])
    map_ci, *p_list = mx.bootstrap_cis(values, seed=BOOTSTRAP_SEED)
    p_ci = dict(zip(ks, p_list, strict=True))
    info = r.model
    return {
        "schema": REPORT_SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "spec": {"dataset": r.spec.dataset, "protocol": r.protocol, "catalogue": r.spec.catalogue,
                 "queries": r.spec.queries, "ks": list(r.spec.ks), "model": info.id},
        "protocol": r.protocol,
        "dataset": dataset,
        "model": {"id": info.id, "family": info.family, "dim": info.dim, "device": info.device, "dtype": info.dtype,
                  "weights_source": info.weights_source, "weights_sha256": info.weights_sha256,
                  "backend": getattr(info, "backend", ""), "embeddings_cached": r.catalogue.cached},
        "metrics": {
            "map": _finite(exact["map"]),
            "map_ci": [_finite(map_ci.low), _finite(map_ci.high)],
            "ci_level": mx.CI_LEVEL, "ci_resamples": mx.BOOTSTRAP_RESAMPLES, "ci_seed": BOOTSTRAP_SEED,
            "n_queries": exact["n_queries"], "n_scored_queries": exact["n_scored_queries"],
            "n_queries_without_relevant": exact["n_queries_without_relevant"],
            "precision_at_k": {str(k): _finite(v) for k, v in service["precision_at_k"].items()},
            "precision_at_k_ci": {str(k): [_finite(c.low), _finite(c.high)] for k, c in p_ci.items()},
            "recall_at_k": {str(k): _finite(v) for k, v in service["recall_at_k"].items()},
            "map_at_k": {str(k): _finite(v) for k, v in service["map_at_k"].items()},
            "exact_precision_at_k": {str(k): _finite(v) for k, v in exact["precision_at_k"].items()},
            "exact_map_at_k": {str(k): _finite(v) for k, v in exact["map_at_k"].items()},
            "pr_curve": {"recall": exact["pr_recall"].round(6).tolist(),
                         "precision": [_finite(v) for v in exact["pr_precision"]]},
            "per_class": [{"class": c, "n_queries": int(per_class["n_queries"][i]), "ap": _finite(per_class["ap"][i]),
                           "pr_precision": [_finite(v) for v in per_class["pr_precision"][i]]}
                          for i, c in enumerate(per_class["classes"])],
        },
        # Per query (aligned with "ids", the query paths): what intervals and paired tests resample.
        "per_query": {"ids": [item.path for item in r.queries.dataset.items],
                      "ap": [_finite(v) for v in exact["ap"]],
                      "precision_at_k": {str(k): [round(float(v), 6) for v in service["precision_at_k_per_query"][:, i]]
                                         for i, k in enumerate(ks)}},
        "index": {"exact": True, "recall_at_k": {str(k): round(v, 6) for k, v in r.index_recall.items()}},
        "examples": examples,
        "artifacts": artifacts,
        "timings": {k: round(v, 3) for k, v in r.timings.items()},
    }


def write_model_report(r: ModelReport, out_dir: Path, tsne: bool = True) -> Path:
    """Figures, TREC files and the JSON report of one evaluation under ``out_dir``; returns the JSON's
    path. The JSON is written last and atomically: a report that exists is a complete one."""
    start = time.perf_counter()
    stem = report_name(r.dataset_name, r.model.id, r.protocol)
    figures = out_dir / "figures"
    title = f"{r.dataset_name} - {r.model.id} - {r.protocol}"
    pr_png = plot_pr_curves({r.model.id: (r.exact["pr_recall"].tolist(), r.exact["pr_precision"].tolist())},
                            title, figures / f"pr__{stem}.png")
    examples = best_and_worst(r)
    grid_png = plot_retrieval_grid(examples["best"] + examples["worst"], r.catalogue.dataset.root,
                                   f"{r.dataset_name} - {r.model.id}: best 5 and worst 5 queries "
                                   "(top-5 | worst-ranked relevant)", figures / f"grid__{stem}.png")
    artifacts = {"pr_curve_png": str(pr_png.relative_to(out_dir)), "grid_png": str(grid_png.relative_to(out_dir))}
    if tsne:
        two_sides = r.queries is not r.catalogue
        everything = np.concatenate([r.catalogue.vectors, r.queries.vectors]) if two_sides else r.catalogue.vectors
        items = r.catalogue.dataset.items + (r.queries.dataset.items if two_sides else ())
        labels = [",".join(item.labels) or "(none)" for item in items]
        artifacts["tsne_png"] = str(plot_tsne(everything, labels, f"{r.dataset_name} - {r.model.id}",
                                              figures / f"tsne__{stem}.png").relative_to(out_dir))
    run_file, qrels_file = out_dir / "trec" / f"{stem}.run.gz", out_dir / "trec" / f"{stem}.qrels.gz"
    run_file.parent.mkdir(parents=True, exist_ok=True)
    write_trec(r, run_file, qrels_file)
    artifacts["trec_run"], artifacts["trec_qrels"] = (str(run_file.relative_to(out_dir)),
                                                      str(qrels_file.relative_to(out_dir)))
    report = build_report(r, examples, artifacts)
    report["timings"]["report_seconds"] = round(time.perf_counter() - start, 3)  # all but the JSON's own write
    return write_json(report, out_dir / f"{stem}.json")


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Writes the report atomically: a reader (or a crash) never sees half of one."""
    return atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False, default=_json_default) + "\n")


def _save(fig: Any, path: Path) -> Path:
    """Saves a figure as PNG atomically (concurrent runs and readers never see a torn file)."""
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png"), durable=False)


def _json_default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return [_json_default(v) if isinstance(v, np.generic) else v for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plot_pr_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, path: Path) -> Path:
    """11-point interpolated precision-recall curves, one line per label (encoder)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    for label, (recall, precision) in sorted(curves.items()):
        ax.plot(recall, precision, marker="o", markersize=3, label=label)
    ax.set(xlabel="recall", ylabel="interpolated precision", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def _thumb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            img: Image.Image = ImageOps.exif_transpose(opened) or opened
            return np.asarray(ImageOps.fit(img.convert("RGB"), (THUMB, THUMB)))
    except (OSError, ValueError):
        return np.full((THUMB, THUMB, 3), 200, dtype=np.uint8)


def plot_retrieval_grid(examples: Sequence[dict[str, Any]], root: Path, title: str, path: Path) -> Path:
    """One row per query: the query, its top retrievals (green border relevant, red not) and its
    worst-ranked relevant items (with their rank). The thumbnails are composed into one image and
    drawn once (one axes per thumbnail made the figure the slowest step of a report)."""
    plt = _pyplot()
    cols = 1 + max((len(e["top"]) + len(e["worst_relevant"]) for e in examples), default=0)
    cell, caption_h = THUMB + 8, 26
    canvas = np.full((len(examples) * (cell + caption_h), cols * cell, 3), 255, dtype=np.uint8)
    captions: list[tuple[int, int, str]] = []
    for r, example in enumerate(examples):
        y = r * (cell + caption_h) + caption_h
        cells: list[tuple[str, bool | None, str]] = [
            (example["query"], None, f"query AP {example['ap']:.2f}\n{example['query_label'][:14]}")]
        cells += [(hit["path"], hit.get("relevant", True), f"#{i + 1} {hit['score']:.2f}")
                  for i, hit in enumerate(example["top"])]
        cells += [(hit["path"], True, f"rank {hit['rank']}") for hit in example["worst_relevant"]]
        for c, (rel_path, relevant, caption) in enumerate(cells):
            x = c * cell
            if relevant is not None:
                canvas[y:y + cell, x:x + cell] = (26, 150, 65) if relevant else (215, 25, 28)
            canvas[y + 4:y + 4 + THUMB, x + 4:x + 4 + THUMB] = _thumb(root / rel_path)
            captions.append((x + cell // 2, y - 2, caption))
    fig = plt.figure(figsize=(canvas.shape[1] / 100, canvas.shape[0] / 100 + 0.4), dpi=100)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + 40)))
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    for x, y, text in captions:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=6.5)
    fig.suptitle(title, fontsize=9, y=0.995)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def plot_tsne(vectors: np.ndarray, labels: Sequence[str], title: str, path: Path, max_points: int = 3000,
              seed: int = 0) -> Path:
    """A 2-D t-SNE map of (a seeded sample of at most ``max_points``) embeddings, coloured by class."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    index = np.arange(len(vectors))
    if len(index) > max_points:
        index = np.sort(rng.choice(index, max_points, replace=False))
    points = TSNE(n_components=2, init="pca", random_state=seed,
                  perplexity=min(30.0, max(2.0, (len(index) - 1) / 3))).fit_transform(vectors[index])
    chosen = [labels[int(i)] for i in index]
    names = sorted(set(chosen))
    colour_of = {name: i for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(6.5, 6), dpi=110)
    ax.scatter(points[:, 0], points[:, 1], s=4, c=[colour_of[name] for name in chosen],
               cmap="tab20" if len(names) <= 20 else "gist_ncar", alpha=0.8)
    ax.set(title=f"{title} ({len(index)} of {len(vectors)} images, {len(names)} classes)", xticks=[], yticks=[])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path


def load_reports(directory: Path) -> list[dict[str, Any]]:
    """Every run report (``*.json`` with our schema) under ``directory``."""
    reports = []
    for path in sorted(directory.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == REPORT_SCHEMA:
            data["_path"] = str(path)
            reports.append(data)
    return reports


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def comparison_table(reports: Sequence[dict[str, Any]], metric: str = "map") -> tuple[list[str], list[str],
                                                                                      dict[tuple[str, str], float]]:
    """(encoders, dataset columns, values): ``metric`` per encoder (row) and dataset/protocol (column)."""
    values: dict[tuple[str, str], float] = {}
    for r in reports:
        column = f"{r['dataset']['name']} ({r['protocol']})"
        values[(r["model"]["id"], column)] = _metric(r, metric)
    encoders = sorted({e for e, _ in values})
    columns = sorted({c for _, c in values})
    return encoders, columns, values


def _metric(report: dict[str, Any], metric: str) -> float:
    m = report["metrics"]
    if metric == "map":
        return float(m["map"])
    kind, _, k = metric.rpartition("@")
    table = {"P": "precision_at_k", "R": "recall_at_k", "mAP": "map_at_k"}[kind]
    return float(m[table][k])


def markdown_table(reports: Sequence[dict[str, Any]], metric: str = "map") -> str:
    encoders, columns, values = comparison_table(reports, metric)
    lines = ["| encoder | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for e in encoders:
        lines.append(f"| {e} | " + " | ".join(_fmt(values.get((e, c))) for c in columns) + " |")
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "\u2212")


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def paired_comparisons(group: Sequence[dict[str, Any]]) -> list[tuple[str, str, mx.PairedComparison]]:
    """Every pair of encoders evaluated on the same dataset and protocol, better mAP first: (a, b,
    comparison of a - b on the queries both scored). Reports without per-query values are skipped."""
    ranked = sorted((r for r in group if r.get("per_query")), key=lambda r: -_nan_low(r["metrics"]["map"]))
    out = []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            ap_a = dict(zip(a["per_query"]["ids"], a["per_query"]["ap"], strict=True))
            ap_b = dict(zip(b["per_query"]["ids"], b["per_query"]["ap"], strict=True))
            shared = [q for q in ap_a if q in ap_b]
            values = [(np.nan if ap_a[q] is None else ap_a[q], np.nan if ap_b[q] is None else ap_b[q]) for q in shared]
            x = np.array([v[0] for v in values], dtype=np.float64)
            y = np.array([v[1] for v in values], dtype=np.float64)
            out.append((a["model"]["id"], b["model"]["id"], mx.paired_comparison(x, y, seed=BOOTSTRAP_SEED)))
    return out


def comparison_sentence(a: str, b: str, c: mx.PairedComparison) -> str:
    """For example ``lite2 \u2212 lite0: +0.019 mAP [+0.015, +0.023], p < 0.001 (8,677 paired queries)``."""
    d = c.difference
    return (f"{a} \u2212 {b}: {_signed(d.estimate)} mAP [{_signed(d.low)}, {_signed(d.high)}], {_p_text(c.p_value)} "
            f"({c.n_queries:,} paired queries)")


def _with_ci(report: dict[str, Any], value_key: str, ci_key: str, k: str | None = None) -> str:
    m = report["metrics"]
    value = m[value_key] if k is None else m[value_key].get(k)
    ci = m.get(ci_key) if k is None else m.get(ci_key, {}).get(k)
    if ci is None or value is None or ci[0] is None:
        return _fmt(value)
    return f"{_fmt(value)} [{ci[0]:.4f}, {ci[1]:.4f}]"


def aggregate(directory: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Builds ``summary.md`` and ``summary.html`` (plus combined PR-curve PNGs) from the run reports
    found under ``directory``; returns their paths. Intervals and tests are seeded: rerunning gives
    the same text."""
    out_dir = out_dir or directory
    reports = load_reports(directory)
    if not reports:
        raise FileNotFoundError(f"no run reports ({REPORT_SCHEMA}) under {directory}")
    by_dataset: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in reports:
        by_dataset[(r["dataset"]["name"], r["protocol"])].append(r)

    md = ["# Retrieval benchmark report", "", "## mAP (encoders x datasets)", "", markdown_table(reports, "map"), ""]
    ks = sorted({int(k) for r in reports for k in r["metrics"]["precision_at_k"]})
    for k in [k for k in (1, 5) if k in ks]:
        md += [f"### P@{k}", "", markdown_table(reports, f"P@{k}"), ""]
    md += [f"Intervals: {mx.CI_LEVEL:.0%} percentile bootstrap over queries ({mx.BOOTSTRAP_RESAMPLES:,} resamples, "
           f"seed {BOOTSTRAP_SEED}); paired comparisons resample the same queries for both encoders, and their "
           "p-value is a paired randomisation (sign-flip) test.", ""]
    for (dataset, protocol), group in sorted(by_dataset.items()):
        curves = {r["model"]["id"]: (r["metrics"]["pr_curve"]["recall"], r["metrics"]["pr_curve"]["precision"])
                  for r in group}
        pr_png = plot_pr_curves(curves, f"{dataset} - {protocol}",
                                out_dir / f"pr__{report_name(dataset, 'all', protocol)}.png")
        md += [f"## {dataset} - {protocol}", "", f"![PR curves]({pr_png.relative_to(out_dir)})", ""]
        header = ["encoder", "mAP [95% CI]", *(f"P@{k}" for k in ks), *(f"mAP@{k}" for k in ks), "index recall@k",
                  "queries (no relevant)"]
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in sorted(group, key=lambda r: -_nan_low(r["metrics"]["map"])):
            m = r["metrics"]
            index = r.get("index", {}).get("recall_at_k", {})
            index_text = ", ".join(f"@{k} {float(v):.4f}" for k, v in index.items()) or "-"
            cells = [r["model"]["id"], _with_ci(r, "map", "map_ci"),
                     *(_with_ci(r, "precision_at_k", "precision_at_k_ci", str(k)) for k in ks),
                     *(_fmt(m["map_at_k"].get(str(k))) for k in ks), index_text,
                     f"{m['n_queries']} ({m['n_queries_without_relevant']})"]
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
        pairs = paired_comparisons(group)
        if pairs:
            md += ["Paired comparisons (same queries):", ""]
            md += [f"- {comparison_sentence(a, b, c)}" for a, b, c in pairs]
            md.append("")
        for r in group:
            art = r.get("artifacts", {})
            md += [f"### {r['model']['id']}", ""]
            for key, caption in (("grid_png", "best and worst queries"), ("tsne_png", "t-SNE map")):
                if art.get(key):  # artifact paths are relative to their report's folder
                    figure = Path(r["_path"]).parent / art[key]
                    md.append(f"![{caption}]({os.path.relpath(figure, out_dir)})")
            per_class = sorted(r["metrics"]["per_class"], key=lambda c: -_nan_low(c["ap"]))
            if per_class:
                md += ["", "| class | queries | AP |", "|---|---|---|"]
                shown = per_class if len(per_class) <= 20 else per_class[:10] + per_class[-10:]
                md += [f"| {html.escape(c['class'])} | {c['n_queries']} | {_fmt(c['ap'])} |" for c in shown]
                if len(per_class) > 20:
                    md.append(f"\n(best 10 and worst 10 of {len(per_class)} classes; all in the JSON report)")
            md.append("")
    md_path = out_dir / "summary.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    html_path = out_dir / "summary.html"
    atomic_write_text(html_path, markdown_to_html("\n".join(md)))
    return md_path, html_path


def _nan_low(value: float | None) -> float:
    return -1.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
          "img{max-width:100%}")


def markdown_to_html(md: str) -> str:
    """The summary as a standalone HTML page (markdown-it-py, CommonMark with GFM tables)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Retrieval benchmark report</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}</body></html>\n")
