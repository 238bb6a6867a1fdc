"""benchmarks/encoder_gpu.py runs end to end on a CPU in its dry-run mode (no GPU measurement)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CALTECH101, REPO

pytestmark = pytest.mark.slow


def test_gpu_benchmark_dry_run_reaches_its_result_line(tmp_path: Path) -> None:
    assert (CALTECH101 / "list_of_images.txt").is_file(), f"{CALTECH101} is missing"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "encoder_gpu.py"), "--dry-run", "--onnx-cache-dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "dry run: not a measurement" in lines[0]
    result = dict(field.split("=") for field in lines[-1].removeprefix("RESULT ").split())
    assert lines[-1].startswith("RESULT ") and result["dry_run"] == "yes" and result["target_3000_met"] == "no"
    for label in ("vit_b32", "lite0"):
        assert float(result[f"{label}_img_s"]) > 0 and float(result[f"ort_vs_torch_{label}"]) > 0
    # Both backends of both models were served (no "not served" cell in the table).
    assert "NOT SERVED" not in done.stdout and "| not served" not in done.stdout
