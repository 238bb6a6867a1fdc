"""Web fixtures: a Caltech-101 sample indexed through the in-process services, and the gateway over them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.clients import EncoderClient, SearchClient
from services.evaluator.cache import EmbeddingCache
from services.evaluator.datasets import open_dataset
from services.evaluator.indexing import IndexResult, index_dataset
from services.web.config import WebSettings
from services.web.server import RunningGateway, start_in_thread
from tests.conftest import CALTECH101
from tests.evaluator.conftest import Stack, start_stack, write_dataset

CLASSES, PER_CLASS, SEED = 6, 8, 11
SCREENSHOT_DIRS: list[Path] = []


@dataclass
class WebStack:
    """The three services in this process, the sample indexed in a collection, the gateway in a thread."""

    services: Stack
    dataset: Path
    work: Path
    indexed: IndexResult
    settings: WebSettings
    web: RunningGateway

    @property
    def url(self) -> str:
        return self.web.url

    def gateway_settings(self, **changes: object) -> WebSettings:
        """The gateway's settings with ``changes`` (for a second gateway, e.g. with the encoder down)."""
        return self.settings.model_copy(update={"port": 0, **changes})


def held_out(dataset: Path, per_class: int = 1) -> list[tuple[Path, str]]:
    """Caltech-101 images of the sample's classes that are not in the sample (queries from outside it)."""
    listed = {line.split("\t")[0].rsplit("/", 1)[-1]
              for line in (dataset / "list_of_images.txt").read_text().splitlines() if line}
    classes = sorted({line.split("\t")[1] for line in (dataset / "list_of_images.txt").read_text().splitlines()
                      if line})
    out: list[tuple[Path, str]] = []
    for label in classes:
        lines = [line.split("\t")[0] for line in (CALTECH101 / "list_of_images.txt").read_text().splitlines()
                 if line.endswith(f"\t{label}")]
        fresh = [p for p in sorted(lines) if p.rsplit("/", 1)[-1] not in listed]
        out += [(CALTECH101 / p, label) for p in fresh[:per_class]]
    return out


@pytest.fixture(scope="session")
def web_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    """6 Caltech-101 classes x 8 images indexed with the real EfficientNet-Lite0; the gateway in front."""
    dataset = write_dataset(tmp_path_factory.mktemp("web-caltech"), classes=CLASSES, per_class=PER_CLASS, seed=SEED)
    work = tmp_path_factory.mktemp("web-stack")
    for services in start_stack(work, [dataset]):
        encoder_address = f"127.0.0.1:{services.encoder.port}"
        search_address = f"127.0.0.1:{services.search.port}"
        with EncoderClient(encoder_address) as encoder, SearchClient(search_address) as search:
            indexed = index_dataset(encoder, search, open_dataset(dataset, allowed_roots=[dataset]),
                                    "efficientnet-lite0", cache=EmbeddingCache(work / "cache"))
        settings = WebSettings(port=0, encoder_address=encoder_address, search_address=search_address,
                               evaluator_address=f"127.0.0.1:{services.evaluator.port}", allowed_roots=[dataset],
                               reports_dir=work / "reports", max_upload_bytes=2_000_000,
                               max_upload_pixels=4_000_000)
        web = start_in_thread(settings)
        try:
            yield WebStack(services, dataset, work, indexed, settings, web)
        finally:
            web.stop()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests keep their screenshots: ``$WEB_SCREENSHOTS``, else under pytest's temp dir."""
    folder = (Path(os.environ["WEB_SCREENSHOTS"]) if os.environ.get("WEB_SCREENSHOTS")
              else tmp_path_factory.mktemp("web-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    SCREENSHOT_DIRS.append(folder)
    return folder


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for folder in SCREENSHOT_DIRS:
        shots = sorted(p.name for p in folder.glob("*.png"))
        terminalreporter.write_line(f"web screenshots in {folder}: {', '.join(shots) or 'none'}")


@dataclass
class ClipGateway:
    """A gateway whose encoder has a text tower (CLIP ViT-B/32, random weights: plumbing, not quality)."""

    web: RunningGateway
    collection: str


@pytest.fixture(scope="session")
def clip_gateway(web_stack: WebStack) -> Iterator[ClipGateway]:
    from services.encoder.config import EncoderSettings
    from services.encoder.servicer import create_encoder_server

    # The torch backend: an ONNX export of a random-weights CLIP (at load) would cost more than the tests.
    running, core = create_encoder_server(EncoderSettings(port=0, metrics_port=-1, models=["clip-vit-b-32"],
                                                          default_model="clip-vit-b-32", random_weights=True,
                                                          backend="torch"),
                                          background=False)
    address = f"127.0.0.1:{running.port}"
    try:
        with EncoderClient(address) as encoder, SearchClient(web_stack.settings.search_address) as search:
            indexed = index_dataset(encoder, search, open_dataset(web_stack.dataset, allowed_roots=[web_stack.dataset]),
                                    "clip-vit-b-32")
        web = start_in_thread(web_stack.gateway_settings(encoder_address=address))
        try:
            yield ClipGateway(web, indexed.collection)
        finally:
            web.stop()
    finally:
        running.stop(0)
        core.close()
