"""``adapt train`` through the encoder service on a catalogue/query split of real images: no query
image is ever opened, training does not change when the queries are gone, and the adapter is then
served as a model, evaluated by the evaluator beside its base, and reported with the paired comparison."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from retrieval.v1 import evaluator_pb2

from services.adapters.command import TrainRequest, train
from services.adapters.search import SearchSettings
from services.common.adapters import CARD_FILE, HEAD_FILE
from services.common.clients import Endpoint
from services.encoder.config import EncoderSettings
from services.evaluator.reports import aggregate
from tests.evaluator.conftest import start_stack, write_dataset

pytestmark = pytest.mark.slow  # real weights, real images

SETTINGS = SearchSettings(budget_seconds=600, max_trials=2, max_epochs=6, patience=3, validation_fraction=0.25)


def _split(root: Path) -> tuple[list[str], list[str]]:
    """8 catalogue and 4 query images per class: split_train.txt and split_test.txt."""
    by_class: dict[str, list[str]] = {}
    for line in (root / "list_of_images.txt").read_text().splitlines():
        path, label = line.split("\t")
        by_class.setdefault(label, []).append(path)
    catalogue = [p for ps in by_class.values() for p in ps[:8]]
    queries = [p for ps in by_class.values() for p in ps[8:]]
    (root / "split_train.txt").write_text("\n".join(catalogue) + "\n")
    (root / "split_test.txt").write_text("\n".join(queries) + "\n")
    return catalogue, queries


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("adapters-e2e")
    dataset = write_dataset(work / "data", classes=4, per_class=12, seed=31)
    catalogue, queries = _split(dataset)
    encoder = EncoderSettings(port=0, metrics_port=-1, models=["efficientnet-lite0"], adapters_dir=work / "adapters",
                              backend="torch")
    for stack in start_stack(work, [dataset], encoder_settings=encoder):
        yield {"work": work, "dataset": dataset, "catalogue": catalogue, "queries": queries,
               "encoder": f"127.0.0.1:{stack.encoder.port}", "stub": stack.stub, "settings": stack.settings}


def _request(world: dict[str, object], dataset: Path, out: Path) -> TrainRequest:
    return TrainRequest(dataset=dataset, catalogue="split_train.txt", encoder="efficientnet-lite0", out=out,
                        encoder_endpoint=Endpoint(str(world["encoder"])), cache_dir=Path(str(world["work"])) / "cache",
                        settings=SETTINGS)


@pytest.fixture(scope="module")
def trained(world: dict[str, object]) -> Path:
    """The adapter, trained through the encoder service while every image read is recorded."""
    dataset = Path(str(world["dataset"]))
    out = Path(str(world["work"])) / "adapters" / "sample"
    opened: list[str] = []
    original = Path.read_bytes

    def spy(self: Path) -> bytes:
        opened.append(str(self))
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "read_bytes", spy)
        result = train(_request(world, dataset, out))
    catalogue, queries = world["catalogue"], world["queries"]
    assert result.card["training"]["dataset"]["embeddings"] == "encoder service"
    assert {str(dataset / p) for p in catalogue} <= set(opened)  # type: ignore[attr-defined]
    assert not {str(dataset / p) for p in queries} & set(opened)  # type: ignore[attr-defined]
    return out


def test_training_does_not_change_without_the_queries(world: dict[str, object], trained: Path) -> None:
    """The same catalogue in a copy of the dataset whose query images, query list and query lines
    are gone: the same catalogue fingerprint (the evaluator's cached embeddings are found), and the
    same head, byte for byte."""
    dataset = Path(str(world["dataset"]))
    copy = Path(str(world["work"])) / "no-queries"
    shutil.copytree(dataset, copy)
    queries = set(world["queries"])  # type: ignore[call-overload]
    for path in queries:
        (copy / path).unlink()
    (copy / "split_test.txt").unlink()
    lines = (copy / "list_of_images.txt").read_text().splitlines()
    (copy / "list_of_images.txt").write_text("\n".join(x for x in lines if x.split("\t")[0] not in queries) + "\n")
    result = train(_request(world, copy, Path(str(world["work"])) / "other" / "sample"))
    first = json.loads((trained / CARD_FILE).read_text())["training"]
    second = result.card["training"]
    assert second["dataset"]["embeddings"] == "evaluator cache"
    assert second["dataset"]["fingerprint"] == first["dataset"]["fingerprint"]
    assert (result.directory / HEAD_FILE).read_bytes() == (trained / HEAD_FILE).read_bytes()
    assert [t["validation_map"] for t in second["search"]["trials"]] == [
        t["validation_map"] for t in first["search"]["trials"]]
    assert first["validation_curve"] and (trained / "validation_curve.png").is_file()
    assert (trained / "tsne_before_after.png").is_file()


def test_the_adapter_is_served_evaluated_and_reported_beside_its_base(world: dict[str, object],
                                                                      trained: Path) -> None:
    stub = world["stub"]
    spec = evaluator_pb2.RunSpec(dataset=str(world["dataset"]),
                                 models=["efficientnet-lite0", "efficientnet-lite0+sample"],
                                 protocol_name="catalogue_query", catalogue="split_train.txt",
                                 queries="split_test.txt", tsne=True, run_name="adapted")
    run_id = stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec)).run_id  # type: ignore[attr-defined]
    final = list(stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=300))[-1].run  # type: ignore
    assert final.state == evaluator_pb2.RUN_STATE_SUCCEEDED, final.error
    reports = [json.loads(Path(p).read_text()) for p in final.reports]
    adapted = next(r for r in reports if r["model"]["id"] == "efficientnet-lite0+sample")
    card = json.loads((trained / CARD_FILE).read_text())
    assert adapted["model"]["adapter_sha256"] == card["head"]["sha256"]
    assert adapted["model"]["weights_sha256"] == card["base"]["weights_sha256"]
    md = aggregate(Path(str(world["settings"].output_dir)) / "adapted")[0].read_text()  # type: ignore[attr-defined]
    assert "### Adapters against their base models" in md
    assert "- **efficientnet-lite0+sample** (adapter sample" in md
    assert "  - paired: efficientnet-lite0+sample \u2212 efficientnet-lite0: " in md
    assert "| efficientnet-lite0 (before) | efficientnet-lite0+sample (after) |" in md


def test_the_command_trains_from_the_evaluators_cache_alone(world: dict[str, object], trained: Path) -> None:
    """`retrieval adapt train` without an encoder: the embeddings the first training stored in the
    evaluator's cache, the base checksum from the registry."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = Path(str(world["work"])) / "cli" / "from-cache"
    done = subprocess.run([sys.executable, "-m", "services.cli", "adapt", "train", "--dataset", str(world["dataset"]),
                           "--catalogue", "split_train.txt", "--out", str(out), "--cache-dir",
                           str(Path(str(world["work"])) / "cache"), "--max-trials", "2", "--max-epochs", "6",
                           "--validation-fraction", "0.25"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "embeddings from the evaluator cache" in done.stdout
    assert "adapter efficientnet-lite0+from-cache: validation mAP" in done.stdout
    card = json.loads((out / CARD_FILE).read_text())
    assert card["base"]["weights_sha256"] == json.loads((trained / CARD_FILE).read_text())["base"]["weights_sha256"]
    missing = subprocess.run([sys.executable, "-m", "services.cli", "adapt", "train", "--dataset",
                              str(world["dataset"]), "--catalogue", "split_train.txt", "--out", str(out.parent / "x"),
                              "--cache-dir", str(out.parent / "empty-cache")],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "give --encoder-address" in missing.stderr
