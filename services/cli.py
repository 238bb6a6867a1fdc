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

import numpy as np


def _encoder_serve(args: argparse.Namespace) -> int:
    from services.common.settings import settings_from_args
    from services.encoder.config import EncoderSettings
    from services.encoder.servicer import serve

    settings = settings_from_args(EncoderSettings, args)
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


def build_parser() -> argparse.ArgumentParser:
    from services.common.settings import add_settings_arguments
    from services.encoder.config import EncoderSettings

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
