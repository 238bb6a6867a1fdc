"""TLS and mutual TLS end to end: servers that require client certificates, the typed clients, the
evaluator calling its upstream services, and the CLI (issue 9, defect 13: client channels were always
plaintext, so turning TLS on cut off the evaluator and the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme
from retrieval.v1 import evaluator_pb2

from services.common.clients import ClientTLS, EncoderClient, Endpoint, EvaluatorClient, RetryPolicy
from services.common.errors import ServiceError
from services.encoder.config import EncoderSettings
from services.encoder.servicer import create_encoder_server
from services.evaluator.config import EvaluatorSettings
from services.evaluator.servicer import create_evaluator_server
from services.search.config import SearchSettings
from services.search.servicer import create_search_server
from tests.conftest import REPO
from tests.encoder.images import jpeg
from tests.evaluator.conftest import write_dataset

TOKEN = "tls-t0ken"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca = trustme.CA()
    out = tmp_path_factory.mktemp("pki")
    files = {"ca": out / "ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")), ("client", ca.issue_cert("client"))):
        files[f"{name}.crt"], files[f"{name}.key"] = out / f"{name}.crt", out / f"{name}.key"
        cert.private_key_pem.write_to_path(str(files[f"{name}.key"]))
        with files[f"{name}.crt"].open("wb") as fh:
            for blob in cert.cert_chain_pems:
                fh.write(blob.bytes())
    return files


def _server_tls(pki: dict[str, Path]) -> dict[str, object]:
    return {"tls_cert_file": pki["server.crt"], "tls_key_file": pki["server.key"],
            "tls_client_ca_file": pki["ca"], "auth_token": TOKEN}


def _client_tls(pki: dict[str, Path]) -> ClientTLS:
    return ClientTLS(ca_file=pki["ca"], cert_file=pki["client.crt"], key_file=pki["client.key"])


def test_mutual_tls_admits_only_clients_with_a_certificate(pki: dict[str, Path]) -> None:
    running, core = create_encoder_server(EncoderSettings(port=0, metrics_port=-1, models=["resnet18"],
                                                          default_model="resnet18", random_weights=True,
                                                          **_server_tls(pki)), background=False)
    address = f"127.0.0.1:{running.port}"
    no_retry = RetryPolicy(attempts=1)
    try:
        with EncoderClient(Endpoint(address, token=TOKEN, tls=_client_tls(pki))) as client:
            client.wait_ready(timeout=30)
            embedded = client.embed_images([jpeg()])
            assert embedded.ok.all() and embedded.dim == 512
        for tls in (ClientTLS(ca_file=pki["ca"]), None):  # no client certificate; plaintext
            with EncoderClient(Endpoint(address, token=TOKEN, tls=tls, retry=no_retry, timeout=5)) as client, \
                    pytest.raises(ServiceError) as err:
                client.models()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with EncoderClient(Endpoint(address, tls=_client_tls(pki), retry=no_retry)) as client, \
                pytest.raises(ServiceError) as err:
            client.models()  # a certificate is not a token: both are required
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(0)
        core.close()


@pytest.mark.slow
def test_the_evaluator_and_the_cli_reach_tls_services(pki: dict[str, Path], tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "ds", classes=3, per_class=6, seed=21)
    encoder, encoder_core = create_encoder_server(EncoderSettings(port=0, metrics_port=-1, **_server_tls(pki)),
                                                  background=False)
    search, search_core = create_search_server(SearchSettings(port=0, metrics_port=-1, data_dir=tmp_path / "q",
                                                              **_server_tls(pki)))
    settings = EvaluatorSettings(
        port=0, metrics_port=-1, encoder_address=f"127.0.0.1:{encoder.port}", search_address=f"127.0.0.1:{search.port}",
        allowed_roots=[dataset], output_dir=tmp_path / "reports", cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "runs", service_token=TOKEN, service_tls_ca_file=pki["ca"],
        service_tls_cert_file=pki["client.crt"], service_tls_key_file=pki["client.key"], **_server_tls(pki))
    evaluator, manager = create_evaluator_server(settings)
    try:
        with EvaluatorClient(Endpoint(f"127.0.0.1:{evaluator.port}", token=TOKEN, tls=_client_tls(pki))) as client:
            run_id = client.start_run(evaluator_pb2.RunSpec(dataset=str(dataset), models=["efficientnet-lite0"],
                                                            tsne=False))
            final = list(client.watch(run_id))[-1]
        assert final.state == evaluator_pb2.RUN_STATE_SUCCEEDED, final.error
        assert final.metrics["efficientnet-lite0/map"] > 0
        # The CLI, with the same token and certificates.
        image = tmp_path / "cat.jpg"
        image.write_bytes(jpeg())
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "encoder", "embed", "--address", f"127.0.0.1:{encoder.port}",
             "--token", TOKEN, "--tls-ca-file", str(pki["ca"]), "--tls-cert-file", str(pki["client.crt"]),
             "--tls-key-file", str(pki["client.key"]), str(image)],
            cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.splitlines()[0])["dim"] == 1280
    finally:
        for server in (evaluator, search, encoder):
            server.stop(0)
        manager.close()
        search_core.close()
        encoder_core.close()
