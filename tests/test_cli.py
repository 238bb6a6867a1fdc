"""The `retrieval` command as a user runs it: the README's job, `up`, serve's exit codes and signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.common.clients import channel, wait_serving
from services.stack import free_port

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "services.cli"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_demo_benchmarks_digits_through_the_stack(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "demo", "--models", "efficientnet-lite0", "--no-tsne", "--output",
                           str(tmp_path / "reports"), "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mAP, leave_one_out on digits (1797 images)" in done.stdout
    row = re.search(r"\| efficientnet-lite0 \| ([0-9.]+) \|", done.stdout)
    assert row is not None and 0.2 < float(row.group(1)) <= 1.0
    report = json.loads((tmp_path / "reports" / "digits__efficientnet-lite0__leave_one_out.json").read_text())
    assert abs(report["metrics"]["map"] - float(row.group(1))) < 1e-4
    assert report["dataset"]["n_classes"] == 10 and report["index"]["recall_at_k"]["1"] == 1.0
    assert (tmp_path / "reports" / "summary.html").is_file()
    # The demo leaves a collection to search on the page (the run's own collections are dropped).
    assert re.search(r"search page: http://\S+/\?c=digits__efficientnet-lite0 \(1797 images", done.stdout)


@pytest.mark.slow
def test_up_starts_three_services_and_the_gateway_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "up", "--free-ports", "--data-dir", str(tmp_path / "q"), "--log-dir",
                             str(tmp_path / "logs"), "--output", str(tmp_path / "r")],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while not any(line.startswith("ready") for line in lines):
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        addresses = dict(re.findall(r"^\s+(\w+)\s+grpc (\S+)", "".join(lines), flags=re.M))
        assert set(addresses) == {"encoder", "search", "evaluator"}
        for address in addresses.values():
            with channel(address) as chan:
                wait_serving(chan, timeout=10)
        web = re.search(r"^\s+web\s+(http://\S+)", "".join(lines), flags=re.M)
        assert web, "".join(lines)
        with urllib.request.urlopen(web.group(1) + "api/health", timeout=30) as health:
            assert all(s["serving"] for s in json.loads(health.read())["services"])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "encoder exit 0, search exit 0, evaluator exit 0, web exit 0" in out
    finally:
        proc.kill()


def test_serve_stops_cleanly_on_sigterm() -> None:
    port = free_port()
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


@pytest.mark.slow
def test_encoder_embed_prints_one_json_line_per_image(tmp_path: Path) -> None:
    from services.encoder.config import EncoderSettings
    from services.encoder.servicer import create_encoder_server
    from tests.encoder.images import jpeg

    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg())
    bad.write_bytes(b"not an image")
    running, core = create_encoder_server(EncoderSettings(port=0, metrics_port=-1), background=False)
    try:
        done = subprocess.run([*CLI, "encoder", "embed", "--address", f"127.0.0.1:{running.port}", str(good), str(bad)],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        running.stop(0)
        core.close()
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1  # one image failed
    assert rows[0]["dim"] == 1280 and abs(rows[0]["norm"] - 1.0) < 1e-5 and rows[0]["id"] == str(good)
    assert rows[1]["code"] == 3 and "image 1 of 2" in rows[1]["error"]
