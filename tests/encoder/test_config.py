"""Settings: defaults, ENCODER_* environment variables, flags that win over both."""

from __future__ import annotations

import pytest

from services.cli import build_parser
from services.common.settings import settings_from_args
from services.encoder.config import EncoderSettings


def test_defaults_match_the_documented_ports() -> None:
    settings = EncoderSettings()
    assert (settings.port, settings.metrics_port, settings.models) == (50051, 9101, ["efficientnet-lite0"])


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_MODELS", "efficientnet-lite0, clip-vit-b-32")
    monkeypatch.setenv("ENCODER_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ENCODER_PORT", "7000")
    args = build_parser().parse_args(["encoder", "serve", "--port", "7001", "--max-batch-delay-ms", "2.5",
                                      "--no-load-on-demand", "--device", "cpu"])
    settings = settings_from_args(EncoderSettings, args)
    assert settings.models == ["efficientnet-lite0", "clip-vit-b-32"]
    assert settings.max_batch_size == 16 and settings.port == 7001
    assert settings.max_batch_delay_ms == 2.5 and settings.load_on_demand is False and settings.device == "cpu"


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCODER_MAX_BATCH_SIZE", "-1")
    with pytest.raises(ValueError, match="max_batch_size"):
        EncoderSettings()
