"""Caltech-101 leave-one-out with EfficientNet-Lite0 through a running stack, stage by stage.

Starts encoder, search and evaluator as separate processes (``services.stack``), runs the whole
evaluation through the evaluator service (embedding, indexing, querying every image through the
search service in SearchBatch calls by stored point id, metrics, report; the t-SNE map is left out:
it is a figure, not a stage of the evaluation), and reads the stage timings from the run's report.

The embedding cache lives in a fresh directory, so the images are embedded through the encoder (use
``--cache-dir`` to reuse one: then the embedding stage is a cache read, and ``--embed-seconds``
gives the recorded embedding time to compare the other stages with, and the output says so).
The mAP is checked against scikit-learn's ``average_precision_score`` on a seeded sample of queries
of the same embeddings.

Last line: ``RESULT query_seconds=<q> embed_seconds=<e> total_over_embed=<r> map=<m>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.v1 import evaluator_pb2  # noqa: E402

from services.common.clients import EvaluatorClient  # noqa: E402
from services.evaluator.cache import EmbeddingCache, cache_key  # noqa: E402
from services.evaluator.datasets import check_images, read_list  # noqa: E402
from services.stack import Stack, StackConfig  # noqa: E402

DATASET = Path(os.environ.get("RETRIEVAL_SHARED_DIR", ROOT.parent / "shared")) / "datasets" / "caltech101"


def log(message: str) -> None:
    print(message, flush=True)


def sklearn_check(cache_dir: Path, report: dict[str, object], sample: int, seed: int) -> float:
    """Largest |our AP - sklearn AP| over ``sample`` seeded queries of the cached embeddings."""
    from sklearn.metrics import average_precision_score

    ds = read_list(DATASET / "list_of_images.txt", allowed_roots=[DATASET.parent])
    model = report["model"]  # type: ignore[index]
    key = cache_key(check_images(ds).fingerprint, model["id"], model["weights_sha256"])  # type: ignore[index]
    cached = EmbeddingCache(cache_dir).load(key)
    if cached is None:
        raise RuntimeError("the run's embeddings are not in the cache")
    labels = np.array([item.labels[0] for item in ds.items if item.path in set(cached.paths)])
    ours = dict(zip(report["per_query"]["ids"], report["per_query"]["ap"], strict=True))  # type: ignore[index]
    worst = 0.0
    for q in np.random.default_rng(seed).choice(len(labels), size=min(sample, len(labels)), replace=False):
        others = np.arange(len(labels)) != q
        reference = average_precision_score(labels[others] == labels[q], (cached.vectors @ cached.vectors[q])[others])
        worst = max(worst, abs(float(ours[cached.paths[q]]) - float(reference)))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--cache-dir", help="embedding cache to use (default: a fresh one, so images are embedded)")
    parser.add_argument("--embed-seconds", type=float, help="recorded embedding time, when embeddings come from "
                                                            "the cache")
    parser.add_argument("--sklearn-sample", type=int, default=300, help="queries checked against scikit-learn")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="evaluator-bench-"))
    cache_dir = Path(args.cache_dir) if args.cache_dir else work / "cache"
    config = StackConfig.on_free_ports(data_dir=work / "qdrant", log_dir=work / "logs", output_dir=work / "reports",
                                       cache_dir=cache_dir, models=(args.model,), allowed_roots=(DATASET,))
    log(f"[1/3] starting the stack ({args.model}; logs in {config.log_dir})")
    with Stack(config):
        log("[2/3] Caltech-101 leave-one-out through the evaluator service")
        with EvaluatorClient(config.address("evaluator")) as client:
            spec = evaluator_pb2.RunSpec(dataset=str(DATASET), models=[args.model], tsne=False,
                                         protocol=evaluator_pb2.PROTOCOL_LEAVE_ONE_OUT)
            start = time.monotonic()
            run_id = client.start_run(spec)
            stage, last_log = "", 0.0
            final = None
            for final in client.watch(run_id):
                p = final.progress
                if p.stage != stage or time.monotonic() - last_log > 10:
                    log(f"  {time.monotonic() - start:6.1f} s  {p.stage:<17} {p.done}/{p.total}")
                    stage, last_log = p.stage, time.monotonic()
            wall = time.monotonic() - start
    if final is None or final.state != evaluator_pb2.RUN_STATE_SUCCEEDED:
        log(f"run failed: {final.error if final else 'no answer'}")
        return 1
    report = json.loads(Path(final.reports[0]).read_text())
    timings = report["timings"]
    cached = report["model"]["embeddings_cached"]
    embed = timings["embed_seconds"]
    if cached:
        if args.embed_seconds is None:
            log("the embeddings came from the cache: give the recorded embedding time with --embed-seconds")
            return 2
        log(f"embeddings from the cache ({embed:.1f} s to read); comparing with the recorded {args.embed_seconds} s")
        embed, wall = args.embed_seconds, wall - timings["embed_seconds"] + args.embed_seconds
    log("[3/3] checking the mAP against scikit-learn on a sample of queries")
    diff = sklearn_check(cache_dir, report, args.sklearn_sample, seed=0)
    print("\n| stage | seconds |\n|---|---|")
    for key in ("embed_seconds", "index_seconds", "query_seconds", "metrics_seconds", "report_seconds"):
        print(f"| {key.removesuffix('_seconds')} | {timings[key]:.1f} |")
    print(f"| whole run (start to SUCCEEDED, as the client saw it) | {wall:.1f} |")
    print(f"\nmAP {report['metrics']['map']:.6f} over {report['metrics']['n_queries']} queries; largest |AP - sklearn| "
          f"over {args.sklearn_sample} queries: {diff:.2e}")
    print(f"RESULT query_seconds={timings['query_seconds']:.2f} embed_seconds={embed:.1f} "
          f"total_over_embed={wall / embed:.3f} map={report['metrics']['map']:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
