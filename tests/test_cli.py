"""The `retrieval` command as a user runs it: the README's demo, serve's exit codes and signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.client import channel, wait_serving

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "services.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_demo_embeds_sample_photos_and_prints_similarities() -> None:
    done = subprocess.run([*CLI, "demo", "--port", str(_free_port())], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "5 images embedded with efficientnet-lite0 (1280-d" in done.stdout
    table = [line.split() for line in done.stdout.splitlines()]
    rows = {cells[0]: [float(v) for v in cells[1:]] for cells in table
            if len(cells) == 6 and cells[0] in ("cat", "cat-mirrored", "coffee") and cells[1][0].isdigit()}
    assert rows["cat"][0] == pytest.approx(1.0, abs=1e-3)
    assert rows["cat"][1] > rows["cat"][2] + 0.3  # the mirrored cat is far closer than the coffee cup


def test_serve_stops_cleanly_on_sigterm() -> None:
    port = _free_port()
    proc = subprocess.Popen([*CLI, "encoder", "serve", "--port", str(port), "--metrics-port", "-1",
                             "--models", "resnet18", "--default-model", "resnet18", "--random-weights"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with channel(f"127.0.0.1:{port}") as chan:
            wait_serving(chan, timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_serve_exits_non_zero_when_preloaded_weights_are_missing(tmp_path: Path) -> None:
    start = time.monotonic()
    done = subprocess.run([*CLI, "encoder", "serve", "--port", "0", "--metrics-port", "-1", "--models", "resnet18",
                           "--offline"], cwd=REPO, env=_env(TORCH_HOME=str(tmp_path)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "resnet18-f37072fd.pth" in done.stderr and "offline" in done.stderr
    assert time.monotonic() - start < 60
