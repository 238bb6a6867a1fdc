"""Metrics speed and exactness, side by side in one run.

1. Caltech-101 leave-one-out (N = 8,677, the real labels; embeddings are seeded random vectors
   clustered around one random centre per real class): our mAP against the per-query
   ``sklearn.metrics.average_precision_score`` loop, both given the same float32 similarity
   matrix. Reports the largest per-query AP difference and the speed-up (median of 3 runs of
   ours against one sklearn loop).
2. N = 100,000 synthetic clustered embeddings (1,000 classes x 100), leave-one-out from the
   embeddings in bounded memory, in a fresh subprocess so that part 1 does not inflate its peak
   RSS (read from VmHWM, see ``peak_rss_mb``); 20 random queries are checked against sklearn.

Prints progress and a summary, and last
`RESULT speedup_vs_sklearn=<x> max_abs_diff=<y> n=8677 peak_rss_mb_100k=<z>`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.evaluator.datasets import read_list  # noqa: E402
from services.evaluator.metrics import encode_labels, evaluate_scores, leave_one_out  # noqa: E402

DATASET = Path(os.environ.get("RETRIEVAL_SHARED_DIR", ROOT.parent / "shared")) / "datasets" / "caltech101"


def say(message: str) -> None:
    print(message, flush=True)


def clustered(labels: np.ndarray, dim: int, spread: float, seed: int) -> np.ndarray:
    """L2-normalised float32 vectors: a random centre per class plus Gaussian noise of ``spread``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(labels.max()) + 1, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + spread * rng.standard_normal((labels.size, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sklearn_loop(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Leave-one-out AP per query, one ``average_precision_score`` call per query."""
    n = scores.shape[0]
    out = np.empty(n)
    started = time.perf_counter()
    for i in range(n):
        keep = np.arange(n) != i
        out[i] = average_precision_score(labels[keep] == labels[i], scores[i, keep])
        if (i + 1) % 2000 == 0:
            say(f"  sklearn loop: {i + 1}/{n} queries, {time.perf_counter() - started:.1f} s")
    return out


def caltech_part() -> tuple[float, float, int]:
    dataset = read_list(DATASET / "list_of_images.txt", allowed_roots=[DATASET.parent])
    classes, labels = encode_labels(dataset.labels)  # single-label: int64 class ids
    n = labels.size
    say(f"Caltech-101: {n} images, {len(classes)} classes (real labels); embeddings: 64-d clustered, seeded")
    x = clustered(labels, dim=64, spread=1.2, seed=0)
    scores = x @ x.T  # the one similarity matrix both sides are given

    ours_times: list[float] = []
    for run in range(3):
        started = time.perf_counter()
        result = evaluate_scores(scores, labels, labels, exclude=np.arange(n), class_names=classes)
        ours_times.append(time.perf_counter() - started)
        say(f"  ours, run {run + 1}/3: {ours_times[-1]:.3f} s (every metric: AP, P@k, R@k, mAP@k, PR, top-k)")
    say("  sklearn loop (average_precision_score per query) ...")
    started = time.perf_counter()
    reference = sklearn_loop(scores, labels)
    sklearn_s = time.perf_counter() - started
    ours_s = statistics.median(ours_times)
    diff = float(np.max(np.abs(result["ap"] - reference)))
    say(f"  sklearn loop: {sklearn_s:.2f} s, ours (median of 3): {ours_s:.3f} s -> {sklearn_s / ours_s:.1f}x")
    say(f"  mAP ours {result['map']:.12f}, sklearn {reference.mean():.12f}; max |AP diff| {diff:.1e}; "
        f"queries without relevant items: {result['n_queries_without_relevant']}")
    say(f"  P@1 {result['precision_at_k'][1]:.4f}, P@10 {result['precision_at_k'][10]:.4f}, "
        f"mAP@100 {result['map_at_k'][100]:.4f}")
    return sklearn_s / ours_s, diff, n


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MiB.

    Linux's ``ru_maxrss`` carries the parent's peak over fork + exec (the kernel keeps the larger
    of the two), so a child spawned after part 1 would report part 1's matrix; ``VmHWM`` in
    /proc/self/status belongs to this process image alone. Elsewhere, ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB on Linux


def large_part(n_classes: int, per_class: int) -> None:
    """Runs in a fresh process: prints progress and a `PEAK_RSS_MB=<z>` line."""
    labels = np.repeat(np.arange(n_classes), per_class)
    n = labels.size
    x = clustered(labels, dim=64, spread=1.2, seed=1)
    say(f"Synthetic: {n} embeddings (64-d float32), {n_classes} classes x {per_class}; leave-one-out")
    started = time.perf_counter()
    next_report = [0.0]

    def progress(done: int, total: int) -> None:
        if done / total >= next_report[0] or done == total:
            elapsed = time.perf_counter() - started
            say(f"  {done}/{total} queries, {elapsed:.1f} s")
            next_report[0] += 0.1

    result = leave_one_out(x, labels, progress=progress)
    elapsed = time.perf_counter() - started
    peak_mb = peak_rss_mb()
    inputs_mb = x.nbytes / 2**20
    say(f"  {elapsed:.1f} s for {n} queries x {n - 1} candidates; mAP {result['map']:.4f}, "
        f"P@10 {result['precision_at_k'][10]:.4f}")
    say(f"  peak RSS {peak_mb:.0f} MiB (embeddings {inputs_mb:.0f} MiB; a full float32 score matrix would be "
        f"{n * n * 4 / 2**30:.0f} GiB)")
    rng = np.random.default_rng(2)
    worst = 0.0
    for i in rng.choice(n, 20, replace=False):
        keep = np.arange(n) != i
        expected = average_precision_score(labels[keep] == labels[i], (x[keep] @ x[i]))
        worst = max(worst, abs(expected - result["ap"][i]))
    say(f"  20 random queries against sklearn: max |AP diff| {worst:.1e}")
    say(f"PEAK_RSS_MB={peak_mb:.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-only", action="store_true", help="run part 2 here (used by the subprocess)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    if args.large_only:
        large_part(args.classes, args.per_class)
        return 0
    speedup, diff, n = caltech_part()
    command = [sys.executable, __file__, "--large-only", "--classes", str(args.classes),
               "--per-class", str(args.per_class)]
    peak = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout or ():
            if line.startswith("PEAK_RSS_MB="):
                peak = line.strip().split("=", 1)[1]
            else:
                say(line.rstrip())
    if child.returncode != 0 or peak is None:
        say(f"the {args.classes * args.per_class} part failed (exit {child.returncode})")
        return 1
    say(f"RESULT speedup_vs_sklearn={speedup:.1f} max_abs_diff={diff:.1e} n={n} peak_rss_mb_100k={peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
