"""Domain metrics of the encoder (prefix ``encoder_``); labels are bounded: model, modality, stage, backend."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _DeviceMemoryCollector(Collector):
    """CUDA memory allocated and reserved by this process, read at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("encoder_device_memory_bytes",
                                   "Device memory held by the encoder, in bytes.",
                                   labels=["device", "kind"])
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                device = f"cuda:{index}"
                family.add_metric([device, "allocated"], float(torch.cuda.memory_allocated(index)))
                family.add_metric([device, "reserved"], float(torch.cuda.memory_reserved(index)))
        yield family


class EncoderMetrics:
    """The encoder's own series, registered on the server's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram("encoder_batch_size", "Items per model call.",
                                    ["model", "modality"], buckets=BATCH_BUCKETS, registry=registry)
        self.queue_depth = Gauge("encoder_queue_depth",
                                 "Items admitted and not yet embedded (decoding or queued).",
                                 ["model", "modality"], registry=registry)
        self.queue_capacity = Gauge("encoder_queue_capacity", "Most items admitted at once per model.",
                                    registry=registry)
        self.duration = Histogram(
            "encoder_inference_duration_seconds",
            "Seconds per stage: decode (one image: decode, resize, crop), queue (one item's wait "
            "for a batch), forward (one batch on the device, transfer included); backend is the "
            "model's inference backend (torch, onnxruntime).",
            ["model", "stage", "backend"], buckets=SECONDS_BUCKETS, registry=registry)
        self.images = Counter("encoder_images_total",
                              "Images handled, by outcome (ok, error, cancelled: the caller went away first).",
                              ["model", "outcome"], registry=registry)
        self.texts = Counter("encoder_texts_total", "Texts handled, by outcome (ok, error).",
                             ["model", "outcome"], registry=registry)
        self.load_seconds = Gauge("encoder_model_load_seconds",
                                  "Seconds it took to load and warm up the model.", ["model"],
                                  registry=registry)
        self.loaded = Gauge("encoder_model_loaded", "1 when the model is loaded and warm.", ["model"],
                            registry=registry)
        registry.register(_DeviceMemoryCollector())

    def precreate(self, model: str, backend: str, modalities: tuple[str, ...]) -> None:
        """Creates ``model``'s series at zero when it loads. A labelled series otherwise appears at its
        first observation, already holding it, and rate() and histogram_quantile() see no increase
        until a later scrape: the first traffic after a load would not show at all."""
        for modality in modalities:
            self.batch_size.labels(model, modality)
            self.queue_depth.labels(model, modality)
        stages = ("decode", "queue", "forward", *(("forward_text",) if "text" in modalities else ()))
        for stage in stages:
            self.duration.labels(model, stage, backend)
        for outcome in ("ok", "error", "cancelled"):
            self.images.labels(model, outcome)
        if "text" in modalities:
            for outcome in ("ok", "error"):
                self.texts.labels(model, outcome)
