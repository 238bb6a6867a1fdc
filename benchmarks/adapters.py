"""An adapter on Caltech-101 (or another labelled set), measured by the evaluator through the services.

Starts encoder, search and evaluator as separate processes (``services.stack``; the encoder serves
adapters from ``<work>/adapters``), then:

1. the evaluator runs catalogue/query with the frozen base model (this also fills its embedding
   cache with the catalogue's embeddings);
2. ``retrieval adapt train`` (the real command, in a child process) trains the adapter on the
   catalogue's embeddings from that cache: only the catalogue list is read, and the validation part
   is carved out of the catalogue;
3. the evaluator runs catalogue/query again with the adapter model ``<base>+<name>``, served by the
   encoder from its adapters directory (base forward, head, L2 normalisation, on ONNX Runtime);
4. both reports are aggregated: the summary puts base and adapter side by side with the paired
   comparison, and the adapter's folder has its validation curve and before/after t-SNE maps.

``--sample caltech-half`` or ``--sample digits`` first writes another labelled set with its own
70/30 catalogue/query split (a disjoint half of Caltech-101's classes, or scikit-learn's digits) and
runs the same steps on it.

Last line: ``RESULT map_frozen=<a> map_adapter=<b> gain_points=<c> train_seconds=<t>`` (mAP over the
queries, gain in mAP points = 100 x (b - a), training = the search plus the refit, as the card
records it; embedding is not training).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.v1 import evaluator_pb2  # noqa: E402

from services.common.clients import EvaluatorClient  # noqa: E402
from services.evaluator.reports import aggregate  # noqa: E402
from services.stack import Stack, StackConfig  # noqa: E402

SHARED = Path(os.environ.get("RETRIEVAL_SHARED_DIR", ROOT.parent / "shared"))
CALTECH = SHARED / "datasets" / "caltech101"
SAMPLES = ("caltech-half", "caltech-other-half", "digits")


def log(message: str) -> None:
    print(message, flush=True)


def split_70_30(items: list[tuple[str, str]], root: Path, seed: int) -> None:
    """Writes ``list_of_images.txt``, ``split_train.txt`` (70% of each class) and ``split_test.txt``."""
    rng = random.Random(seed)
    by_class: dict[str, list[str]] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    train, test = [], []
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        rng.shuffle(paths)
        cut = round(len(paths) * 0.7)
        train += paths[:cut]
        test += paths[cut:]
    (root / "list_of_images.txt").write_text("".join(f"{p}\t{label}\n" for p, label in items))
    (root / "split_train.txt").write_text("".join(f"{p}\n" for p in train))
    (root / "split_test.txt").write_text("".join(f"{p}\n" for p in test))


def write_sample(kind: str, root: Path) -> Path:
    """Another labelled set, with a seeded 70/30 catalogue/query split per class."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "digits":
        from services.evaluator.samples import write_digits

        write_digits(root)
        items = [tuple(line.split("\t")) for line in (root / "list_of_images.txt").read_text().splitlines() if line]
    elif kind in ("caltech-half", "caltech-other-half"):
        # The classes at odd positions of Caltech-101's sorted class list (50), or the others (51): no
        # class in common. Images are copied (a dataset may not reach outside its root through links).
        lines = [line.split("\t") for line in (CALTECH / "list_of_images.txt").read_text().splitlines() if line]
        classes = sorted({label for _, label in lines})[1 if kind == "caltech-half" else 0::2]
        keep = set(classes)
        items = []
        for path, label in lines:
            if label in keep:
                target = root / path
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(CALTECH / path, target)
                items.append((path, label))
    else:
        raise SystemExit(f"unknown sample {kind!r}")
    split_70_30([(p, label) for p, label in items], root, seed=0)
    return root


def evaluate(client: EvaluatorClient, dataset: Path, model: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = evaluator_pb2.RunSpec(dataset=str(dataset), models=[model], protocol_name="catalogue_query",
                                 catalogue=args.catalogue, queries=args.queries, tsne=not args.no_tsne,
                                 run_name="adapters")
    start = time.monotonic()
    run_id = client.start_run(spec)
    final, stage = None, ""
    for final in client.watch(run_id):
        if final.progress.stage != stage:
            stage = final.progress.stage
            log(f"  {time.monotonic() - start:6.1f} s  {model}: {stage}")
    if final is None or final.state != evaluator_pb2.RUN_STATE_SUCCEEDED:
        raise SystemExit(f"run of {model} failed: {final.error if final else 'no answer'}")
    report: dict[str, Any] = json.loads(Path(final.reports[0]).read_text())
    m = report["metrics"]
    log(f"  {model}: mAP {m['map']:.4f} {m['map_ci']}, P@1 {m['precision_at_k'].get('1')}, "
        f"{m['n_queries']} queries ({time.monotonic() - start:.0f} s)")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(CALTECH))
    parser.add_argument("--sample", choices=SAMPLES,
                        help="write this labelled set (70/30 split) into the work folder and use it instead")
    parser.add_argument("--transfer-sample", choices=SAMPLES,
                        help="also evaluate the trained adapter, and its base, on this other set (classes the "
                             "adapter never saw: what an adapter does outside its catalogue's classes)")
    parser.add_argument("--catalogue", default="split_train.txt")
    parser.add_argument("--queries", default="split_test.txt")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--name", default="", help="adapter name (default: the dataset folder's name)")
    parser.add_argument("--budget-seconds", type=float, default=40.0, help="search budget of adapt train")
    parser.add_argument("--work-dir", help="default: a fresh temporary folder")
    parser.add_argument("--cache-dir", help="embedding cache to reuse (default: a fresh one in the work folder)")
    parser.add_argument("--no-tsne", action="store_true", help="skip the evaluator's t-SNE maps")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="adapters-bench-")).resolve()
    dataset = write_sample(args.sample, work / "datasets" / args.sample) if args.sample else Path(args.dataset)
    dataset = dataset.resolve()
    transfer = (write_sample(args.transfer_sample, work / "datasets" / args.transfer_sample).resolve()
                if args.transfer_sample else None)
    name = args.name or dataset.name
    adapters_dir = work / "adapters"
    cache_dir = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    config = StackConfig.on_free_ports(data_dir=work / "qdrant", log_dir=work / "logs", output_dir=work / "reports",
                                       cache_dir=cache_dir, models=(args.encoder,),
                                       allowed_roots=(dataset,) if transfer is None else (dataset, transfer),
                                       adapters_dir=adapters_dir, web=False)
    log(f"[1/4] starting the stack ({args.encoder}, adapters from {adapters_dir}; work folder {work})")
    with Stack(config), EvaluatorClient(config.address("evaluator")) as client:
        client.wait_ready(timeout=60)
        log(f"[2/4] frozen {args.encoder}: catalogue/query on {dataset}")
        frozen = evaluate(client, dataset, args.encoder, args)
        log(f"[3/4] retrieval adapt train --out {adapters_dir / name} (embeddings from the evaluator's cache)")
        command = [sys.executable, "-m", "services.cli", "adapt", "train", "--dataset", str(dataset),
                   "--catalogue", args.catalogue, "--encoder", args.encoder, "--out", str(adapters_dir / name),
                   "--encoder-address", config.address("encoder"), "--cache-dir", str(cache_dir),
                   "--budget-seconds", str(args.budget_seconds)]
        log("  $ " + " ".join(command[1:]))
        subprocess.run(command, check=True, cwd=ROOT)
        card = json.loads((adapters_dir / name / "card.json").read_text())
        training = card["training"]
        log(f"[4/4] {args.encoder}+{name} served by the encoder: catalogue/query")
        adapted = evaluate(client, dataset, f"{args.encoder}+{name}", args)
        if transfer is not None:
            log(f"[+] the same adapter and its base on {transfer} (classes it was not trained on)")
            outside = [evaluate(client, transfer, model, args)["metrics"] for model in
                       (args.encoder, f"{args.encoder}+{name}")]
    summary, _ = aggregate(work / "reports" / "adapters")
    text = summary.read_text()
    start = text.find("### Adapters against their base models")
    log("\n" + text[start:text.find("\n\n\n", start) if start >= 0 else 0].strip())
    log(f"\nadapter {card['name']}: {card['loss']} {card['hyperparameters']}")
    log(f"  embeddings: {training['dataset']['embeddings']}; {training['dataset']['n_items']} catalogue items, "
        f"{training['validation']['n_items']} held out for validation; validation mAP "
        f"{training['base_validation_map']:.4f} (base) -> {training['best_validation_map']:.4f}; "
        f"{len(training['search']['trials'])} trials in {training['search']['seconds']:.1f} s")
    log(f"  figures: {adapters_dir / name / 'validation_curve.png'}, {adapters_dir / name / 'tsne_before_after.png'}")
    log(f"  summary: {summary}")
    m_frozen, m_adapter = frozen["metrics"]["map"], adapted["metrics"]["map"]
    p1_frozen, p1_adapter = frozen["metrics"]["precision_at_k"]["1"], adapted["metrics"]["precision_at_k"]["1"]
    log(f"  P@1 {p1_frozen:.4f} -> {p1_adapter:.4f} ({'did not fall' if p1_adapter >= p1_frozen else 'FELL'})")
    if transfer is not None:
        log(f"TRANSFER {transfer.name}: map_frozen={outside[0]['map']:.4f} map_adapter={outside[1]['map']:.4f} "
            f"P@1 {outside[0]['precision_at_k']['1']:.4f} -> {outside[1]['precision_at_k']['1']:.4f}")
    print(f"RESULT map_frozen={m_frozen:.4f} map_adapter={m_adapter:.4f} "
          f"gain_points={100 * (m_adapter - m_frozen):.2f} train_seconds={training['train_seconds']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
