"""gRPC servicer of ``retrieval.v1.EvaluatorService`` over the run manager."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.unknown_fields import UnknownFieldSet
from prometheus_client import CollectorRegistry
from retrieval.v1 import evaluator_pb2, evaluator_pb2_grpc

from services.common.clients import ClientTLS, EncoderClient, Endpoint, SearchClient
from services.common.errors import InvalidArgument
from services.common.server import RunningServer, ServiceRegistration, create_server
from services.evaluator.cache import EmbeddingCache
from services.evaluator.config import EvaluatorSettings
from services.evaluator.datasets import resolve_allowed
from services.evaluator.runner import Runner
from services.evaluator.runs import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    EvaluatorMetrics,
    RunManager,
    RunRecord,
)
from services.evaluator.spec import CATALOGUE_QUERY, LEAVE_ONE_OUT, RunSpec

log = logging.getLogger(__name__)

SERVICE = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"]
_PROTOCOL_IN = {evaluator_pb2.PROTOCOL_UNSPECIFIED: LEAVE_ONE_OUT, evaluator_pb2.PROTOCOL_LEAVE_ONE_OUT: LEAVE_ONE_OUT,
                evaluator_pb2.PROTOCOL_CATALOGUE_QUERY: CATALOGUE_QUERY}
_PROTOCOL_OUT = {LEAVE_ONE_OUT: evaluator_pb2.PROTOCOL_LEAVE_ONE_OUT,
                 CATALOGUE_QUERY: evaluator_pb2.PROTOCOL_CATALOGUE_QUERY}
_STATE = {QUEUED: evaluator_pb2.RUN_STATE_QUEUED, RUNNING: evaluator_pb2.RUN_STATE_RUNNING,
          SUCCEEDED: evaluator_pb2.RUN_STATE_SUCCEEDED, FAILED: evaluator_pb2.RUN_STATE_FAILED,
          CANCELLED: evaluator_pb2.RUN_STATE_CANCELLED}


def spec_from_proto(spec: evaluator_pb2.RunSpec) -> RunSpec:
    """The run spec of a request; an unknown protocol, or a report path (the removed ``output_dir``,
    field 7, sent by an old client), is INVALID_ARGUMENT."""
    if not spec.protocol_name and spec.protocol not in _PROTOCOL_IN:
        raise InvalidArgument(f"run spec: unknown protocol value {spec.protocol}")
    if any(f.field_number == 7 for f in UnknownFieldSet(spec)):  # type: ignore[attr-defined]
        raise InvalidArgument("run spec: output_dir is no longer accepted: the server decides where reports go "
                              "(EVALUATOR_OUTPUT_DIR); name the run with run_name instead")
    return RunSpec(dataset=spec.dataset, models=tuple(spec.models),
                   protocol=spec.protocol_name or _PROTOCOL_IN[spec.protocol],
                   catalogue=spec.catalogue, queries=spec.queries, ks=tuple(spec.ks) or RunSpec.ks,
                   name=spec.dataset_name, tsne=spec.tsne if spec.HasField("tsne") else True,
                   run_name=spec.run_name)


def spec_to_proto(spec: RunSpec) -> evaluator_pb2.RunSpec:
    return evaluator_pb2.RunSpec(dataset=spec.dataset, models=list(spec.models), protocol_name=spec.protocol,
                                 protocol=_PROTOCOL_OUT.get(spec.protocol, evaluator_pb2.PROTOCOL_UNSPECIFIED),
                                 catalogue=spec.catalogue, queries=spec.queries, ks=list(spec.ks),
                                 dataset_name=spec.name, tsne=spec.tsne, run_name=spec.run_name)


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def run_to_proto(record: RunRecord) -> evaluator_pb2.Run:
    return evaluator_pb2.Run(
        id=record.id, spec=spec_to_proto(record.spec), state=_STATE[record.state],
        progress=evaluator_pb2.RunProgress(stage=record.stage, done=record.done, total=record.total,
                                           message=record.message),
        created=_timestamp(record.created), finished=_timestamp(record.finished), metrics=record.metrics,
        reports=list(record.reports), error=record.error)


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    """``EvaluatorService`` over a ``RunManager``; dataset paths must lie under the allowed roots."""

    def __init__(self, manager: RunManager, settings: EvaluatorSettings) -> None:
        self.manager = manager
        self.settings = settings

    def StartRun(self, request: evaluator_pb2.StartRunRequest,
                 context: grpc.ServicerContext) -> evaluator_pb2.StartRunResponse:
        spec = spec_from_proto(request.spec)
        spec.validate()
        resolve_allowed(spec.dataset, self.settings.allowed_roots)  # refuse traversal before queueing
        return evaluator_pb2.StartRunResponse(run_id=self.manager.start(spec).id)

    def WatchRun(self, request: evaluator_pb2.WatchRunRequest,
                 context: grpc.ServicerContext) -> Iterator[evaluator_pb2.WatchRunResponse]:
        for record in self.manager.watch(request.run_id, context.is_active):
            yield evaluator_pb2.WatchRunResponse(run=run_to_proto(record))

    def GetRun(self, request: evaluator_pb2.GetRunRequest,
               context: grpc.ServicerContext) -> evaluator_pb2.GetRunResponse:
        return evaluator_pb2.GetRunResponse(run=run_to_proto(self.manager.get(request.run_id)))

    def ListRuns(self, request: evaluator_pb2.ListRunsRequest,
                 context: grpc.ServicerContext) -> evaluator_pb2.ListRunsResponse:
        runs, token = self.manager.list(request.page_size, request.page_token)
        return evaluator_pb2.ListRunsResponse(runs=[run_to_proto(r) for r in runs], next_page_token=token)

    def CancelRun(self, request: evaluator_pb2.CancelRunRequest,
                  context: grpc.ServicerContext) -> evaluator_pb2.CancelRunResponse:
        return evaluator_pb2.CancelRunResponse(run=run_to_proto(self.manager.cancel(request.run_id)))


def upstream_endpoints(settings: EvaluatorSettings) -> tuple[Endpoint, Endpoint]:
    """How the evaluator reaches the encoder and the search service (token, TLS, deadline)."""
    tls = ClientTLS.from_files(settings.service_tls_ca_file, settings.service_tls_cert_file,
                               settings.service_tls_key_file)
    return tuple(Endpoint(address, token=settings.service_token, tls=tls,  # type: ignore[return-value]
                          timeout=settings.rpc_timeout_seconds)
                 for address in (settings.encoder_address, settings.search_address))


def make_runner(settings: EvaluatorSettings) -> Runner:
    """A runner wired to the encoder and search services named in ``settings``."""
    encoder, search = upstream_endpoints(settings)
    return Runner(EncoderClient(encoder), SearchClient(search), EmbeddingCache(settings.cache_dir),
                  settings.allowed_roots, settings.output_dir, embed_batch=settings.embed_batch,
                  trec_depth=settings.trec_depth)


def create_evaluator_server(settings: EvaluatorSettings) -> tuple[RunningServer, RunManager]:
    """Starts the evaluator server (SERVING at once: it checks the other services when a run starts)."""
    registry = CollectorRegistry()
    manager = RunManager(lambda: make_runner(settings), settings.max_concurrent_runs, EvaluatorMetrics(registry),
                         state_dir=settings.state_dir, max_runs_kept=settings.max_runs_kept,
                         max_queued=settings.max_queued_runs, niceness=settings.work_niceness)
    servicer = EvaluatorServicer(manager, settings)
    running = create_server(settings, [ServiceRegistration(
        SERVICE, lambda srv: evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server(servicer, srv))],
        registry=registry)
    running.set_serving(True)
    return running, manager


def serve(settings: EvaluatorSettings) -> int:
    running, manager = create_evaluator_server(settings)
    print(f"evaluator listening on {settings.host}:{running.port} (metrics :{running.metrics_port})", flush=True)
    try:
        running.wait_for_signal(settings.grace_seconds)
    finally:
        manager.close()
    return 0
