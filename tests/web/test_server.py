"""The gateway over HTTPS, and how the local stack starts it (token, TLS, roots, reports)."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import trustme

from services.stack import Stack, StackConfig
from services.web.config import WebSettings
from services.web.server import start_in_thread


def test_the_gateway_serves_https(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "w.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "w.crt"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    running = start_in_thread(WebSettings(port=0, allowed_roots=[tmp_path], reports_dir=tmp_path,
                                          tls_cert_file=tmp_path / "w.crt", tls_key_file=tmp_path / "w.key"))
    try:
        assert running.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(tmp_path / "ca.crt")), timeout=30) as client:
            page = client.get(running.url)
        assert page.status_code == 200 and "Image retrieval" in page.text
    finally:
        running.stop()


def test_the_stack_starts_the_gateway_with_its_token_tls_roots_and_reports(tmp_path: Path) -> None:
    config = StackConfig(allowed_roots=(tmp_path / "data",), output_dir=tmp_path / "reports", auth_token="t",
                         tls_cert_file=tmp_path / "s.crt", tls_key_file=tmp_path / "s.key",
                         tls_ca_file=tmp_path / "ca.crt", web_port=8123)
    command = Stack(config)._command("web")
    flags = dict(zip(command[5::2], command[6::2], strict=False))
    assert command[2:5] == ["services.cli", "web", "serve"]
    assert flags["--port"] == "8123" and flags["--auth-token"] == "t"
    assert flags["--encoder-address"] == config.address("encoder")
    assert flags["--evaluator-address"] == config.address("evaluator")
    assert flags["--allowed-roots"] == str(tmp_path / "data") and flags["--reports-dir"] == str(tmp_path / "reports")
    assert flags["--service-tls-ca-file"] == str(tmp_path / "ca.crt") and flags["--tls-cert-file"] == str(
        tmp_path / "s.crt")
    assert config.web_url == "https://127.0.0.1:8123/" and config.processes[-1] == "web"
    assert "web" not in StackConfig(web=False).processes
