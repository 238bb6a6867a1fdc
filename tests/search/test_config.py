"""Search settings: defaults, SEARCH_* environment variables, flags of `retrieval search serve`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.cli import build_parser
from services.common.settings import settings_from_args
from services.search.config import SearchSettings


def test_defaults_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = SearchSettings()
    assert (defaults.port, defaults.metrics_port, defaults.backend, defaults.sync_writes) == (50052, 9102, "edge", True)
    monkeypatch.setenv("SEARCH_DATA_DIR", "/tmp/from-env")
    monkeypatch.setenv("SEARCH_PORT", "6000")
    monkeypatch.setenv("SEARCH_HNSW_EF", "200")
    args = build_parser().parse_args(["search", "serve", "--port", "7000", "--no-sync-writes"])
    settings = settings_from_args(SearchSettings, args)
    assert settings.port == 7000 and settings.data_dir == Path("/tmp/from-env") and settings.hnsw_ef == 200
    assert settings.sync_writes is False and args.func.__name__ == "_search_serve"


def test_server_backend_needs_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="backend 'server' needs a url"):
        SearchSettings(backend="server")
    monkeypatch.setenv("SEARCH_BACKEND", "server")
    monkeypatch.setenv("SEARCH_URL", "https://qdrant.example:6333")
    monkeypatch.setenv("SEARCH_API_KEY", "secret")
    settings = SearchSettings()
    assert (settings.url, settings.api_key, settings.prefer_grpc) == ("https://qdrant.example:6333", "secret", True)
    with pytest.raises(ValidationError):
        SearchSettings(backend="faiss")  # type: ignore[arg-type]


def test_unary_threads_follow_the_backend_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # Edge queries are CPU work under this process's GIL: a few threads; a Qdrant server's calls wait
    # on the network: many. A value the operator gives is kept as given.
    assert SearchSettings().grpc_workers == 4
    assert SearchSettings(backend="server", url="http://qdrant:6333").grpc_workers == 64
    assert SearchSettings(grpc_workers=3).grpc_workers == 3
    monkeypatch.setenv("SEARCH_GRPC_WORKERS", "20")
    assert SearchSettings().grpc_workers == 20
