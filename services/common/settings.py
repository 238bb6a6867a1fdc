"""Settings shared by every service, and the bridge from a settings class to CLI flags.

Each service has one pydantic-settings class with its own environment prefix (``ENCODER_``,
``SEARCH_``, ``EVALUATOR_``). Every field is also a command-line flag of that service's ``serve``
subcommand; a flag given on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound=BaseSettings)


class ServerSettings(BaseSettings):
    """What every gRPC server of the platform is configured with."""

    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0: pick a free one)")
    metrics_port: int = Field(
        0, ge=-1, le=65535, description="Prometheus metrics port (0: pick a free one, -1: off)"
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="largest gRPC message accepted or sent, in bytes"
    )
    grpc_workers: int = Field(
        64, gt=0, description="threads running unary RPCs (health checks and streams have their own)")
    max_concurrent_rpcs: int = Field(
        512, gt=0, description="unary RPCs running or waiting for a thread; beyond it new ones get "
                               "RESOURCE_EXHAUSTED with a retry hint")
    max_concurrent_streams: int = Field(
        32, gt=0, description="streaming RPCs at once, each on a thread of its own pool (so idle streams "
                              "never take the unary threads); beyond it RESOURCE_EXHAUSTED with a retry hint")
    max_watch_streams: int = Field(
        256, gt=0, description="open grpc.health.v1 Watch streams (they hold no thread; open to callers "
                               "without a token, as probes are)")
    work_niceness: int = Field(
        5, ge=0, le=19, description="nice value added to the threads that do requests' work (handlers, the "
                                    "encoder's decode and batch threads), so health probes and admission win "
                                    "the CPU when the work saturates it (Linux: per thread; 0: off)")
    grace_seconds: float = Field(10.0, ge=0, description="seconds in-flight RPCs get on SIGTERM")
    max_connection_age_seconds: float = Field(
        300.0, ge=0, description="close client connections after this long (0: never), so that clients "
                                 "re-resolve a headless Service and balance onto new replicas")
    max_connection_age_grace_seconds: float = Field(
        0.0, ge=0, description="how long calls in flight on an aged-out connection may still run (0: until "
                               "they end), so that long streams (WatchRun, bulk ingest) are not cut")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain; TLS is on when set")
    tls_key_file: Path | None = Field(None, description="PEM private key for --tls-cert-file")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)")
    auth_token: str | None = Field(
        None, description="when set, every RPC but health and reflection must carry exactly one "
                          "'authorization: Bearer <token>' header")
    log_level: str = Field("INFO", description="logging level")


def comma_separated(value: object) -> object:
    """A ``"a, b,c"`` string (an environment variable or a flag) as ``["a", "b", "c"]``; anything else
    as given. For list settings, in a ``field_validator(..., mode="before")``."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    """The non-None member of an Optional annotation, else the annotation itself."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else str
    return annotation


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """Adds one flag per settings field (``--max-batch-size`` for ``max_batch_size``).

    Flags default to ``None`` so that only the flags a user gave override the environment.
    List fields take comma-separated values; booleans take ``--flag`` / ``--no-flag``.
    """
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        annotation = _scalar_type(field.annotation)
        env = f"{prefix}{name}".upper()
        help_text = f"{field.description or ''} [env {env}; default {field.default!r}]"
        if annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif typing.get_origin(annotation) in (list, tuple):
            parser.add_argument(_flag(name), dest=name, default=None, metavar="A,B",
                                type=comma_separated,
                                help=help_text)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    """Builds the settings: given flags override environment variables, which override defaults."""
    given = {
        name: getattr(args, name)
        for name in settings_cls.model_fields
        if getattr(args, name, None) is not None
    }
    return settings_cls(**given)


class ClientSettings(BaseSettings):
    """How the ``retrieval`` command reaches running services (environment prefix ``RETRIEVAL_``)."""

    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", extra="ignore", validate_default=True)

    token: str | None = Field(None, description="bearer token sent to the services (their --auth-token)")
    tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle that signed the services' certificates (TLS is on when a TLS file is set)")
    tls_cert_file: Path | None = Field(None, description="PEM client certificate, for servers requiring mutual TLS")
    tls_key_file: Path | None = Field(None, description="PEM key of --tls-cert-file")
    tls_server_name: str | None = Field(
        None, description="name to check the server certificate against, when it differs from the address")
    timeout: float = Field(600.0, gt=0, description="deadline of one call, in seconds")
