"""Web gateway settings (environment prefix ``WEB_``, or the flags of ``retrieval web serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.settings import comma_separated


class WebSettings(BaseSettings):
    """What the HTTP gateway is configured with: where the services are, what it may serve, its limits."""

    model_config = SettingsConfigDict(env_prefix="WEB_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0: pick a free one)")
    encoder_address: str = Field("127.0.0.1:50051", description="encoder service (host:port, or dns:///...)")
    search_address: str = Field("127.0.0.1:50052", description="search service (host:port, or dns:///...)")
    evaluator_address: str = Field("127.0.0.1:50053", description="evaluator service (host:port, or dns:///...)")
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path.cwd()],
        description="images are served only from datasets under these directories (comma-separated), the "
                    "evaluator's rule")
    datasets: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="dataset roots by name, NAME=PATH (comma-separated), for datasets the gateway does not find by "
                    "itself: each allowed root that holds a list_of_images.txt, and those up to two levels below "
                    "it, are known by their folder's name")
    reports_dir: Path = Field(Path("reports"),
                              description="the evaluator's report directory, served read-only")
    auth_token: str | None = Field(
        None, description="when set, every /api and /reports request must carry this bearer token (the services' "
                          "--auth-token); the caller's token is passed on to the services either way")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain; HTTPS is on when set")
    tls_key_file: Path | None = Field(None, description="PEM private key of --tls-cert-file")
    service_tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle to verify the services' certificates (TLS is on towards them when this "
                          "or a client certificate is set)")
    service_tls_cert_file: Path | None = Field(
        None, description="PEM client certificate presented to the services (mutual TLS)")
    service_tls_key_file: Path | None = Field(None, description="PEM key of --service-tls-cert-file")
    service_tls_server_name: str | None = Field(
        None, description="name to check the services' certificates against, when it differs from the address")
    rpc_timeout_seconds: float = Field(30.0, gt=0, description="deadline of each call to a service")
    rpc_attempts: int = Field(
        2, ge=1, description="tries of a call that failed retryably (a person waits for the answer: fail fast)")
    max_upload_bytes: int = Field(16 * 1024 * 1024, gt=0, description="largest uploaded image, in bytes")
    max_upload_pixels: int = Field(40_000_000, gt=0, description="largest uploaded image, width x height")
    max_k: int = Field(500, gt=0, le=1000, description="most results one search may ask for")
    max_text_chars: int = Field(1000, gt=0, description="longest text query, in characters")
    exact_search_max_points: int = Field(
        50_000, ge=0, description="collections up to this size are searched exactly (so a reloaded search gives "
                                  "the same results before and after the index is built)")
    query_cache_size: int = Field(
        1024, ge=0, description="uploaded query vectors remembered, so that a search by upload can be reloaded "
                                "and shared")
    query_cache_seconds: float = Field(86_400.0, gt=0, description="how long an uploaded query is remembered")
    max_label_scan: int = Field(200_000, gt=0, description="most points read to list a collection's labels")
    max_watch_streams: int = Field(16, gt=0, description="run progress streams open at once")
    max_clients: int = Field(32, gt=0, description="sets of service connections kept, one per bearer token")
    log_level: str = Field("INFO", description="logging level")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        return comma_separated(value)

    @field_validator("datasets", mode="before")
    @classmethod
    def _split_datasets(cls, value: object) -> object:
        return comma_separated(value)

    @field_validator("datasets")
    @classmethod
    def _check_datasets(cls, value: list[str]) -> list[str]:
        for entry in value:
            name, sep, path = entry.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"dataset {entry!r}: expected NAME=PATH")
        return value
