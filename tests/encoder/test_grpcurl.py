"""What an operator types: grpcurl lists the service through reflection and calls it with JSON."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from services.common.server import RunningServer
from tests.encoder.images import jpeg

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def _grpcurl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run([GRPCURL, "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_reflection_lists_the_encoder_service(real: tuple[RunningServer, object]) -> None:
    running, _ = real
    services = _grpcurl(f"127.0.0.1:{running.port}", "list").split()
    assert "retrieval.v1.EncoderService" in services and "grpc.health.v1.Health" in services
    methods = _grpcurl(f"127.0.0.1:{running.port}", "list", "retrieval.v1.EncoderService").split()
    assert "retrieval.v1.EncoderService.EmbedImages" in methods


def test_json_embed_images_with_a_real_jpeg(real: tuple[RunningServer, object]) -> None:
    running, _ = real
    body = json.dumps({"model": "efficientnet-lite0",
                       "images": [{"id": "cat.jpg", "data": base64.b64encode(jpeg()).decode()}]})
    out = json.loads(_grpcurl("-d", "@", f"127.0.0.1:{running.port}", "retrieval.v1.EncoderService/EmbedImages",
                              stdin=body))
    assert out["model"] == "efficientnet-lite0" and out["dim"] == 1280
    vector = np.asarray(out["results"][0]["vector"]["values"], dtype=np.float64)
    assert out["results"][0]["id"] == "cat.jpg" and vector.shape == (1280,)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
