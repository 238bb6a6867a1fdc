"""`retrieval index` and `retrieval web serve` as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from services.common.clients import SearchClient
from tests.web.conftest import WebStack

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "services.cli"]


@pytest.mark.slow
def test_index_command_fills_a_collection(web_stack: WebStack, tmp_path: Path) -> None:
    services = web_stack.services
    done = subprocess.run([*CLI, "index", "--dataset", str(web_stack.dataset), "--collection", "from-the-cli",
                           "--encoder", f"127.0.0.1:{services.encoder.port}",
                           "--search", f"127.0.0.1:{services.search.port}", "--cache-dir", str(tmp_path / "c")],
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"indexed 48 images of {web_stack.dataset.name} with efficientnet-lite0 into collection from-the-cli" \
        in done.stdout
    with SearchClient(f"127.0.0.1:{services.search.port}") as search:
        assert search.count("from-the-cli") == 48
        search.delete_collection("from-the-cli")


def test_web_serve_prints_its_address_serves_the_page_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([*CLI, "web", "serve", "--port", "0", "--allowed-roots", str(tmp_path),
                             "--reports-dir", str(tmp_path)], cwd=REPO, env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.search(r"web gateway listening on (http://\S+)", line)
        assert found, line
        with urllib.request.urlopen(found.group(1), timeout=30) as page:
            body = page.read().decode()
        assert "<title>Image retrieval</title>" in body and "/static/app.js" in body
        assert "default-src 'self'" in page.headers["content-security-policy"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
