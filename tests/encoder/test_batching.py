"""The dynamic batcher: batch formation, delay, deadlines, back-pressure."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.encoder.batching import DynamicBatcher
from services.encoder.core import EncoderCore, batch_buckets


class Recorder:
    """run_batch that records batch sizes and can be held to let a queue build up."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.gate.wait(5)
        self.sizes.append(len(items))
        return [i * 10 for i in items]


def test_items_waiting_together_run_as_one_batch_in_order() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = DynamicBatcher(rec, max_batch_size=8, max_delay=0.05, max_queue=100, name="t")
    try:
        first = batcher.submit_many([0])
        time.sleep(0.1)  # the worker holds item 0 at the gate; the rest queue up meanwhile
        rest = batcher.submit_many(list(range(1, 20)))
        rec.gate.set()
        assert [f.result(5) for f in first + rest] == [i * 10 for i in range(20)]
        assert rec.sizes[0] == 1 and rec.sizes[1:] == [8, 8, 3]
    finally:
        batcher.close()


def test_max_batch_size_one_turns_batching_off() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_batch_size=1, max_delay=0.05, max_queue=100, name="t")
    try:
        futures = batcher.submit_many(list(range(6)))
        assert [f.result(5) for f in futures] == [0, 10, 20, 30, 40, 50]
        assert rec.sizes == [1] * 6
    finally:
        batcher.close()


def test_a_lone_item_waits_at_most_max_delay() -> None:
    rec = Recorder()
    batcher = DynamicBatcher(rec, max_batch_size=64, max_delay=0.02, max_queue=100, name="t")
    try:
        start = time.monotonic()
        assert batcher.submit_many([7])[0].result(5) == 70
        assert time.monotonic() - start < 0.5
    finally:
        batcher.close()


def test_expired_items_are_dropped_before_the_model_runs() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = DynamicBatcher(rec, max_batch_size=4, max_delay=0.0, max_queue=100, name="t")
    try:
        blocker = batcher.submit_many([1])
        time.sleep(0.05)
        late = batcher.submit_many([2, 3], deadline=time.monotonic() + 0.01)
        time.sleep(0.05)
        rec.gate.set()
        assert blocker[0].result(5) == 10
        for fut in late:
            with pytest.raises(DeadlineExceeded):
                fut.result(5)
        assert sum(rec.sizes) == 1  # the expired items never reached the model
    finally:
        batcher.close()


def test_full_queue_refuses_the_whole_submission() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = DynamicBatcher(rec, max_batch_size=1, max_delay=0.0, max_queue=3, name="t")
    try:
        held = batcher.submit_many([0])
        time.sleep(0.05)  # item 0 is taken by the worker; the queue is empty again
        batcher.submit_many([1, 2])
        with pytest.raises(ResourceExhausted, match="queue full"):
            batcher.submit_many([3, 4])
        rec.gate.set()
        assert held[0].result(5) == 0
    finally:
        batcher.close()


def test_an_exception_fails_every_item_of_its_batch_only() -> None:
    calls = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if 13 in items:
            raise RuntimeError("boom")
        return items

    batcher = DynamicBatcher(run, max_batch_size=1, max_delay=0.0, max_queue=10, name="t")
    try:
        bad, good = batcher.submit_many([13, 14])
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(5)
        assert good.result(5) == 14
    finally:
        batcher.close()


def test_cuda_batches_run_in_a_few_padded_sizes_and_the_cpu_in_any() -> None:
    # On an H100 each new batch shape cost ~2.4 s of cuDNN planning (Lite0 then served 18-65 img/s):
    # CUDA batches are padded to a handful of sizes, all warmed up at load.
    assert batch_buckets(256, "cuda") == [8, 16, 32, 64, 128, 256]
    assert batch_buckets(32, "cuda") == [8, 16, 32]
    assert batch_buckets(48, "cuda") == [8, 16, 32, 48]
    assert batch_buckets(4, "cuda") == [4]
    assert batch_buckets(256, "cpu") == []


def test_a_padded_batch_gives_each_image_its_own_vector(random_core: EncoderCore) -> None:
    runtime = random_core.runtime("dinov2-tiny")
    seen: list[int] = []
    embed = runtime.backend.embed_images

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return embed(x)

    x = torch.randn(3, 3, 224, 224)
    alone = runtime.forward(x)
    runtime.buckets = [8]  # as on CUDA
    runtime.backend.embed_images = recording  # type: ignore[method-assign]
    try:
        padded = runtime.forward(x)
    finally:
        runtime.buckets = []
        runtime.backend.embed_images = embed  # type: ignore[method-assign]
    assert seen == [8] and padded.shape == alone.shape
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_a_loaded_model_has_its_series_before_any_traffic() -> None:
    # The observability test flaked: encoder_batch_size appeared at its first batch, already holding
    # the traffic, so rate() saw no increase and the batch-size median stayed NaN.
    from prometheus_client import CollectorRegistry

    from services.encoder.config import EncoderSettings
    from tests.encoder.conftest import plumbing_registry

    registry = CollectorRegistry()
    core = EncoderCore(EncoderSettings(random_weights=True, models=[], metrics_port=-1, port=0),
                       registry=plumbing_registry(), metrics_registry=registry)
    try:
        assert registry.get_sample_value("encoder_batch_size_count", {"model": "dinov2-tiny",
                                                                      "modality": "image"}) is None
        runtime = core.runtime("dinov2-tiny")
        labels = {"model": "dinov2-tiny", "modality": "image"}
        assert registry.get_sample_value("encoder_batch_size_count", labels) == 0.0
        assert registry.get_sample_value("encoder_queue_depth", labels) == 0.0
        for outcome in ("ok", "error", "cancelled"):
            assert registry.get_sample_value("encoder_images_total", {"model": "dinov2-tiny", "outcome": outcome}) == 0
        assert registry.get_sample_value("encoder_inference_duration_seconds_count", {
            "model": "dinov2-tiny", "stage": "queue", "backend": runtime.backend.name}) == 0.0
    finally:
        core.close()
