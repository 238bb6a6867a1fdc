"""Evaluator settings (environment prefix ``EVALUATOR_``, or the flags of ``retrieval evaluator serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from services.common.settings import ServerSettings, comma_separated


class EvaluatorSettings(ServerSettings):
    """What the evaluator is configured with: where the other services are, where data may come from."""

    model_config = SettingsConfigDict(env_prefix="EVALUATOR_", extra="ignore", validate_default=True)

    port: int = Field(50053, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    metrics_port: int = Field(9103, ge=-1, le=65535,
                              description="Prometheus metrics port (0: pick a free one, -1: off)")
    encoder_address: str = Field("127.0.0.1:50051", description="encoder service (host:port, or dns:///...)")
    search_address: str = Field("127.0.0.1:50052", description="search service (host:port, or dns:///...)")
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.cwd()],
        description="datasets must lie under one of these directories (comma-separated)")
    output_dir: Path = Field(
        Path("reports"), description="where run reports (JSON, Markdown, HTML, PNG) go; the server alone decides "
                                     "(a run may name a sub-folder, never a path)")
    cache_dir: Path = Field(Path(".cache/retrieval/embeddings"),
                            description="embeddings cached by dataset fingerprint and model weights")
    embed_batch: int = Field(32, gt=0, description="images per StreamEmbedImages message")
    max_concurrent_runs: int = Field(1, gt=0, description="runs executed at once; others queue")
    trec_depth: int = Field(
        100, gt=0, description="ranking depth of the TREC run file exported with every report (a depth that "
                               "covers the catalogue lets trec_eval or ranx recompute the full-ranking mAP)")
    max_queued_runs: int = Field(
        100, gt=0, description="runs queued or running at once; beyond it StartRun is RESOURCE_EXHAUSTED")
    max_runs_kept: int = Field(
        1000, gt=0, description="finished runs remembered (ListRuns, GetRun); the oldest are forgotten first")
    state_dir: Path = Field(
        Path(".cache/retrieval/runs"), description="where run records are kept across restarts (a run that was "
                                                   "running when the evaluator stopped is reported FAILED)")
    service_token: str | None = Field(
        None, description="bearer token sent to the encoder and search services (their --auth-token)")
    service_tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle to verify the encoder and search services' TLS certificates (TLS is on "
                          "towards them when this or a client certificate is set)")
    service_tls_cert_file: Path | None = Field(
        None, description="PEM client certificate presented to the encoder and search services (mutual TLS)")
    service_tls_key_file: Path | None = Field(None, description="PEM key of --service-tls-cert-file")
    rpc_timeout_seconds: float = Field(600.0, gt=0, description="deadline of each call to the other services")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        return comma_separated(value)
