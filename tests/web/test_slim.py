"""The web gateway runs without torch (the slim image, like search and the evaluator): it serves its page
and JSON from a child interpreter in which the encoder extra's packages cannot be imported."""

from __future__ import annotations

import textwrap

from tests.deploy.test_slim import _run

SERVE_WEB = textwrap.dedent("""
    import sys, tempfile, urllib.request, json
    from pathlib import Path
    from services.cli import build_parser
    from services.web.config import WebSettings
    from services.web.server import start_in_thread

    build_parser().parse_args(["web", "serve"])
    build_parser().parse_args(["index", "--dataset", "d"])
    with tempfile.TemporaryDirectory() as tmp:
        running = start_in_thread(WebSettings(port=0, allowed_roots=[Path(tmp)], reports_dir=Path(tmp),
                                              encoder_address="127.0.0.1:9", search_address="127.0.0.1:9",
                                              evaluator_address="127.0.0.1:9"))
        with urllib.request.urlopen(running.url) as page:
            assert b"Image retrieval" in page.read()
        with urllib.request.urlopen(running.url + "api/health") as health:
            assert [s["serving"] for s in json.loads(health.read())["services"]] == [False, False, False]
        running.stop()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED_NAMES)
    print("LOADED", loaded)
""")


def test_the_gateway_serves_without_torch() -> None:
    result = _run(SERVE_WEB)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED []" in result.stdout
