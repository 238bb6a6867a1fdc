"""Encoder throughput, side by side in one run on the same real images.

1. in-process: decode + preprocess + model in batches, the loop a user would write (images/s);
2. service: the same images through a separate `retrieval encoder serve` process over gRPC
   (StreamEmbedImages, batches of --batch images, several messages in flight);
3. 32 concurrent single-image clients (unary EmbedImages) against a server with dynamic batching
   on (max batch --batch) and off (max batch 1).

Prints progress, a table, and last `RESULT service_vs_inprocess=<ratio> batching_speedup=<ratio>
inprocess_img_s=<x> service_img_s=<y>`. On a GPU machine: `--device cuda --model clip-vit-b-32
--random-weights` (speed does not depend on weight values).
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
from collections.abc import Iterator
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


def load_images(count: int, seed: int) -> list[bytes]:
    lines = [ln.split("\t")[0] for ln in (DATASET / "list_of_images.txt").read_text().splitlines() if ln.strip()]
    return [(DATASET / p).read_bytes() for p in random.Random(seed).sample(lines, count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_process(images: list[bytes], args: argparse.Namespace) -> float:
    """Images/s of decode + preprocess + forward in the model's batch size, decoding in this thread."""
    settings = EncoderSettings(models=[], device=args.device, random_weights=args.random_weights,
                               metrics_port=-1, max_batch_size=args.model_batch)
    core = EncoderCore(settings)
    runtime = core.runtime(args.model)
    pre = runtime.spec.preprocess
    batch = runtime.max_batch_size
    print(f"      model batch size {batch}", flush=True)
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

    def __init__(self, args: argparse.Namespace, max_batch_size: int) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "services.cli", "encoder", "serve", "--port", str(self.port),
               "--metrics-port", "-1", "--models", args.model, "--default-model", args.model,
               "--device", args.device, "--max-batch-size", str(max_batch_size),
               "--max-batch-delay-ms", str(args.delay_ms), "--log-level", "WARNING"]
        if args.random_weights:
            cmd.append("--random-weights")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.chan = channel(f"127.0.0.1:{self.port}")
        wait_serving(self.chan, timeout=300)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.chan)

    def close(self) -> None:
        self.chan.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def service_stream(server: Server, images: list[bytes], batch: int) -> float:
    def requests() -> Iterator[encoder_pb2.StreamEmbedImagesRequest]:
        for start in range(0, len(images), batch):
            yield encoder_pb2.StreamEmbedImagesRequest(
                images=[encoder_pb2.Image(data=d, id=str(start + i))
                        for i, d in enumerate(images[start:start + batch])])

    def run() -> int:
        return sum(len(r.results) for r in server.stub.StreamEmbedImages(requests()))

    run()
    start = time.perf_counter()
    done = run()
    elapsed = time.perf_counter() - start
    if done != len(images):
        raise RuntimeError(f"stream returned {done} results for {len(images)} images")
    return len(images) / elapsed


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

    # Warm-up: a few rounds so both servers start from the same state.
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
    parser.add_argument("--batch", type=int, default=32, help="images per streamed request message")
    parser.add_argument("--model-batch", type=int, default=0,
                        help="model batch size with batching on (0: the server's auto default)")
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=12.0, help="duration of each concurrent-client run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    images = load_images(args.images, args.seed)
    mb = sum(map(len, images)) / 1e6
    print(f"{len(images)} Caltech-101 images ({mb:.1f} MB), model {args.model}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs", flush=True)

    print("[1/4] in-process: decode + preprocess + forward", flush=True)
    inproc = in_process(images, args)
    print(f"      {inproc:.1f} images/s", flush=True)

    print("[2/4] service over gRPC (StreamEmbedImages), batching on", flush=True)
    server = Server(args, max_batch_size=args.model_batch)
    try:
        service = service_stream(server, images, args.batch)
        print(f"      {service:.1f} images/s", flush=True)
        print(f"[3/4] {args.clients} concurrent single-image clients, batching on (max {args.model_batch or 'auto'}), "
              f"{args.seconds:.0f} s", flush=True)
        on = concurrent_clients(server, images, args.clients, args.seconds)
        print(f"      {on:.1f} images/s", flush=True)
    finally:
        server.close()

    print(f"[4/4] {args.clients} concurrent single-image clients, batching off (max 1), {args.seconds:.0f} s",
          flush=True)
    server = Server(args, max_batch_size=1)
    try:
        off = concurrent_clients(server, images, args.clients, args.seconds)
        print(f"      {off:.1f} images/s", flush=True)
    finally:
        server.close()

    print()
    print(f"| measure | images/s |\n|---|---|\n| in-process (decode included) | {inproc:.1f} |\n"
          f"| service, gRPC stream | {service:.1f} |\n| 32 clients, batching on | {on:.1f} |\n"
          f"| 32 clients, batching off | {off:.1f} |")
    print(f"RESULT service_vs_inprocess={service / inproc:.3f} batching_speedup={on / off:.3f} "
          f"inprocess_img_s={inproc:.1f} service_img_s={service:.1f}")


if __name__ == "__main__":
    main()
