"""Good requests after the attack: the services must still answer them correctly."""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
from retrieval.v1 import encoder_pb2, encoder_pb2_grpc, evaluator_pb2, evaluator_pb2_grpc, search_pb2, search_pb2_grpc

from tests.encoder.images import jpeg
from tests.hostile.servers import CLIP_MICRO, MICRO, REF, SCRATCH, Platform, ref_ids, ref_vectors

_TERMINAL = (evaluator_pb2.RUN_STATE_SUCCEEDED, evaluator_pb2.RUN_STATE_FAILED, evaluator_pb2.RUN_STATE_CANCELLED)


def unexpected_codes(platform: Platform) -> dict[str, float]:
    """RPCs the servers' own metrics counted as INTERNAL or UNKNOWN, by server/method/code."""
    found = {}
    for name, running in platform.servers.items():
        for metric in running.registry.collect():
            for sample in metric.samples:
                if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_code") in (
                        "INTERNAL", "UNKNOWN") and sample.value > 0:
                    found[f"{name}/{sample.labels['grpc_method']}/{sample.labels['grpc_code']}"] = sample.value
    return found


def _unit(values: list[float], dim: int, what: str) -> list[str]:
    norm = math.sqrt(sum(v * v for v in values))
    return [] if len(values) == dim and abs(norm - 1) < 1e-4 else [f"{what}: {len(values)} values, norm {norm}"]


def encoder_problems(platform: Platform) -> list[str]:
    stub = encoder_pb2_grpc.EncoderServiceStub(platform.channels["encoder"])
    images = [encoder_pb2.Image(data=jpeg(64, 48), id="a"), encoder_pb2.Image(data=jpeg(64, 48), id="b")]
    answer = stub.EmbedImages(encoder_pb2.EmbedImagesRequest(model=MICRO.id, images=images), timeout=30)
    problems = [p for r in answer.results for p in _unit(list(r.vector.values), MICRO.dim, f"image {r.id}")]
    a, b = (np.asarray(r.vector.values) for r in answer.results)
    if not np.allclose(a, b, atol=1e-5):
        problems.append("the same image twice got two different embeddings")
    texts = stub.EmbedTexts(encoder_pb2.EmbedTextsRequest(model=CLIP_MICRO.id, texts=["a photo of a cat"]), timeout=30)
    return problems + _unit(list(texts.results[0].vector.values), CLIP_MICRO.dim, "text")


def search_problems(platform: Platform) -> list[str]:
    stub = search_pb2_grpc.SearchServiceStub(platform.channels["search"])
    md = platform.metadata("search")
    problems = []
    for i, (vector, pid) in enumerate(zip(ref_vectors()[:8], ref_ids()[:8], strict=True)):
        hits = stub.Search(search_pb2.SearchRequest(collection=REF, vector=vector.tolist(), limit=1, exact=True),
                           metadata=md, timeout=30).hits
        if not hits or hits[0].id != pid or abs(hits[0].score - 1) > 1e-4:
            problems.append(f"point {i} of {REF!r} is not its own nearest neighbour: {hits}")
    count = stub.Count(search_pb2.CountRequest(collection=REF), metadata=md, timeout=30).count
    if count != len(ref_ids()):
        problems.append(f"{REF!r} holds {count} points, not {len(ref_ids())}")
    # Room for a new collection, as a client would make it: drop what the attack created.
    for info in stub.ListCollections(search_pb2.ListCollectionsRequest(), metadata=md, timeout=30).collections:
        if info.name not in (REF, SCRATCH):
            for alias in info.aliases:
                stub.DeleteAlias(search_pb2.DeleteAliasRequest(alias=alias), metadata=md, timeout=30)
            stub.DeleteCollection(search_pb2.DeleteCollectionRequest(name=info.name), metadata=md, timeout=30)
    stub.CreateCollection(search_pb2.CreateCollectionRequest(name="after", dim=3), metadata=md, timeout=30)
    points = [search_pb2.Point(vector=v, payload=search_pb2.Payload(dataset="after", path=f"{i}.jpg"))
              for i, v in enumerate(([1, 0, 0], [0, 1, 0], [0, 0, 1]))]
    acks = list(stub.Upsert(iter([search_pb2.UpsertRequest(collection="after", points=points)]), metadata=md,
                            timeout=30))
    hits = stub.Search(search_pb2.SearchRequest(collection="after", vector=[0.1, 0.9, 0.2], limit=3,
                                               with_payload=True), metadata=md,
                       timeout=30).hits
    if [a.upserted for a in acks] != [3] or [h.payload.path for h in hits] != ["1.jpg", "2.jpg", "0.jpg"]:
        problems.append(f"a new collection: acknowledgements {[a.upserted for a in acks]}, hits {hits}")
    stub.DeleteCollection(search_pb2.DeleteCollectionRequest(name="after"), metadata=md, timeout=30)
    return problems


def evaluator_problems(platform: Platform) -> list[str]:
    stub = evaluator_pb2_grpc.EvaluatorServiceStub(platform.channels["evaluator"])
    md = platform.metadata("evaluator")
    runs = _all_runs(stub, md)
    for run in runs:  # the attack's runs still queued or running: cancelled, as their client would
        if run.state not in _TERMINAL:
            try:
                stub.CancelRun(evaluator_pb2.CancelRunRequest(run_id=run.id), metadata=md, timeout=30)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it ended meanwhile
                    raise
    problems = [f"run {run.id} failed with an internal error: {run.error[:300]}" for run in runs
                if run.state == evaluator_pb2.RUN_STATE_FAILED and run.error.startswith("internal error")]
    spec = evaluator_pb2.RunSpec(dataset=str(platform.dataset), models=[MICRO.id], tsne=False, ks=[1, 2])
    run_id = stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec), metadata=md, timeout=30).run_id
    final = [u.run for u in stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), metadata=md, timeout=300)][-1]
    if final.state != evaluator_pb2.RUN_STATE_SUCCEEDED or not 0 <= final.metrics[f"{MICRO.id}/map"] <= 1:
        problems.append(f"a good run ended {evaluator_pb2.RunState.Name(final.state)}: {final.error}")
    return problems


def _all_runs(stub: evaluator_pb2_grpc.EvaluatorServiceStub, md: list[tuple[str, str]]) -> list[evaluator_pb2.Run]:
    runs, token = [], ""
    while True:
        page = stub.ListRuns(evaluator_pb2.ListRunsRequest(page_size=100, page_token=token), metadata=md, timeout=30)
        runs += list(page.runs)
        token = page.next_page_token
        if not token:
            return runs


def good_request_problems(platform: Platform) -> list[str]:
    """What goes wrong with ordinary requests to each service (empty when nothing does)."""
    start = time.monotonic()
    problems = encoder_problems(platform) + search_problems(platform) + evaluator_problems(platform)
    return problems if time.monotonic() - start < 300 else [*problems, "good requests took over 300 s"]
