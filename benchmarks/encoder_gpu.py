"""GPU encoder throughput, end to end from JPEG bytes: torch against ONNX Runtime, float16.

For each model (ViT-B/32 with random weights, speed does not depend on their values; EfficientNet-Lite0
with its real weights) and each backend (torch: eager + float16 autocast; onnxruntime: the same
module exported at load, converted to float16, CUDA execution provider with I/O binding), it runs
``--streams`` concurrent client streams (32, 64, 128, 256). Each stream sends one JPEG at a time and
waits for its vector; a dynamic batcher (the service's own ``DynamicBatcher``) gathers the streams'
images into batches of up to ``--max-batch``; each batch is

    decoded on the device (torchvision.io.decode_jpeg(device='cuda'), nvJPEG, batched),
    resized (short side, bicubic, antialiased) and centre-cropped on the device,
    normalised, run by the backend, L2-normalised, and copied to the host as float32.

So the figure is images/s with decode included, the issue's end-to-end target (>= 3,000 img/s for
ViT-B/32 on one H100). The encoder *service* decodes on CPU threads (PIL); this script measures what
the GPU pipeline can do, which is the ceiling a GPU-decoding service would approach.

Last line: `RESULT vit_b32_img_s=<best> vit_b32_backend=<name> lite0_img_s=<best> lite0_backend=<name>
ort_vs_torch_vit_b32=<ratio at the best stream count> ort_vs_torch_lite0=<ratio> target_3000_met=<yes|no>`.

`--dry-run` runs the same code on the CPU with tiny sizes (a two-layer ViT of the real DINOv2 family
in place of ViT-B/32, float32, 2 and 4 streams, CPU JPEG decode): a check that the script works,
not a measurement.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.errors import ServiceError  # noqa: E402
from services.encoder.batching import DynamicBatcher  # noqa: E402
from services.encoder.config import EncoderSettings  # noqa: E402
from services.encoder.core import EncoderCore, ModelRuntime  # noqa: E402
from services.encoder.registry import ModelSpec, Preprocess, Registry  # noqa: E402

DATASET = Path(os.environ.get("RETRIEVAL_SHARED_DIR", ROOT.parent / "shared")) / "datasets" / "caltech101"
BACKENDS = ("torch", "onnxruntime")
# (label, model id, random weights); the real EfficientNet-Lite0 weights ship with the install.
MODELS = (("vit_b32", "clip-vit-b-32", True), ("lite0", "efficientnet-lite0", False))
TINY_VIT = ModelSpec(
    id="vit-tiny", family="dinov2", dim=32, preprocess=Preprocess(resize=64, crop=56),
    weights={"hub_id": "facebook/dinov2-small"},
    params={"config": {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}},
)
DRY_MODELS = (("vit_b32", TINY_VIT.id, True), ("lite0", "efficientnet-lite0", False))


def load_jpegs(count: int, seed: int) -> list[torch.Tensor]:
    """``count`` real Caltech-101 JPEG files as 1-D uint8 tensors (what decode_jpeg takes)."""
    lines = [ln.split("\t")[0] for ln in (DATASET / "list_of_images.txt").read_text().splitlines() if ln.strip()]
    paths = random.Random(seed).sample(lines, count)
    return [torch.frombuffer(bytearray((DATASET / p).read_bytes()), dtype=torch.uint8) for p in paths]


class Pipeline:
    """JPEG bytes to unit vectors on one device: decode, resize, crop, normalise, model, L2."""

    def __init__(self, runtime: ModelRuntime, device: torch.device) -> None:
        from torchvision.transforms import InterpolationMode

        self.runtime = runtime
        self.device = device
        pre = runtime.spec.preprocess
        self.resize, self.crop = pre.resize, pre.crop
        self.interpolation = {"bicubic": InterpolationMode.BICUBIC,
                              "bilinear": InterpolationMode.BILINEAR}.get(pre.interpolation,
                                                                          InterpolationMode.BICUBIC)
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, jpegs: list[torch.Tensor]) -> list[np.ndarray]:
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import functional as F  # noqa: N812

        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
        crops = [F.center_crop(F.resize(img, [self.resize], interpolation=self.interpolation, antialias=True),
                               [self.crop, self.crop]) for img in decoded]
        with torch.inference_mode():
            x = (torch.stack(crops).float() - self.mean) / self.std
            features = self.runtime.forward(x).float()
            vectors = torch.nn.functional.normalize(features, dim=1).cpu().numpy()
        return list(vectors)


@dataclass(frozen=True)
class Run:
    model: str
    backend: str
    streams: int
    images_per_s: float
    mean_batch: float


def measure(pipeline: Pipeline, jpegs: list[torch.Tensor], streams: int, seconds: float, max_batch: int,
            delay_ms: float) -> tuple[float, float]:
    """Images/s and mean batch size of ``streams`` concurrent streams for ``seconds``."""
    sizes: list[int] = []
    batcher: DynamicBatcher[torch.Tensor, np.ndarray] = DynamicBatcher(
        pipeline, max_batch_size=max_batch, max_delay=delay_ms / 1000.0, max_queue=max(4096, 4 * streams),
        name="gpu-bench", on_batch=lambda size, _waits: sizes.append(size))
    done = [0] * streams
    failures: list[BaseException] = []
    stop_at = [0.0]

    def stream(k: int) -> None:
        i = k
        try:
            while time.perf_counter() < stop_at[0]:
                [future] = batcher.submit_many([jpegs[i % len(jpegs)]])
                future.result(timeout=120)
                done[k] += 1
                i += streams
        except BaseException as exc:
            failures.append(exc)

    try:
        stop_at[0] = time.perf_counter() + min(2.0, seconds / 4)  # warm-up: allocator, cuDNN/ORT plans
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done[:] = [0] * streams
        sizes.clear()
        start = time.perf_counter()
        stop_at[0] = start + seconds
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        batcher.close()
    if failures:
        raise RuntimeError(f"{len(failures)} streams failed, e.g. {failures[0]!r}")
    return sum(done) / elapsed, float(np.mean(sizes)) if sizes else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--streams", default="32,64,128,256", help="concurrent streams, comma-separated")
    parser.add_argument("--max-batch", type=int, default=256, help="largest batch the model runs")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="batcher's wait for more items")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per configuration")
    parser.add_argument("--images", type=int, default=512, help="distinct Caltech-101 JPEGs cycled through")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--models", default=",".join(label for label, _, _ in MODELS),
                        help="vit_b32 and/or lite0")
    parser.add_argument("--onnx-cache-dir", default=str(ROOT / ".cache" / "retrieval" / "onnx"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-buckets", action="store_true",
                        help="run every batch at its own size (no padding to warmed-up sizes): the old behaviour")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, float32, tiny ViT, 2 and 4 streams, 1 s: checks the script, measures nothing")
    args = parser.parse_args(argv)
    models = MODELS
    if args.dry_run:
        args.device, args.dtype, args.streams, args.max_batch = "cpu", "float32", "2,4", 4
        args.seconds, args.images = 1.0, 8
        models = DRY_MODELS
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --dry-run to check the script on a CPU")
    stream_counts = [int(s) for s in args.streams.split(",") if s.strip()]
    wanted = {m.strip() for m in args.models.split(",") if m.strip()}
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    jpegs = load_jpegs(args.images, args.seed)

    import onnxruntime as ort

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: not a measurement)"
    print(f"device {name}; torch {torch.__version__}, onnxruntime {ort.__version__} "
          f"({', '.join(ort.get_available_providers())}); dtype {args.dtype}; {len(jpegs)} Caltech-101 JPEGs; "
          f"streams {stream_counts}; max batch {args.max_batch}", flush=True)
    registry = Registry()
    registry.register(TINY_VIT)
    runs: list[Run] = []
    for label, model_id, random_weights in models:
        if label not in wanted:
            continue
        for backend in backends:
            settings = EncoderSettings(models=[], metrics_port=-1, device=args.device, dtype=args.dtype,
                                       backend=backend, random_weights=random_weights,
                                       max_batch_size=args.max_batch,
                                       onnx_cache_dir=Path(args.onnx_cache_dir))  # type: ignore[arg-type]
            core = EncoderCore(settings, registry=registry)
            try:
                start = time.perf_counter()
                what = f"{label} ({model_id}{', random weights' if random_weights else ''}) on {backend}"
                try:
                    runtime = core.runtime(model_id)
                except ServiceError as exc:  # e.g. a parity failure: report it, measure the rest
                    print(f"{what}: NOT SERVED: {exc.message}", flush=True)
                    continue
                steps = "load, ONNX export or cache, parity check" if backend == "onnxruntime" else "load"
                print(f"{what} {runtime.backend.provider}: ready in {time.perf_counter() - start:.1f} s "
                      f"({steps}, warm-up)", flush=True)
                if args.no_buckets:
                    runtime.buckets = []
                pipeline = Pipeline(runtime, device)
                for streams in stream_counts:
                    img_s, mean_batch = measure(pipeline, jpegs, streams, args.seconds, args.max_batch, args.delay_ms)
                    runs.append(Run(label, backend, streams, img_s, mean_batch))
                    print(f"  {streams:>4} streams: {img_s:8.1f} images/s (mean batch {mean_batch:.1f})", flush=True)
                if device.type == "cuda":
                    print(f"  peak device memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
                          "(torch allocations only)", flush=True)
            finally:
                core.close()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)

    print("\n| model | backend | " + " | ".join(f"{s} streams" for s in stream_counts) + " |")
    print("|---|---|" + "---|" * len(stream_counts))
    for label, _, _ in models:
        for backend in backends:
            cells = {r.streams: f"{r.images_per_s:.0f}" for r in runs if r.model == label and r.backend == backend}
            print(f"| {label} | {backend} | " + " | ".join(cells.get(s, "not served") for s in stream_counts) + " |")

    fields: list[str] = []
    for label, _, _ in models:
        mine = [r for r in runs if r.model == label]
        if not mine:
            continue
        best = max(mine, key=lambda r: r.images_per_s)
        fields += [f"{label}_img_s={best.images_per_s:.1f}", f"{label}_backend={best.backend}"]
        at = {r.backend: r.images_per_s for r in mine if r.streams == best.streams}
        if len(at) == 2:
            fields.append(f"ort_vs_torch_{label}={at['onnxruntime'] / at['torch']:.3f}")
    vit = [r.images_per_s for r in runs if r.model == "vit_b32"]
    if vit:
        fields.append(f"target_3000_met={'yes' if max(vit) >= 3000 and not args.dry_run else 'no'}")
    if args.dry_run:
        fields.append("dry_run=yes")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
