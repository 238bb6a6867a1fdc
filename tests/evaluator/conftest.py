"""Evaluator fixtures: a sample of Caltech-101 as a dataset folder, and the three services in-process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from retrieval.v1 import evaluator_pb2_grpc

from services.common.clients import channel, wait_serving
from services.common.server import RunningServer
from services.encoder.config import EncoderSettings
from services.encoder.registry import Registry
from services.encoder.servicer import create_encoder_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.servicer import create_evaluator_server
from services.search.config import SearchSettings
from services.search.core import SearchCore
from services.search.servicer import create_search_server
from tests.conftest import sample_caltech


def write_dataset(root: Path, classes: int, per_class: int, seed: int) -> Path:
    """``classes`` x ``per_class`` Caltech-101 images copied under ``root`` with a list_of_images.txt."""
    lines = []
    for path, label in sample_caltech(classes=classes, per_class=per_class, seed=seed):
        rel = f"images/{label}/{path.name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / rel)
        lines.append(f"{rel}\t{label}")
    (root / "list_of_images.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 Caltech-101 classes x 8 images, copied into a dataset folder with its list_of_images.txt."""
    return write_dataset(tmp_path_factory.mktemp("caltech-sample"), classes=6, per_class=8, seed=11)


@dataclass
class Stack:
    """The three services in this process (real EfficientNet-Lite0, Qdrant Edge), and a stub."""

    settings: EvaluatorSettings
    stub: evaluator_pb2_grpc.EvaluatorServiceStub
    encoder: RunningServer
    search: RunningServer
    search_core: SearchCore
    evaluator: RunningServer


def start_stack(work: Path, allowed: list[Path], encoder_settings: EncoderSettings | None = None,
                registry: Registry | None = None, **evaluator: object) -> Iterator[Stack]:
    """The three services in this process on free ports (the encoder as ``encoder_settings`` say,
    default: the real EfficientNet-Lite0), everything they write under ``work``; stopped after."""
    encoder, encoder_core = create_encoder_server(encoder_settings or EncoderSettings(port=0, metrics_port=-1),
                                                  registry=registry, background=False)
    search, search_core = create_search_server(SearchSettings(port=0, metrics_port=-1, data_dir=work / "qdrant"))
    settings = EvaluatorSettings(port=0, metrics_port=-1, encoder_address=f"127.0.0.1:{encoder.port}",
                                 search_address=f"127.0.0.1:{search.port}", allowed_roots=allowed,
                                 output_dir=work / "reports", cache_dir=work / "cache", state_dir=work / "runs",
                                 **evaluator)  # type: ignore[arg-type]
    running, manager = create_evaluator_server(settings)
    chan = channel(f"127.0.0.1:{running.port}")
    wait_serving(chan, timeout=60)
    try:
        yield Stack(settings, evaluator_pb2_grpc.EvaluatorServiceStub(chan), encoder, search, search_core,
                    running)
    finally:
        chan.close()
        for server in (running, search, encoder):
            server.stop(0)
        manager.close()
        search_core.close()
        encoder_core.close()


@pytest.fixture(scope="module")
def stack(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EvaluatorSettings, object]]:
    for running in start_stack(tmp_path_factory.mktemp("stack"), [dataset]):
        yield running.settings, running.stub
