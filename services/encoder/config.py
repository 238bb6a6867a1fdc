"""Encoder service settings (environment prefix ``ENCODER_``, or the flags of ``retrieval encoder serve``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.settings import ServerSettings, comma_separated
from services.encoder.registry import DEFAULT_MODEL


class EncoderSettings(ServerSettings):
    """Everything the encoder service is configured with. Sizes in bytes, delays in milliseconds."""

    model_config = SettingsConfigDict(env_prefix="ENCODER_", extra="ignore", validate_default=True)

    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    metrics_port: int = Field(9101, ge=-1, le=65535,
                              description="Prometheus metrics port (0: pick a free one, -1: off)")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = Field("auto", description="'auto' (float16 on CUDA, float32 on CPU), 'float32', "
                                           "'float16' or 'bfloat16'")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        description="models loaded and warmed up before the server reports SERVING (comma-separated)")
    default_model: str = Field(DEFAULT_MODEL, description="model used when a request names none")
    load_on_demand: bool = Field(
        True, description="load a known model that was not preloaded on its first request")
    max_batch_size: int = Field(
        0, ge=0, description="largest batch the model runs (1: batching off; 0: auto, 32 on CUDA and 8 on "
                             "CPU, where larger batches cost more per image)")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, description="longest wait for more items once a batch has its first one, in ms")
    max_queue_items: int = Field(
        2048, gt=0, description="items waiting per model before requests get RESOURCE_EXHAUSTED")
    max_images_per_request: int = Field(512, gt=0, description="images in one EmbedImages request")
    max_texts_per_request: int = Field(1024, gt=0, description="texts in one EmbedTexts request")
    max_image_bytes: int = Field(32 * 1024 * 1024, gt=0, description="largest encoded image, in bytes")
    max_pixels: int = Field(100_000_000, gt=0,
                            description="largest decoded image, width x height (decompression bombs)")
    max_aspect_ratio: float = Field(
        50.0, ge=0, description="images whose longer side is more than this many times the shorter are refused "
                                "(INVALID_ARGUMENT; 0: no limit); the resize work is bounded by the crop either way")
    max_loaded_models: int = Field(
        4, gt=0, description="models loaded at once; loading on demand beyond it is RESOURCE_EXHAUSTED")
    decode_workers: int = Field(0, ge=0, description="threads decoding images (0: one per CPU core)")
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads on CPU (0: torch's default)")
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="inference backend: 'onnxruntime' (the model exported to ONNX at load, cached, "
                            "parity-checked against torch at warm-up), 'torch' (eager), or 'auto': "
                            "onnxruntime on the CPU; on CUDA the faster of the two, measured at load "
                            "(torch when onnxruntime-gpu is not installed)")
    onnx_provider: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="ONNX Runtime execution provider ('auto': CUDA on a CUDA device, else CPU); "
                            "a provider ONNX Runtime cannot enable is an error, never a silent fallback")
    onnx_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads (0: auto, one per CPU core; the decode pool "
                             "shares the cores, see decode_workers)")
    onnx_cache_dir: Path = Field(
        Path(".cache/retrieval/onnx"),
        description="where ONNX exports are cached, keyed by weights SHA-256, opset and torch version "
                    "(random-init models are never cached)")
    weights_dir: Path | None = Field(
        None, description="directory searched first for weights: <dir>/<model-id>.pth (file families) "
                          "or <dir>/<model-id>/ (Hugging Face format)")
    adapters_dir: Path | None = Field(
        None, description="directory of adapters (<dir>/<name>/card.json, head.npz): the model <base>+<name> is "
                          "the base model with that adapter's head, L2-normalised; read on demand, no restart")
    offline: bool = Field(False, description="never download weights (also on when HF_HUB_OFFLINE=1)")
    random_weights: bool = Field(
        False, description="TESTING ONLY: random-initialised weights (reported as weights_source "
                           "'random-init'); for plumbing and speed tests, never for quality")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        return comma_separated(value)

    def effective_max_batch_size(self, device_type: str) -> int:
        """``max_batch_size``, or for 0 the measured sweet spot of the device type.

        On CPUs the model's own per-image cost grows with the batch (2-core x86, EfficientNet-Lite0,
        forward only: 118 img/s at batch 1 and 4, 87 at 8, 64 at 32), while each batch also carries a
        fixed cost (hand-off, stacking, checks); under 32 concurrent clients through the service, 8
        gave the most (78.6 img/s against 69.0 at 4 and 63.8 at 32; benchmarks/encoder.py). On GPUs
        batches are where the throughput comes from.
        """
        if self.max_batch_size:
            return self.max_batch_size
        return 32 if device_type == "cuda" else 8

    def effective_onnx_threads(self) -> int:
        """``onnx_threads``, or for 0 one per CPU core.

        ONNX Runtime's workers do not spin between runs here (``backends.session_options``), so the
        decode pool (one thread per core) uses the cores while a batch is being assembled; measured on
        2 cores with benchmarks/encoder.py (README, "Threads").
        """
        return self.onnx_threads or os.cpu_count() or 1

    def is_offline(self) -> bool:
        """Offline when asked, or when the Hugging Face hub is switched off for the process."""
        return self.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
