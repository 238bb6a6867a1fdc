"""The three services in this process, on port 0, with tiny random-weight models and small limits, so
that every limit path is cheap to reach; search and the evaluator require a bearer token."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image
from retrieval.v1 import evaluator_pb2, evaluator_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.clients import channel, wait_serving
from services.common.server import RunningServer
from services.encoder.config import EncoderSettings
from services.encoder.core import EncoderCore
from services.encoder.registry import IMAGE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TEXT, ModelSpec, Preprocess, Registry
from services.encoder.servicer import create_encoder_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.runs import RunManager
from services.evaluator.servicer import create_evaluator_server
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.servicer import create_search_server
from services.search.store import point_id

SERVICE_TOKEN = "svc-token"  # search's token, which the evaluator also sends to the encoder
EVALUATOR_TOKEN = "eval-token"
REF = "ref"  # the collection the fuzzers only read, checked after them
SCRATCH = "scratch"  # the collection the fuzzers write to
DIM = 8
MAX_MESSAGE = 1 << 20

# DINOv2 of the real family code with 2 x 2 patches: microseconds a forward pass.
MICRO = ModelSpec(id="dinov2-micro", family="dinov2", dim=16, preprocess=Preprocess(resize=32, crop=28),
                  weights={"hub_id": "facebook/dinov2-small"},
                  params={"config": {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}})
# The smallest open_clip architecture: a text tower for EmbedTexts.
CLIP_MICRO = ModelSpec(id="clip-micro", family="openclip", dim=256,
                       preprocess=Preprocess(resize=224, crop=224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
                       modalities=(IMAGE, TEXT), weights={"pretrained": ""}, params={"arch": "ViT-S-32-alt"},
                       max_text_chars=200)
MODELS = (MICRO.id, CLIP_MICRO.id)
NOT_LOADED = "resnet18"  # known to the registry, never loaded (on-demand loading is off)

ENCODER_LIMITS: dict[str, Any] = {"max_images_per_request": 8, "max_texts_per_request": 8,
                                  "max_image_bytes": 256 * 1024, "max_pixels": 4_000_000, "max_aspect_ratio": 50.0,
                                  "max_queue_items": 64}
SEARCH_LIMITS: dict[str, Any] = {"max_upsert_points": 16, "max_upsert_bytes": 64 * 1024, "max_limit": 100,
                                 "max_batch_queries": 8, "max_batch_hits": 200, "max_collections": 6,
                                 "max_delete_ids": 32}
SERVER_LIMITS: dict[str, Any] = {"max_message_bytes": MAX_MESSAGE, "grpc_workers": 8, "max_concurrent_rpcs": 64,
                                 "max_concurrent_streams": 8}


def registry() -> Registry:
    return Registry(entries=(MICRO, CLIP_MICRO, Registry().get(NOT_LOADED)))


def write_dataset(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    """A tiny labelled dataset of generated images with its list_of_images.txt."""
    rng = np.random.default_rng(5)
    lines = []
    for c in range(classes):
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            rel = f"images/c{c}/{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(base + rng.normal(0, 25, (36, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(root / rel)
            lines.append(f"{rel}\tc{c}")
    (root / "list_of_images.txt").write_text("\n".join(lines) + "\n")
    return root


def ref_vectors() -> np.ndarray:
    """The unit vectors stored in the reference collection (seeded)."""
    x = np.random.default_rng(9).standard_normal((40, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_ids() -> list[str]:
    return [point_id("ref-ds", f"p{i}.jpg") for i in range(len(ref_vectors()))]


@dataclass
class Platform:
    """The running services, a channel to each, and what the fuzzers may name (collections, runs)."""

    encoder: RunningServer
    search: RunningServer
    evaluator: RunningServer
    encoder_core: EncoderCore
    search_core: SearchCore
    runs: RunManager
    dataset: Path
    allowed_root: Path
    finished_run: str = ""
    page_token: str = ""
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    @property
    def servers(self) -> dict[str, RunningServer]:
        return {"encoder": self.encoder, "search": self.search, "evaluator": self.evaluator}

    def token(self, server: str) -> str | None:
        return {"encoder": None, "search": SERVICE_TOKEN, "evaluator": EVALUATOR_TOKEN}[server]

    def metadata(self, server: str) -> list[tuple[str, str]]:
        token = self.token(server)
        return [("authorization", f"Bearer {token}")] if token else []

    def close(self) -> None:
        for chan in self.channels.values():
            chan.close()
        for running in (self.evaluator, self.search, self.encoder):
            running.stop(0)
        self.runs.close()
        self.search_core.close()
        self.encoder_core.close()


def _seed_search(chan: grpc.Channel) -> None:
    stub = search_pb2_grpc.SearchServiceStub(chan)
    md = [("authorization", f"Bearer {SERVICE_TOKEN}")]
    for name in (REF, SCRATCH):
        stub.CreateCollection(search_pb2.CreateCollectionRequest(name=name, dim=DIM, model="m", dataset="ref-ds"),
                              metadata=md, timeout=30)
    points = [search_pb2.Point(vector=v.tolist(), payload=search_pb2.Payload(dataset="ref-ds", path=f"p{i}.jpg",
                                                                             labels=[f"c{i % 3}"]))
              for i, v in enumerate(ref_vectors())]
    for name in (REF, SCRATCH):
        acks = list(stub.Upsert(iter([search_pb2.UpsertRequest(collection=name, points=points[:16]),
                                      search_pb2.UpsertRequest(points=points[16:32]),
                                      search_pb2.UpsertRequest(points=points[32:])]), metadata=md, timeout=30))
        assert sum(a.upserted for a in acks) == len(points)
    stub.SetAlias(search_pb2.SetAliasRequest(alias="al", collection=SCRATCH), metadata=md, timeout=30)


def _finished_run(platform: Platform, chan: grpc.Channel) -> None:
    """One run that succeeded (WatchRun, GetRun and CancelRun name it), and a page token of ListRuns."""
    stub = evaluator_pb2_grpc.EvaluatorServiceStub(chan)
    md = [("authorization", f"Bearer {EVALUATOR_TOKEN}")]
    spec = evaluator_pb2.RunSpec(dataset=str(platform.dataset), models=[MICRO.id], tsne=False, ks=[1, 2])
    ids = [stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec), metadata=md, timeout=30).run_id for _ in range(2)]
    for run_id in ids:
        final = [u.run for u in stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), metadata=md,
                                              timeout=300)][-1]
        assert final.state == evaluator_pb2.RUN_STATE_SUCCEEDED, final.error
    platform.finished_run = ids[0]
    platform.page_token = stub.ListRuns(evaluator_pb2.ListRunsRequest(page_size=1), metadata=md,
                                        timeout=30).next_page_token


def start_platform(work: Path) -> Iterator[Platform]:
    """Starts the three services under ``work``, seeds them, and stops them afterwards."""
    encoder, encoder_core = create_encoder_server(
        EncoderSettings(port=0, metrics_port=-1, random_weights=True, models=list(MODELS), default_model=MICRO.id,
                        load_on_demand=False, max_batch_size=8, max_batch_delay_ms=2, decode_workers=2,
                        max_loaded_models=2, **ENCODER_LIMITS, **SERVER_LIMITS),
        registry=registry(), background=False)
    search, search_core = create_search_server(SearchSettings(
        port=0, metrics_port=-1, data_dir=work / "qdrant", auth_token=SERVICE_TOKEN, **SEARCH_LIMITS,
        **SERVER_LIMITS))
    root = work / "datasets"
    dataset = write_dataset(root / "tiny")
    evaluator, runs = create_evaluator_server(EvaluatorSettings(
        port=0, metrics_port=-1, encoder_address=f"127.0.0.1:{encoder.port}",
        search_address=f"127.0.0.1:{search.port}", allowed_roots=[root], output_dir=work / "reports",
        cache_dir=work / "cache", state_dir=work / "runs", service_token=SERVICE_TOKEN, auth_token=EVALUATOR_TOKEN,
        max_concurrent_runs=1, max_runs_kept=50, embed_batch=4, rpc_timeout_seconds=30,
        **SERVER_LIMITS))
    platform = Platform(encoder, search, evaluator, encoder_core, search_core, runs, dataset, root)
    try:
        for name, running in platform.servers.items():
            chan = channel(f"127.0.0.1:{running.port}", max_message_bytes=64 << 20)
            wait_serving(chan, timeout=60)
            platform.channels[name] = chan
        _seed_search(platform.channels["search"])
        _finished_run(platform, platform.channels["evaluator"])
        time.sleep(0.2)
        yield platform
    finally:
        platform.close()
