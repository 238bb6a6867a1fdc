"""Encoder throughput, torch against ONNX Runtime, side by side in one run on the same real images.

For each backend (``--backend torch`` and ``--backend onnxruntime`` of the encoder):

1. in-process: decode + preprocess + model in the model's batch size, the loop a user would write
   (images/s; decoding in the calling thread);
2. service: a separate `retrieval encoder serve` process, 32 concurrent single-image clients
   (unary EmbedImages) with dynamic batching on (images/s over ``--seconds``).

Prints progress, a table, and last
`RESULT ort_vs_torch_service=<r> ort_vs_torch_inprocess=<r2> service_vs_inprocess=<s> service_img_s=<x>`
where service_vs_inprocess and service_img_s are the ONNX Runtime backend's. Both backends run the
same weights and the same threads settings. On a GPU machine see benchmarks/encoder_gpu.py.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retrieval.v1 import encoder_pb2, encoder_pb2_grpc  # noqa: E402

from services.common.clients import channel, wait_serving  # noqa: E402
from services.encoder.config import EncoderSettings  # noqa: E402
from services.encoder.core import EncoderCore  # noqa: E402
from services.encoder.images import load_tensor  # noqa: E402

DATASET = Path(os.environ.get("RETRIEVAL_SHARED_DIR", ROOT.parent / "shared")) / "datasets" / "caltech101"
BACKENDS = ("torch", "onnxruntime")


def load_images(count: int, seed: int) -> list[bytes]:
    lines = [ln.split("\t")[0] for ln in (DATASET / "list_of_images.txt").read_text().splitlines() if ln.strip()]
    return [(DATASET / p).read_bytes() for p in random.Random(seed).sample(lines, count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tuning(args: argparse.Namespace) -> dict[str, object]:
    """The settings both backends share (0 keeps the service's own default)."""
    return {"max_batch_size": args.model_batch, "decode_workers": args.decode_workers,
            "onnx_threads": args.onnx_threads, "torch_threads": args.torch_threads}


def in_process(images: list[bytes], args: argparse.Namespace, backend: str) -> float:
    """Images/s of decode + preprocess + forward in the model's batch size, decoding in this thread."""
    settings = EncoderSettings(models=[], device=args.device, random_weights=args.random_weights, metrics_port=-1,
                               backend=backend, **_tuning(args))  # type: ignore[arg-type]
    core = EncoderCore(settings)
    runtime = core.runtime(args.model)
    pre = runtime.spec.preprocess
    batch = runtime.max_batch_size
    print(f"      model batch size {batch}, backend {runtime.backend.name} {runtime.backend.provider}", flush=True)
    try:
        def run() -> None:
            for start in range(0, len(images), batch):
                tensors = [load_tensor(d, pre, max_bytes=settings.max_image_bytes, max_pixels=settings.max_pixels)
                           for d in images[start:start + batch]]
                runtime._run_images(tensors)

        run()  # warm-up pass (allocator, caches)
        start = time.perf_counter()
        run()
        return len(images) / (time.perf_counter() - start)
    finally:
        core.close()


class Server:
    """`retrieval encoder serve` in its own process."""

    def __init__(self, args: argparse.Namespace, backend: str) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "services.cli", "encoder", "serve", "--port", str(self.port),
               "--metrics-port", "-1", "--models", args.model, "--default-model", args.model,
               "--device", args.device, "--backend", backend, "--max-batch-delay-ms", str(args.delay_ms),
               "--log-level", "WARNING"]
        for name, value in _tuning(args).items():
            cmd += [f"--{name.replace('_', '-')}", str(value)]
        if args.random_weights:
            cmd.append("--random-weights")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.chan = channel(f"127.0.0.1:{self.port}")
        wait_serving(self.chan, timeout=300)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.chan)
        info = self.stub.GetModel(encoder_pb2.GetModelRequest(model=args.model)).model
        if info.backend != backend:
            raise RuntimeError(f"server runs backend {info.backend!r}, asked for {backend!r}")

    def close(self) -> None:
        self.chan.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def concurrent_clients(server: Server, images: list[bytes], clients: int, seconds: float) -> float:
    """Images/s of ``clients`` threads each sending single-image EmbedImages back to back."""
    count = [0] * clients
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            request = encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=images[i % len(images)])])
            result = server.stub.EmbedImages(request, timeout=120).results[0]
            if result.WhichOneof("result") != "vector":
                errors.append(result.error.message)
            count[k] += 1
            i += clients

    # Warm-up: a few rounds so that every server starts from the same state.
    warm = [threading.Thread(target=lambda: [server.stub.EmbedImages(encoder_pb2.EmbedImagesRequest(
        images=[encoder_pb2.Image(data=images[0])])) for _ in range(2)]) for _ in range(clients)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    start = time.perf_counter()
    stop = start + seconds
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} failed items, e.g. {errors[0]}")
    return sum(count) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-weights", action="store_true", help="random-init weights (speed only)")
    parser.add_argument("--images", type=int, default=256, help="real Caltech-101 images per pass")
    parser.add_argument("--model-batch", type=int, default=0, help="max batch size (0: the server's auto default)")
    parser.add_argument("--decode-workers", type=int, default=0, help="decode threads (0: the server's default)")
    parser.add_argument("--onnx-threads", type=int, default=0, help="ONNX Runtime threads (0: the server's default)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=12.0, help="duration of each concurrent-client run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = load_images(args.images, args.seed)
    mb = sum(map(len, images)) / 1e6
    print(f"{len(images)} Caltech-101 images ({mb:.1f} MB), model {args.model}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; tuning {_tuning(args)}", flush=True)

    inproc: dict[str, float] = {}
    service: dict[str, float] = {}
    steps = 2 * len(BACKENDS)
    for k, backend in enumerate(BACKENDS):
        print(f"[{2 * k + 1}/{steps}] {backend}: in-process decode + preprocess + forward", flush=True)
        inproc[backend] = in_process(images, args, backend)
        print(f"      {inproc[backend]:.1f} images/s", flush=True)
        print(f"[{2 * k + 2}/{steps}] {backend}: service, {args.clients} concurrent single-image clients, "
              f"{args.seconds:.0f} s", flush=True)
        server = Server(args, backend)
        try:
            service[backend] = concurrent_clients(server, images, args.clients, args.seconds)
        finally:
            server.close()
        print(f"      {service[backend]:.1f} images/s", flush=True)

    print()
    print("| backend | in-process, images/s | service, 32 clients, images/s | service / in-process |")
    print("|---|---|---|---|")
    for backend in BACKENDS:
        print(f"| {backend} | {inproc[backend]:.1f} | {service[backend]:.1f} | "
              f"{service[backend] / inproc[backend]:.3f} |")
    ort, base = "onnxruntime", "torch"
    print(f"RESULT ort_vs_torch_service={service[ort] / service[base]:.3f} "
          f"ort_vs_torch_inprocess={inproc[ort] / inproc[base]:.3f} "
          f"service_vs_inprocess={service[ort] / inproc[ort]:.3f} service_img_s={service[ort]:.1f}")


if __name__ == "__main__":
    main()
