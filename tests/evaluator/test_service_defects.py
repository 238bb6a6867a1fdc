"""Defects of the evaluator service found by a hostile client (issue 9, defects 2, 9, 10 and 11), each
reproduced through the running services. Each failed before its fix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from retrieval.v1 import evaluator_pb2, search_pb2, search_pb2_grpc

from services.common.clients import channel
from tests.evaluator.conftest import Stack, start_stack, write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 Caltech-101 images (12 classes x 50): seconds of embedding on a CPU."""
    return write_dataset(tmp_path_factory.mktemp("big"), classes=12, per_class=50, seed=3)


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("one"), classes=1, per_class=1, seed=4)


@pytest.fixture(scope="module")
def services(dataset: Path, big: Path, one: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(tmp_path_factory.mktemp("defects"), [dataset, big, one], max_concurrent_runs=2)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand (the field no longer exists in the schema)."""
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(data)) + data


def _watch(stack: Stack, run_id: str) -> list[evaluator_pb2.Run]:
    return [u.run for u in stack.stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=600)]


def _start(stack: Stack, spec: evaluator_pb2.RunSpec) -> str:
    return stack.stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec)).run_id  # type: ignore[no-any-return]


def _collections(stack: Stack) -> list[str]:
    with channel(f"127.0.0.1:{stack.search.port}") as chan:
        response = search_pb2_grpc.SearchServiceStub(chan).ListCollections(search_pb2.ListCollectionsRequest())
    return [c.name for c in response.collections]


def test_the_server_decides_where_reports_go(services: Stack, dataset: Path, tmp_path: Path) -> None:
    """A StartRun with an absolute or ../../.. output_dir wrote reports outside every allowed root."""
    spec = evaluator_pb2.RunSpec(dataset=str(dataset), models=["efficientnet-lite0"], tsne=False)
    escape = tmp_path / "escaped"
    # An old client still sending field 7 (output_dir) is refused, never obeyed.
    old_client = spec.SerializeToString() + _field(7, str(escape).encode())
    raw = channel(f"127.0.0.1:{services.evaluator.port}").unary_unary(
        "/retrieval.v1.EvaluatorService/StartRun", request_serializer=None, response_deserializer=None)
    request = _field(1, old_client)
    with pytest.raises(grpc.RpcError) as err:
        raw(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output_dir is no longer accepted" in err.value.details()
    for bad in ("../../escape", "/tmp/x", "a/b", ".hidden"):
        spec.run_name = bad
        with pytest.raises(grpc.RpcError) as err:
            _start(services, spec)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "run_name" in err.value.details()
    spec.run_name = "named-run"
    final = _watch(services, _start(services, spec))[-1]
    assert final.state == evaluator_pb2.RUN_STATE_SUCCEEDED, final.error
    reports = Path(services.settings.output_dir).resolve()
    assert final.reports and all(Path(r).resolve().is_relative_to(reports / "named-run") for r in final.reports)
    assert not escape.exists()
    assert "tsne_png" not in Path(final.reports[0]).read_text()  # tsne=false is honoured (issue 10)


def test_concurrent_runs_of_one_dataset_and_model_do_not_collide(services: Stack, dataset: Path) -> None:
    """Two runs of one dataset and model collided on the collection name (ALREADY_EXISTS, 2 of 2)."""
    spec = evaluator_pb2.RunSpec(dataset=str(dataset), models=["efficientnet-lite0"], tsne=False)
    runs = [_start(services, spec) for _ in range(2)]
    finals = [_watch(services, run_id)[-1] for run_id in runs]
    assert [f.state for f in finals] == [evaluator_pb2.RUN_STATE_SUCCEEDED] * 2, [f.error for f in finals]
    assert finals[0].metrics["efficientnet-lite0/map"] == finals[1].metrics["efficientnet-lite0/map"]
    # Each run dropped its evaluation collection (issue 14, defect 7: they piled up).
    assert not [name for name in _collections(services) if name.startswith("eval__")]


def _images(stack: Stack, outcome: str) -> float:
    labels = {"model": "efficientnet-lite0", "outcome": outcome}
    return stack.encoder.registry.get_sample_value("encoder_images_total", labels) or 0.0


def test_cancelling_a_run_stops_its_embedding(services: Stack, big: Path) -> None:
    """A cancelled run embedded all 600 images before saying CANCELLED."""
    before = _images(services, "ok") + _images(services, "cancelled")
    run_id = _start(services, evaluator_pb2.RunSpec(dataset=str(big), models=["efficientnet-lite0"]))
    for run in services.stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=600):
        if run.run.progress.stage == "embedding" and run.run.progress.done >= 32:
            services.stub.CancelRun(evaluator_pb2.CancelRunRequest(run_id=run_id))
            break
    final = _watch(services, run_id)[-1]
    assert final.state == evaluator_pb2.RUN_STATE_CANCELLED, final.error
    time.sleep(1.0)  # what was in flight settles
    embedded = _images(services, "ok") + _images(services, "cancelled") - before
    ok = _images(services, "ok")
    # At most the client's window (8 messages x 32 images) past the cancel point, never all 600.
    assert embedded <= 32 + 8 * 32 + 32, embedded
    assert ok < before + 600


def test_run_errors_are_sentences_not_grpc_internals(services: Stack, one: Path, dataset: Path) -> None:
    """A 1-image dataset failed with a ``_MultiThreadedRendezvous`` string."""
    spec = evaluator_pb2.RunSpec(dataset=str(one), models=["efficientnet-lite0"])
    final = _watch(services, _start(services, spec))[-1]
    assert final.state == evaluator_pb2.RUN_STATE_FAILED
    assert final.error == f"dataset {one.name!r} has 1 readable image(s); leave-one-out needs at least 2 (each " \
                          "image queries the others)"
    assert "Rendezvous" not in final.error and "debug_error_string" not in final.error
    unknown = _watch(services, _start(services, evaluator_pb2.RunSpec(dataset=str(dataset), models=["nope"])))[-1]
    assert unknown.state == evaluator_pb2.RUN_STATE_FAILED
    assert unknown.error.startswith(f"encoder service at 127.0.0.1:{services.encoder.port}: NOT_FOUND: unknown model "
                                    "'nope'"), unknown.error
