"""A real Prometheus scraping a running stack (three processes): the series on-call dashboards and
alerts read are really there, with real values. Prometheus comes from Debian's `prometheus`."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc, evaluator_pb2, evaluator_pb2_grpc, search_pb2, search_pb2_grpc

from services.common.clients import channel
from services.stack import SERVICES, Stack, StackConfig
from tests.conftest import require_binary
from tests.encoder.images import jpeg
from tests.observability.prometheus import running_prometheus

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
pytestmark = pytest.mark.slow


def test_local_scrape_config_is_valid() -> None:
    done = subprocess.run([require_binary("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackConfig]:
    work = tmp_path_factory.mktemp("stack")
    config = StackConfig.on_free_ports(data_dir=work / "qdrant", log_dir=work / "logs", output_dir=work / "reports",
                                       cache_dir=work / "cache", allowed_roots=(work,))
    with Stack(config):
        yield config


@pytest.fixture(scope="module")
def prometheus(stack: StackConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on loopback with the local scrape config, pointed at this stack's ports, 1 s scrapes."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules" / "retrieval.rules.yml")]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{stack.metrics_ports[job['job_name']]}"]}]
    with running_prometheus(yaml.safe_dump(config), work) as url:
        yield url


def _query(url: str, expr: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def _until(url: str, expr: str, ok: object, timeout: float = 30.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        result = _query(url, expr)
        if result and ok(result):  # type: ignore[operator]
            return result
        assert time.monotonic() < deadline, f"{expr} -> {result}"
        time.sleep(0.5)


def _drive_traffic(stack: StackConfig) -> int:
    """32 concurrent single-image clients, a search round trip and an evaluator call; returns images sent."""
    image = jpeg()
    per_client = 4
    with channel(stack.address("encoder")) as chan:
        stub = encoder_pb2_grpc.EncoderServiceStub(chan)

        def client(_: int) -> None:
            for _ in range(per_client):
                stub.EmbedImages(encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=image)]), timeout=60)

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(client, range(32)))
        stub.EmbedImages(encoder_pb2.EmbedImagesRequest(images=[encoder_pb2.Image(data=b"")]), timeout=60)
    with channel(stack.address("search")) as chan:
        search = search_pb2_grpc.SearchServiceStub(chan)
        search.CreateCollection(search_pb2.CreateCollectionRequest(name="obs", dim=4, model="m", dataset="d"))
        search.Upsert(iter([search_pb2.UpsertRequest(collection="obs", points=[search_pb2.Point(
            vector=[1, 0, 0, 0], payload=search_pb2.Payload(dataset="d", path="a.jpg", labels=["x"]))])]))
        search.Search(search_pb2.SearchRequest(collection="obs", vector=[1, 0, 0, 0], limit=1, exact=True))
    with channel(stack.address("evaluator")) as chan:
        evaluator_pb2_grpc.EvaluatorServiceStub(chan).ListRuns(evaluator_pb2.ListRunsRequest())
    return 32 * per_client


def test_prometheus_scrapes_real_values_from_every_service(stack: StackConfig, prometheus: str) -> None:
    up = _until(prometheus, "up", lambda r: len(r) == 3 and all(s["value"][1] == "1" for s in r))
    assert {s["metric"]["job"] for s in up} == set(SERVICES)  # type: ignore[index]
    time.sleep(1.5)  # a scrape before the traffic, so that rate() sees the counters move
    sent = _drive_traffic(stack)

    handled = _until(prometheus, 'sum(grpc_server_handled_total{grpc_service="retrieval.v1.EncoderService",'
                                 'grpc_method="EmbedImages",grpc_code="OK"})',
                     lambda r: float(r[0]["value"][1]) >= sent + 1)
    assert float(handled[0]["value"][1]) == sent + 1  # type: ignore[index]  # the bad image is a per-item error
    # Series exist for codes never seen (pre-created), so rates and alerts work from the start.
    zero = _query(prometheus, 'grpc_server_handled_total{job="search",grpc_method="Delete",grpc_code="INTERNAL"}')
    assert zero and float(zero[0]["value"][1]) == 0.0  # type: ignore[index]
    assert _until(prometheus, 'sum by (job) (grpc_server_handled_total{grpc_code="OK"})', lambda r: len(r) == 3)

    # The batch-size distribution under 32 concurrent clients: median batch above one item.
    median = _until(prometheus, "histogram_quantile(0.5, sum by (le) (rate(encoder_batch_size_bucket[1m])))",
                    lambda r: r[0]["value"][1] not in ("NaN", "+Inf"))
    assert 0.0 < float(median[0]["value"][1]) <= 8.0  # type: ignore[index]  # CPU auto max batch is 8
    items = _query(prometheus, 'sum(encoder_images_total{outcome="ok"})')
    assert float(items[0]["value"][1]) >= sent  # type: ignore[index]
    # Recording rules evaluate over the scraped series.
    assert _until(prometheus, "job_grpc_service:grpc_server_handled:rate5m", lambda r: len(r) >= 3)
