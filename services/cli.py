"""The ``retrieval`` command: ``retrieval <service> serve``, clients and the demo. Wiring only."""

from __future__ import annotations

import argparse
import json
import logging
import os
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


def _web_serve(args: argparse.Namespace) -> int:
    from services.common.settings import settings_from_args
    from services.web.config import WebSettings
    from services.web.server import serve

    settings = settings_from_args(WebSettings, args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(settings)


def _index_dataset(encoder_address: str, search_address: str, dataset: Path, model: str, cache_dir: Path,
                   args: argparse.Namespace, name: str = "", collection: str = "") -> Any:
    """Indexes ``dataset`` into its browsable collection through the services (``retrieval index``)."""
    from services.common.clients import EncoderClient, SearchClient
    from services.evaluator.cache import EmbeddingCache
    from services.evaluator.datasets import open_dataset, read_list
    from services.evaluator.indexing import index_dataset

    allowed = [dataset if dataset.is_dir() else dataset.parent]  # the dataset named here is allowed
    opened = (read_list(dataset, allowed_roots=allowed, name=name or None) if dataset.is_file()
              else open_dataset(dataset, allowed_roots=allowed, name=name or None))
    with EncoderClient(_endpoint(encoder_address, args)) as encoder, \
            SearchClient(_endpoint(search_address, args)) as search:
        encoder.wait_ready(timeout=600)
        search.wait_ready(timeout=120)
        bars = _Bars()
        try:
            return index_dataset(encoder, search, opened, model=model, cache=EmbeddingCache(cache_dir),
                                 collection=collection, progress=lambda stage, d, t: bars(stage, d, t, ""))
        finally:
            bars.close()


def _index(args: argparse.Namespace) -> int:
    """Embeds a dataset and keeps it in a collection people can search (the web page)."""
    result = _index_dataset(args.encoder, args.search, Path(args.dataset).resolve(), args.model,
                            Path(args.cache_dir), args, name=args.name or "", collection=args.collection or "")
    print(f"indexed {result.indexed} images of {result.dataset} with {result.model} into collection "
          f"{result.collection} ({len(result.excluded)} excluded, {result.removed} stale points removed"
          f"{', embeddings from the cache' if result.from_cache else ''})")
    for path, reason in result.excluded[:20]:
        print(f"  excluded {path}: {reason}")
    return 0


def _endpoint(address: str, args: argparse.Namespace) -> Any:
    """The endpoint of a service named on the command line, with the client flags (token, TLS)."""
    from services.common.clients import ClientTLS, Endpoint
    from services.common.settings import ClientSettings, settings_from_args

    client = settings_from_args(ClientSettings, args)
    tls = ClientTLS.from_files(client.tls_ca_file, client.tls_cert_file, client.tls_key_file, client.tls_server_name)
    return Endpoint(address, token=client.token, tls=tls, timeout=client.timeout)


def _embed(args: argparse.Namespace, paths: Sequence[Path]) -> list[dict[str, object]]:
    from services.common.clients import EncoderClient

    endpoint = _endpoint(args.address, args)
    with EncoderClient(endpoint) as client:
        client.wait_ready(timeout=endpoint.timeout)
        embedded = client.embed_images([p.read_bytes() for p in paths], model=args.model)
    rows: list[dict[str, object]] = []
    for i, path in enumerate(paths):
        if i in embedded.errors:
            error = embedded.errors[i]
            rows.append({"id": str(path), "error": error.message, "code": error.code.value[0]})
        else:
            vec = embedded.vectors[i]
            rows.append({"id": str(path), "model": embedded.model, "dim": embedded.dim,
                         "norm": round(float(np.linalg.norm(vec)), 6), "vector": vec})
    return rows


def _encoder_embed(args: argparse.Namespace) -> int:
    rows = _embed(args, [Path(p) for p in args.images])
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


def _up(args: argparse.Namespace) -> int:
    """Starts the three services, prints their addresses, stops them on Ctrl-C / SIGTERM."""
    import signal
    import threading

    from services.stack import SERVICES, Stack, StackConfig

    options = {"host": args.host, "data_dir": Path(args.data_dir), "models": tuple(args.models),
               "log_dir": Path(args.log_dir), "output_dir": Path(args.output),
               "allowed_roots": tuple(Path(r).resolve() for r in args.allowed_roots),
               "auth_token": args.auth_token or None,
               **{k: Path(v).resolve() for k in ("tls_cert_file", "tls_key_file", "tls_ca_file")
                  if (v := getattr(args, k))}}
    options["web_port"] = args.web_port
    config = StackConfig.on_free_ports(**options) if args.free_ports else StackConfig(**options)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = Stack(config)
    print(f"starting encoder ({', '.join(config.models)}), search (Qdrant Edge in {config.data_dir}), "
          f"evaluator and the web gateway; logs in {config.log_dir}", flush=True)
    try:
        stack.start()
        for service in SERVICES:
            print(f"  {service:<9} grpc {config.address(service)}   metrics "
                  f"http://{config.host}:{config.metrics_ports[service]}/metrics")
        print(f"  {'web':<9} {config.web_url}   (search page; reports from {config.output_dir})")
        print("ready; Ctrl-C stops", flush=True)
        while not stop.is_set() and all(p.poll() is None for p in stack.processes.values()):
            stop.wait(1.0)
    finally:
        codes = stack.stop()
        print("stopped: " + ", ".join(f"{s} exit {c}" for s, c in codes.items()))
    return 0 if all(c == 0 for c in codes.values()) else 1


def _demo(args: argparse.Namespace) -> int:
    """The README's main job: the stack on free ports, a leave-one-out benchmark of the encoders on a
    dataset (scikit-learn's digits by default) through the services, the comparison table."""
    from services.evaluator.reports import aggregate, load_reports, markdown_table
    from services.evaluator.samples import write_digits
    from services.evaluator.spec import RunSpec
    from services.stack import Stack, StackConfig

    work = Path(args.work_dir)
    if args.dataset:
        dataset = Path(args.dataset).resolve()
    else:
        dataset = write_digits(work / "datasets" / "digits").resolve()
        print(f"dataset: scikit-learn digits (1,797 images, 10 classes) written to {dataset}")
    output = Path(args.output).resolve()
    config = StackConfig.on_free_ports(data_dir=work / "qdrant", models=tuple(args.models), log_dir=work / "logs",
                                       output_dir=output, cache_dir=work / "embeddings", allowed_roots=(dataset,))
    start = time.monotonic()
    print(f"starting the stack (encoder {config.address('encoder')}, search {config.address('search')}, "
          f"evaluator {config.address('evaluator')}; logs in {config.log_dir})...", flush=True)
    with Stack(config):
        print(f"stack ready in {time.monotonic() - start:.0f} s; search page and run progress: {config.web_url}",
              flush=True)
        spec = RunSpec(dataset=str(dataset), models=tuple(args.models), protocol=args.protocol,
                       catalogue=args.catalogue or "", queries=args.queries or "", tsne=not args.no_tsne)
        code = _follow_runs(config.address("evaluator"), args, [spec])
        if code != 0:
            return code
        # A collection to search on the page (the run's own evaluation collections are dropped); the
        # run's embeddings come from the cache.
        from services.common.errors import ServiceError

        try:
            indexed = _index_dataset(config.address("encoder"), config.address("search"), dataset, args.models[0],
                                     config.cache_dir, args)
        except ServiceError as exc:  # e.g. a train/ + test/ folder split, which is no single dataset
            indexed = None
            print(f"not indexed for the search page: {exc.message}")
        md_path, html_path = aggregate(output)
        name = dataset.name
        reports = [r for r in load_reports(output) if r["dataset"]["name"] == name and r["protocol"] == args.protocol]
        print(f"\nmAP, {args.protocol} on {name} ({reports[0]['dataset']['n_images']} images):\n")
        print(markdown_table(reports, "map"))
        print(f"\nreport: {md_path}\n        {html_path}")
        page = f"{config.web_url}?c={indexed.collection}" if indexed else config.web_url
        if indexed:
            print(f"search page: {page} ({indexed.indexed} images of {indexed.dataset}, {indexed.model})")
        print(f"total {time.monotonic() - start:.0f} s", flush=True)
        if args.serve:
            _serve_until_stopped(f"serving the stack and the search page until Ctrl-C: {page}")
        else:
            print(f"(the stack stops now; `retrieval demo --serve` keeps it and the page up; the collection stays "
                  f"in {config.data_dir})")
    return 0


def _serve_until_stopped(message: str) -> None:
    """Blocks until Ctrl-C or SIGTERM."""
    import contextlib
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(message, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()


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
    from services.evaluator.spec import RunSpec

    specs = [RunSpec(dataset=str(Path(d).resolve()), models=tuple(args.models), protocol=args.protocol,
                     catalogue=args.catalogue or "", queries=args.queries or "", ks=tuple(args.ks),
                     tsne=not args.no_tsne, run_name=args.run_name or "") for d in args.dataset]
    if args.evaluator:
        if args.output:
            print("--output: the evaluator service decides where reports go (retrieval up --output, "
                  "EVALUATOR_OUTPUT_DIR); name the run with --run-name", file=sys.stderr)
            return 2
        return _follow_runs(args.evaluator, args, specs)
    from services.evaluator.servicer import make_runner

    settings = EvaluatorSettings(**{k: v for k, v in {
        "encoder_address": args.encoder, "search_address": args.search, "output_dir": args.output,
        "cache_dir": args.cache_dir, "service_token": args.token, "service_tls_ca_file": args.tls_ca_file,
        "service_tls_cert_file": args.tls_cert_file, "service_tls_key_file": args.tls_key_file}.items()
        if v is not None})
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
    output = Path(settings.output_dir) / (args.run_name or "")
    md_path, html_path = aggregate(output)
    print("\n" + markdown_table(load_reports(output), "map"))
    print(f"\nreport: {md_path}\n        {html_path}")
    return 0


def _follow_runs(address: str, args: argparse.Namespace, specs: Sequence[Any]) -> int:
    """Starts each spec on the evaluator service and follows it to its end (across connection
    ageing and evaluator restarts: the watch is re-opened by run id); 1 if any run did not succeed."""
    from retrieval.v1 import evaluator_pb2

    from services.common.clients import EvaluatorClient
    from services.evaluator.servicer import spec_to_proto

    failed = 0
    with EvaluatorClient(_endpoint(address, args)) as client:
        client.wait_ready(timeout=60)
        for spec in specs:
            run_id = client.start_run(spec_to_proto(spec))
            print(f"run {run_id}: {spec.dataset}")
            bars = _Bars()
            last = None
            try:
                for last in client.watch(run_id):
                    if last.progress.stage:
                        bars(last.progress.stage, last.progress.done, last.progress.total, last.progress.message)
            finally:
                bars.close()
            if last is None or last.state != evaluator_pb2.RUN_STATE_SUCCEEDED:
                failed += 1
                print(f"run {run_id} ended {evaluator_pb2.RunState.Name(last.state) if last else '?'}: "
                      f"{last.error if last else ''}")
                continue
            by_model: dict[str, dict[str, float]] = {}
            for key, value in last.metrics.items():
                model, _, metric = key.rpartition("/")
                by_model.setdefault(model, {})[metric] = value
            for model, values in by_model.items():
                ordered = sorted(values.items(), key=lambda kv: (kv[0] != "map", len(kv[0]), kv[0]))
                print(f"{model}: " + ", ".join(f"{k} {v:.4f}" for k, v in ordered))
            for report in last.reports:
                print(f"  report {report}")
    return 1 if failed else 0


def _eval_report(args: argparse.Namespace) -> int:
    from services.evaluator.reports import aggregate, load_reports, markdown_table

    md_path, html_path = aggregate(Path(args.directory))
    print(markdown_table(load_reports(Path(args.directory)), "map"))
    print(f"\nreport: {md_path}\n        {html_path}")
    return 0


def _eval_compare(args: argparse.Namespace) -> int:
    """The encoders x datasets table, then per dataset and protocol each encoder's mAP with its 95%
    interval and the paired comparisons of the encoders on the same queries."""
    from collections import defaultdict

    from services.evaluator.reports import comparison_sentence, load_reports, markdown_table, paired_comparisons

    reports = load_reports(Path(args.directory))
    if not reports:
        print(f"no run reports under {args.directory}", file=sys.stderr)
        return 1
    print(markdown_table(reports, args.metric))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for report in reports:
        groups[(report["dataset"]["name"], report["protocol"])].append(report)
    for (dataset, protocol), group in sorted(groups.items()):
        print(f"\n{dataset} ({protocol}):")
        for report in sorted(group, key=lambda r: -(r["metrics"]["map"] or 0.0)):
            low, high = report["metrics"].get("map_ci") or (None, None)
            interval = f" [{low:.4f}, {high:.4f}]" if low is not None else ""
            print(f"  {report['model']['id']}: mAP {report['metrics']['map']:.4f}{interval}")
        for a, b, comparison in paired_comparisons(group):
            print(f"  {comparison_sentence(a, b, comparison)}")
    return 0


def _adapt_train(args: argparse.Namespace) -> int:
    """Trains an adapter on a catalogue's cached (or freshly embedded) embeddings; torch is imported
    here, not at start-up: the slim image runs the other commands without it."""
    from services.adapters.command import TrainRequest, train
    from services.adapters.search import SearchSettings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SearchSettings(budget_seconds=args.budget_seconds, max_trials=args.max_trials,
                              max_epochs=args.max_epochs, validation_fraction=args.validation_fraction,
                              seed=args.seed, losses=tuple(args.losses))
    from services.common.errors import ServiceError

    endpoint = _endpoint(args.encoder_address, args) if args.encoder_address else None
    try:
        result = train(TrainRequest(dataset=Path(args.dataset), catalogue=args.catalogue or "", encoder=args.encoder,
                                    out=Path(args.out), encoder_endpoint=endpoint, cache_dir=Path(args.cache_dir),
                                    settings=settings))
    except ServiceError as exc:
        print(f"adapt train: {exc.message}", file=sys.stderr)
        return 2
    training = result.card["training"]
    print(f"adapter {result.model_id}: validation mAP {training['base_validation_map']:.4f} (base) -> "
          f"{training['best_validation_map']:.4f} ({result.card['loss']}); trained in {result.train_seconds:.1f} s; "
          f"serve it with ENCODER_ADAPTERS_DIR={Path(args.out).parent}")
    return 0


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from services.common.settings import ClientSettings, add_settings_arguments
    from services.encoder.config import EncoderSettings
    from services.evaluator.config import EvaluatorSettings
    from services.evaluator.protocols import PROTOCOLS
    from services.search.config import SearchSettings
    from services.web.config import WebSettings

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
    embed.add_argument("--full", action="store_true", help="print whole vectors")
    add_settings_arguments(embed, ClientSettings)
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
    run.add_argument("--protocol", choices=sorted(PROTOCOLS), default="leave_one_out")
    run.add_argument("--catalogue", help="catalogue list (catalogue_query), relative to the dataset root")
    run.add_argument("--queries", help="query list (catalogue_query), relative to the dataset root")
    run.add_argument("--ks", type=lambda s: [int(k) for k in _comma_list(s)], default=[1, 5, 10, 20, 100])
    run.add_argument("--output", help="report directory when the run executes here (not with --evaluator) "
                                      "[env EVALUATOR_OUTPUT_DIR; default reports]")
    run.add_argument("--run-name", help="the run's report folder under the report directory (letters, digits, "
                                        ". _ -); with --evaluator, the only say a client has in where reports go")
    run.add_argument("--cache-dir", help="embedding cache [env EVALUATOR_CACHE_DIR]")
    run.add_argument("--encoder", help="encoder address [env EVALUATOR_ENCODER_ADDRESS; default 127.0.0.1:50051]")
    run.add_argument("--search", help="search address [env EVALUATOR_SEARCH_ADDRESS; default 127.0.0.1:50052]")
    run.add_argument("--evaluator", help="submit to this evaluator service instead of running here")
    run.add_argument("--no-tsne", action="store_true", help="skip the t-SNE maps")
    add_settings_arguments(run, ClientSettings)
    run.set_defaults(func=_eval_run)
    report = evaluate.add_parser("report", help="aggregate run reports into summary.md / summary.html")
    report.add_argument("directory", nargs="?", default="reports")
    report.set_defaults(func=_eval_report)
    compare = evaluate.add_parser("compare", help="print the encoders x datasets table of run reports")
    compare.add_argument("directory", nargs="?", default="reports")
    compare.add_argument("--metric", default="map", help="map, P@k, R@k or mAP@k")
    compare.set_defaults(func=_eval_compare)

    adapt = commands.add_parser("adapt", help="adapters: heads trained on a catalogue, served as <base>+<name>"
                                ).add_subparsers(dest="action", required=True)
    adapt_train = adapt.add_parser(
        "train", help="train an adapter on a catalogue's embeddings",
        description="Trains a linear or MLP head on the base model's embeddings of the catalogue (from the "
                    "evaluator's embedding cache, or through the encoder service), with a metric-learning or "
                    "classifier loss chosen by an optuna search within a time budget and early stopping on a "
                    "held-out part of the catalogue. Only the catalogue list is read.")
    adapt_train.add_argument("--dataset", required=True, help="dataset root (list_of_images.txt or class folders)")
    adapt_train.add_argument("--catalogue", help="catalogue list relative to the dataset root (default: every image)")
    adapt_train.add_argument("--encoder", default="efficientnet-lite0", help="base model id")
    adapt_train.add_argument("--out", required=True, help="adapter directory adapters/NAME; served as <encoder>+NAME")
    adapt_train.add_argument("--encoder-address", help="encoder service, to embed what the cache lacks")
    adapt_train.add_argument("--cache-dir",
                             default=os.environ.get("EVALUATOR_CACHE_DIR", ".cache/retrieval/embeddings"),
                             help="the evaluator's embedding cache [env EVALUATOR_CACHE_DIR]")
    adapt_train.add_argument("--budget-seconds", type=float, default=45.0, help="wall time of the search")
    adapt_train.add_argument("--max-trials", type=int, default=40)
    adapt_train.add_argument("--max-epochs", type=int, default=40)
    adapt_train.add_argument("--validation-fraction", type=float, default=0.15)
    adapt_train.add_argument("--seed", type=int, default=0)
    adapt_train.add_argument("--losses", type=_comma_list, default=["supcon", "triplet", "contrastive", "softmax"],
                             help="losses the search may pick (comma-separated)")
    add_settings_arguments(adapt_train, ClientSettings)
    adapt_train.set_defaults(func=_adapt_train)

    search = commands.add_parser("search", help="the search service").add_subparsers(dest="action", required=True)
    search_serve = search.add_parser("serve", help="run the search gRPC server",
                                     description="Flags override SEARCH_* environment variables.")
    add_settings_arguments(search_serve, SearchSettings)
    search_serve.set_defaults(func=_search_serve)

    web = commands.add_parser("web", help="the web gateway (search page)").add_subparsers(dest="action", required=True)
    web_serve = web.add_parser("serve", help="run the HTTP gateway and its search page",
                               description="Flags override WEB_* environment variables.")
    add_settings_arguments(web_serve, WebSettings)
    web_serve.set_defaults(func=_web_serve)

    index = commands.add_parser("index", help="embed a dataset into a collection people can search (web page)")
    index.add_argument("--dataset", required=True, help="dataset root or list_of_images.txt")
    index.add_argument("--model", default="", help="encoder model id (default: the encoder's default)")
    index.add_argument("--name", help="dataset name in the points' payload (default: the folder's name)")
    index.add_argument("--collection", help="collection name (default: <dataset>__<model>)")
    index.add_argument("--encoder", default="127.0.0.1:50051", help="encoder address")
    index.add_argument("--search", default="127.0.0.1:50052", help="search address")
    index.add_argument("--cache-dir", default=".cache/retrieval/embeddings",
                       help="embedding cache shared with evaluation runs")
    add_settings_arguments(index, ClientSettings)
    index.set_defaults(func=_index)

    up = commands.add_parser("up", help="start encoder, search, evaluator and the web gateway locally until Ctrl-C")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--models", type=_comma_list, default=["efficientnet-lite0"], help="encoder models to preload")
    up.add_argument("--data-dir", default=".cache/retrieval/qdrant", help="Qdrant Edge directory")
    up.add_argument("--log-dir", default=".cache/retrieval/logs")
    up.add_argument("--output", default="reports", help="evaluator report directory")
    up.add_argument("--allowed-roots", type=_comma_list, default=["."], help="where datasets may be read")
    up.add_argument("--auth-token", default=os.environ.get("RETRIEVAL_AUTH_TOKEN"),
                    help="every service requires this bearer token; the evaluator sends it upstream "
                         "[env RETRIEVAL_AUTH_TOKEN]")
    up.add_argument("--tls-cert-file", help="serve TLS with this PEM certificate (with --tls-key-file)")
    up.add_argument("--tls-key-file", help="PEM key of --tls-cert-file")
    up.add_argument("--tls-ca-file", help="PEM CA that signed --tls-cert-file (the evaluator verifies with it)")
    up.add_argument("--web-port", type=int, default=8080, help="the web gateway's HTTP port (search page)")
    up.add_argument("--free-ports", action="store_true",
                    help="pick free ports instead of 50051-50053 (gRPC), 9101-9103 (metrics) and 8080 (web)")
    up.set_defaults(func=_up)

    demo = commands.add_parser("demo", help="benchmark encoders end to end through a fresh local stack")
    demo.add_argument("--dataset", default=os.environ.get("DATASET", ""),
                      help="dataset root [env DATASET; default: scikit-learn's digits]")
    demo.add_argument("--models", type=_comma_list, default=["efficientnet-lite0", "efficientnet-lite2"])
    demo.add_argument("--protocol", choices=sorted(PROTOCOLS), default="leave_one_out")
    demo.add_argument("--catalogue", help="catalogue list (catalogue_query)")
    demo.add_argument("--queries", help="query list (catalogue_query)")
    demo.add_argument("--output", default="reports/demo")
    demo.add_argument("--work-dir", default=".cache/retrieval/demo", help="stack data, logs, embedding cache")
    demo.add_argument("--no-tsne", action="store_true")
    demo.add_argument("--serve", action="store_true",
                      help="keep the stack and the search page up after the benchmark, until Ctrl-C")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
