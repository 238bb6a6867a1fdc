"""The evaluator through the running services: encoder (real EfficientNet-Lite0) + search (Qdrant
Edge) + evaluator, driven over gRPC, checked against a per-query sklearn reference."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from retrieval.v1 import evaluator_pb2
from sklearn.metrics import average_precision_score

from services.evaluator.cache import EmbeddingCache, cache_key
from services.evaluator.config import EvaluatorSettings
from services.evaluator.datasets import check_images, read_list

pytestmark = pytest.mark.slow


def _run(stub: object, spec: evaluator_pb2.RunSpec) -> evaluator_pb2.Run:
    run_id = stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec)).run_id  # type: ignore[attr-defined]
    updates = list(stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=600))  # type: ignore
    # Watchers get the latest state at each wake-up (fast stages may coalesce), ending with the result.
    stages = [u.run.progress.stage for u in updates]
    assert "embedding" in stages and stages[-1] == "report" and len(updates) >= 3
    return updates[-1].run  # type: ignore[no-any-return]


def test_leave_one_out_through_the_services_matches_sklearn(stack: tuple[EvaluatorSettings, object],
                                                            dataset: Path) -> None:
    settings, stub = stack
    spec = evaluator_pb2.RunSpec(dataset=str(dataset), models=["efficientnet-lite0"],
                                 protocol=evaluator_pb2.PROTOCOL_LEAVE_ONE_OUT, ks=[1, 5])
    run = _run(stub, spec)
    assert run.state == evaluator_pb2.RUN_STATE_SUCCEEDED, run.error
    report = json.loads(Path(run.reports[0]).read_text())
    assert report["model"]["weights_sha256"] and report["dataset"]["n_images"] == 48

    # Reference: the cached embeddings (what the encoder service returned), sklearn per query.
    ds = read_list(dataset / "list_of_images.txt", allowed_roots=[dataset])
    key = cache_key(check_images(ds).fingerprint, "efficientnet-lite0", report["model"]["weights_sha256"])
    cached = EmbeddingCache(settings.cache_dir).load(key)
    assert cached is not None and cached.paths == [i.path for i in ds.items]
    labels = np.array([i.labels[0] for i in ds.items])
    scores = cached.vectors @ cached.vectors.T
    aps = []
    for q in range(len(labels)):
        others = np.arange(len(labels)) != q
        aps.append(average_precision_score(labels[others] == labels[q], scores[q, others]))
    assert abs(report["metrics"]["map"] - float(np.mean(aps))) < 1e-6  # report rounds to 6 digits
    assert run.metrics["efficientnet-lite0/map"] == pytest.approx(float(np.mean(aps)), abs=1e-9)
    assert report["metrics"]["map"] > 0.5  # real weights on real photos, 6 classes
    assert report["index"]["recall_at_k"] == {"1": 1.0, "5": 1.0}
    assert len(report["examples"]["best"]) == 5 and len(report["examples"]["best"][0]["top"]) == 5
    out = Path(settings.output_dir)
    for artifact in report["artifacts"].values():
        assert (out / artifact).stat().st_size > 1000

    # A second run reuses the cached embeddings.
    again = json.loads(Path(_run(stub, spec).reports[0]).read_text())
    assert again["model"]["embeddings_cached"] and again["metrics"]["map"] == report["metrics"]["map"]


def test_bad_specs_are_refused_at_start(stack: tuple[EvaluatorSettings, object], dataset: Path) -> None:
    _, stub = stack
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: [
            evaluator_pb2.RunSpec(dataset=str(dataset / ".." / ".."), models=["efficientnet-lite0"]),
            evaluator_pb2.RunSpec(dataset=str(dataset), models=[]),
            evaluator_pb2.RunSpec(dataset=str(dataset), models=["m"], ks=[0]),
        ],
        grpc.StatusCode.NOT_FOUND: [evaluator_pb2.RunSpec(dataset=str(dataset / "nope"), models=["m"])],
    }
    for code, specs in cases.items():
        for spec in specs:
            with pytest.raises(grpc.RpcError) as err:
                stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec))  # type: ignore[attr-defined]
            assert err.value.code() == code, spec
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRun(evaluator_pb2.GetRunRequest(run_id="nope"))  # type: ignore[attr-defined]
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_unknown_model_fails_the_run_with_the_reason(stack: tuple[EvaluatorSettings, object],
                                                        dataset: Path) -> None:
    _, stub = stack
    spec = evaluator_pb2.RunSpec(dataset=str(dataset), models=["no-such-model"])
    run_id = stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec)).run_id  # type: ignore[attr-defined]
    final = list(stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=120))[-1].run  # type: ignore
    assert final.state == evaluator_pb2.RUN_STATE_FAILED and "no-such-model" in final.error
