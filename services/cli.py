"""The ``retrieval`` command: ``retrieval <service> serve``, clients and the demo. Wiring only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _encoder_serve(args: argparse.Namespace) -> int:
    from services.common.settings import settings_from_args
    from services.encoder.config import EncoderSettings
    from services.encoder.servicer import serve

    settings = settings_from_args(EncoderSettings, args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def _search_serve(args: argparse.Namespace) -> int:
    from services.common.settings import settings_from_args
    from services.search.config import SearchSettings
    from services.search.servicer import serve

    settings = settings_from_args(SearchSettings, args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def _embed(address: str, model: str, paths: Sequence[Path], timeout: float) -> list[dict[str, object]]:
    from retrieval.v1 import encoder_pb2, encoder_pb2_grpc

    from services.common.client import channel, wait_serving

    with channel(address) as chan:
        wait_serving(chan, timeout=timeout)
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)
        request = encoder_pb2.EmbedImagesRequest(
            model=model, images=[encoder_pb2.Image(data=p.read_bytes(), id=str(p)) for p in paths])
        response = stub.EmbedImages(request, timeout=timeout)
    rows: list[dict[str, object]] = []
    for result in response.results:
        if result.HasField("error"):
            rows.append({"id": result.id, "error": result.error.message, "code": result.error.code})
        else:
            vec = np.asarray(result.vector.values, dtype=np.float32)
            rows.append({"id": result.id, "model": response.model, "dim": response.dim,
                         "norm": round(float(np.linalg.norm(vec)), 6), "vector": vec})
    return rows


def _encoder_embed(args: argparse.Namespace) -> int:
    rows = _embed(args.address, args.model, [Path(p) for p in args.images], args.timeout)
    failed = 0
    for row in rows:
        vec = row.pop("vector", None)
        if vec is not None and args.full:
            row["vector"] = [round(float(v), 6) for v in np.asarray(vec)]
        elif vec is not None:
            row["head"] = [round(float(v), 4) for v in np.asarray(vec)[:4]]
        failed += "error" in row
        print(json.dumps(row))
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    """Starts an encoder on the embedded default, embeds sample photos, prints their similarities."""
    import tempfile

    from PIL import Image
    from skimage import data as samples

    from services.common.client import channel, wait_serving

    port = args.port
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "encoder", "serve", "--port", str(port),
                               "--metrics-port", "-1", "--models", args.model, "--default-model", args.model],
                              env=env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            names = {"cat": samples.chelsea(), "cat-mirrored": samples.chelsea()[:, ::-1],
                     "coffee": samples.coffee(), "astronaut": samples.astronaut(), "rocket": samples.rocket()}
            paths = []
            for name, pixels in names.items():
                path = Path(tmp) / f"{name}.jpg"
                Image.fromarray(np.ascontiguousarray(pixels)).save(path, quality=90)
                paths.append(path)
            start = time.monotonic()
            print(f"waiting for the encoder on 127.0.0.1:{port} to load {args.model}...", flush=True)
            with channel(f"127.0.0.1:{port}") as chan:
                wait_serving(chan, timeout=300)
            print(f"encoder ready in {time.monotonic() - start:.1f} s")
            rows = _embed(f"127.0.0.1:{port}", args.model, paths, timeout=120)
        vectors = np.stack([np.asarray(r["vector"]) for r in rows])
        print(f"\n{len(rows)} images embedded with {rows[0]['model']} ({rows[0]['dim']}-d, "
              f"norms {', '.join(str(r['norm']) for r in rows)})\ncosine similarities:")
        labels = list(names)
        print(" " * 14 + "".join(f"{n:>14}" for n in labels))
        for name, row in zip(labels, vectors @ vectors.T, strict=True):
            print(f"{name:>14}" + "".join(f"{v:14.3f}" for v in row))
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def _evaluator_serve(args: argparse.Namespace) -> int:
    from services.common.settings import settings_from_args
    from services.evaluator.config import EvaluatorSettings
    from services.evaluator.servicer import serve

    settings = settings_from_args(EvaluatorSettings, args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


class _Bars:
    """One tqdm progress bar per stage of a run."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar: object = None
        self._stage = ""

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            self._bar = self._tqdm(total=total, desc=f"{stage:>17}", unit="it", leave=True, dynamic_ncols=True)
        bar = self._bar
        bar.total = total  # type: ignore[attr-defined]
        bar.n = done  # type: ignore[attr-defined]
        bar.set_postfix_str(message[:60], refresh=False)  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # type: ignore[attr-defined]
            self._bar = None


def _eval_run(args: argparse.Namespace) -> int:
    """Runs datasets x encoders through the services, then writes the aggregated report."""
    from services.evaluator.config import EvaluatorSettings
    from services.evaluator.reports import aggregate, load_reports, markdown_table
    from services.evaluator.runner import RunSpec

    settings = EvaluatorSettings(**{k: v for k, v in {
        "encoder_address": args.encoder, "search_address": args.search, "output_dir": args.output,
        "cache_dir": args.cache_dir}.items() if v is not None})
    output = Path(settings.output_dir)
    specs = [RunSpec(dataset=str(Path(d).resolve()), models=tuple(args.models), protocol=args.protocol,
                     catalogue=args.catalogue or "", queries=args.queries or "", ks=tuple(args.ks),
                     output_dir=str(output.resolve()), tsne=not args.no_tsne) for d in args.dataset]
    if args.evaluator:
        return _eval_run_remote(args.evaluator, specs, output)
    from services.evaluator.servicer import make_runner

    # Datasets named on the command line are allowed in addition to the configured roots.
    allowed = [*settings.allowed_roots, *(Path(d).resolve() for d in args.dataset)]
    runner = make_runner(settings.model_copy(update={"allowed_roots": allowed}))
    runner.encoder.wait_ready(timeout=600)
    runner.search.wait_ready(timeout=120)
    for spec in specs:
        bars = _Bars()
        try:
            for result in runner.run(spec, progress=bars):
                bars.close()
                print(f"{result.model}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
                      + f"  ({result.report_path})")
        finally:
            bars.close()
    md_path, html_path = aggregate(output)
    print("\n" + markdown_table(load_reports(output), "map"))
    print(f"\nreport: {md_path}\n        {html_path}")
    return 0


def _eval_run_remote(address: str, specs: Sequence[Any], output: Path) -> int:
    from retrieval.v1 import evaluator_pb2, evaluator_pb2_grpc

    from services.common.client import channel, wait_serving
    from services.evaluator.servicer import spec_to_proto

    failed = 0
    with channel(address) as chan:
        wait_serving(chan, timeout=60)
        stub = evaluator_pb2_grpc.EvaluatorServiceStub(chan)
        for spec in specs:
            run_id = stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec_to_proto(spec))).run_id
            print(f"run {run_id}: {spec.dataset}")
            bars = _Bars()
            last = None
            for update in stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id)):
                last = update.run
                if last.progress.stage:
                    bars(last.progress.stage, last.progress.done, last.progress.total, last.progress.message)
            bars.close()
            if last is None or last.state != evaluator_pb2.RUN_STATE_SUCCEEDED:
                failed += 1
                print(f"run {run_id} ended {evaluator_pb2.RunState.Name(last.state) if last else '?'}: "
                      f"{last.error if last else ''}")
            else:
                print("\n".join(f"{k}: {v:.4f}" for k, v in sorted(last.metrics.items())))
    return 1 if failed else 0


def _eval_report(args: argparse.Namespace) -> int:
    from services.evaluator.reports import aggregate, load_reports, markdown_table

    md_path, html_path = aggregate(Path(args.directory))
    print(markdown_table(load_reports(Path(args.directory)), "map"))
    print(f"\nreport: {md_path}\n        {html_path}")
    return 0


def _eval_compare(args: argparse.Namespace) -> int:
    from services.evaluator.reports import load_reports, markdown_table

    reports = load_reports(Path(args.directory))
    if not reports:
        print(f"no run reports under {args.directory}", file=sys.stderr)
        return 1
    print(markdown_table(reports, args.metric))
    return 0


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from services.common.settings import add_settings_arguments
    from services.encoder.config import EncoderSettings
    from services.evaluator.config import EvaluatorSettings
    from services.search.config import SearchSettings

    parser = argparse.ArgumentParser(prog="retrieval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    encoder = commands.add_parser("encoder", help="the encoder service").add_subparsers(dest="action",
                                                                                         required=True)
    serve = encoder.add_parser("serve", help="run the encoder gRPC server",
                               description="Flags override ENCODER_* environment variables.")
    add_settings_arguments(serve, EncoderSettings)
    serve.set_defaults(func=_encoder_serve)
    embed = encoder.add_parser("embed", help="embed image files through a running encoder")
    embed.add_argument("images", nargs="+")
    embed.add_argument("--address", default="127.0.0.1:50051")
    embed.add_argument("--model", default="")
    embed.add_argument("--timeout", type=float, default=60.0)
    embed.add_argument("--full", action="store_true", help="print whole vectors")
    embed.set_defaults(func=_encoder_embed)

    evaluator = commands.add_parser("evaluator", help="the evaluator service").add_subparsers(
        dest="action", required=True)
    eval_serve = evaluator.add_parser("serve", help="run the evaluator gRPC server",
                                      description="Flags override EVALUATOR_* environment variables.")
    add_settings_arguments(eval_serve, EvaluatorSettings)
    eval_serve.set_defaults(func=_evaluator_serve)

    evaluate = commands.add_parser("eval", help="benchmark encoders on labelled image sets").add_subparsers(
        dest="action", required=True)
    run = evaluate.add_parser("run", help="evaluate encoders x datasets through the services")
    run.add_argument("--dataset", action="append", required=True,
                     help="dataset root or list file (repeat for several datasets)")
    run.add_argument("--models", type=_comma_list, default=["efficientnet-lite0"], help="comma-separated ids")
    run.add_argument("--protocol", choices=["leave_one_out", "catalogue_query"], default="leave_one_out")
    run.add_argument("--catalogue", help="catalogue list (catalogue_query), relative to the dataset root")
    run.add_argument("--queries", help="query list (catalogue_query), relative to the dataset root")
    run.add_argument("--ks", type=lambda s: [int(k) for k in _comma_list(s)], default=[1, 5, 10, 20, 100])
    run.add_argument("--output", help="report directory [env EVALUATOR_OUTPUT_DIR; default reports]")
    run.add_argument("--cache-dir", help="embedding cache [env EVALUATOR_CACHE_DIR]")
    run.add_argument("--encoder", help="encoder address [env EVALUATOR_ENCODER_ADDRESS; default 127.0.0.1:50051]")
    run.add_argument("--search", help="search address [env EVALUATOR_SEARCH_ADDRESS; default 127.0.0.1:50052]")
    run.add_argument("--evaluator", help="submit to this evaluator service instead of running here")
    run.add_argument("--no-tsne", action="store_true", help="skip the t-SNE maps")
    run.set_defaults(func=_eval_run)
    report = evaluate.add_parser("report", help="aggregate run reports into summary.md / summary.html")
    report.add_argument("directory", nargs="?", default="reports")
    report.set_defaults(func=_eval_report)
    compare = evaluate.add_parser("compare", help="print the encoders x datasets table of run reports")
    compare.add_argument("directory", nargs="?", default="reports")
    compare.add_argument("--metric", default="map", help="map, P@k, R@k or mAP@k")
    compare.set_defaults(func=_eval_compare)

    search = commands.add_parser("search", help="the search service").add_subparsers(dest="action", required=True)
    search_serve = search.add_parser("serve", help="run the search gRPC server",
                                     description="Flags override SEARCH_* environment variables.")
    add_settings_arguments(search_serve, SearchSettings)
    search_serve.set_defaults(func=_search_serve)

    demo = commands.add_parser("demo", help="start an encoder, embed sample photos, print similarities")
    demo.add_argument("--model", default="efficientnet-lite0")
    demo.add_argument("--port", type=int, default=50061)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
