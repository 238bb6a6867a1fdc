"""Reports: one self-describing JSON per (dataset, encoder, protocol), and the aggregation step that
turns a folder of them into the comparison table (encoders x datasets), PR curves, retrieval grids,
per-class AP tables and t-SNE maps, as Markdown and HTML with PNG figures.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.files import atomic_write, atomic_write_text

REPORT_SCHEMA = "retrieval.report/v1"
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
    worst-ranked relevant items (with their rank)."""
    plt = _pyplot()
    width = 1 + max((len(e["top"]) + len(e["worst_relevant"]) for e in examples), default=0)
    fig, axes = plt.subplots(len(examples), width, figsize=(1.3 * width, 1.55 * len(examples) + 0.4), dpi=100,
                             squeeze=False)
    for row, example in zip(axes, examples, strict=True):
        for ax in row:
            ax.axis("off")
        row[0].imshow(_thumb(root / example["query"]))
        row[0].set_title(f"query AP {example['ap']:.2f}\n{example['query_label'][:14]}", fontsize=7)
        cells = [(hit, f"#{i + 1} {hit['score']:.2f}") for i, hit in enumerate(example["top"])]
        cells += [(hit, f"rank {hit['rank']}") for hit in example["worst_relevant"]]
        for ax, (hit, caption) in zip(row[1:], cells, strict=False):
            ax.imshow(_thumb(root / hit["path"]))
            colour = "#1a9641" if hit.get("relevant", True) else "#d7191c"
            ax.add_patch(plt.Rectangle((0, 0), THUMB - 1, THUMB - 1, fill=False, edgecolor=colour, linewidth=3))
            ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
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


def aggregate(directory: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Builds ``summary.md`` and ``summary.html`` (plus combined PR-curve PNGs) from the run reports
    found under ``directory``; returns their paths."""
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
    for (dataset, protocol), group in sorted(by_dataset.items()):
        curves = {r["model"]["id"]: (r["metrics"]["pr_curve"]["recall"], r["metrics"]["pr_curve"]["precision"])
                  for r in group}
        pr_png = plot_pr_curves(curves, f"{dataset} - {protocol}",
                                out_dir / f"pr__{report_name(dataset, 'all', protocol)}.png")
        md += [f"## {dataset} - {protocol}", "", f"![PR curves]({pr_png.relative_to(out_dir)})", ""]
        md += ["| encoder | mAP | " + " | ".join(f"P@{k}" for k in ks) + " | " +
               " | ".join(f"mAP@{k}" for k in ks) + " | index recall@k | queries (no relevant) |",
               "|---" * (3 + 2 * len(ks)) + "|"]
        for r in sorted(group, key=lambda r: -float(r["metrics"]["map"])):
            m = r["metrics"]
            index = r.get("index", {}).get("recall_at_k", {})
            index_text = ", ".join(f"@{k} {float(v):.4f}" for k, v in index.items()) or "-"
            md.append(f"| {r['model']['id']} | {_fmt(m['map'])} | "
                      + " | ".join(_fmt(m["precision_at_k"].get(str(k))) for k in ks) + " | "
                      + " | ".join(_fmt(m["map_at_k"].get(str(k))) for k in ks)
                      + f" | {index_text} | {m['n_queries']} ({m['n_queries_without_relevant']}) |")
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
    atomic_write_text(html_path, _markdown_to_html("\n".join(md)))
    return md_path, html_path


def _nan_low(value: float | None) -> float:
    return -1.0 if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _markdown_to_html(md: str) -> str:
    """The small Markdown subset the summary uses (headings, tables, images, paragraphs) to HTML."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Retrieval benchmark report</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
           "img{max-width:100%}</style></head><body>"]
    in_table = False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(html.unescape(c))}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, _, src = line[2:].partition("](")
            out.append(f"<p><img alt='{html.escape(alt)}' src='{html.escape(src.rstrip(')'))}'></p>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
