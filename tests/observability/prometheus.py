"""A throwaway Prometheus on loopback for tests (Debian's `prometheus`)."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.stack import free_port
from tests.conftest import require_binary


@contextmanager
def running_prometheus(config_text: str, work: Path) -> Iterator[str]:
    """Starts Prometheus with ``config_text`` (storage and log under ``work``); yields its base URL
    once ``/-/ready`` answers, and stops it afterwards. Fails with the log's tail if it dies."""
    binary = require_binary("prometheus")
    (work / "prometheus.yml").write_text(config_text)
    url = f"http://127.0.0.1:{free_port()}"
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}",
                                 f"--web.listen-address={url.removeprefix('http://')}"], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(log_path.read_text()[-2000:]) from None
                    time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)
