"""The text-to-image and composed protocols end to end through the three services, with a tiny
random-initialised OpenCLIP (plumbing only: random weights say nothing about quality). Every figure
the evaluator reports is recomputed here from vectors fetched from the same encoder, with sklearn."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from retrieval.v1 import evaluator_pb2
from sklearn.metrics import average_precision_score

from services.common.clients import EncoderClient
from services.encoder.config import EncoderSettings
from services.encoder.registry import IMAGE, OPENAI_CLIP_STD, TEXT, ModelSpec, Preprocess, Registry
from services.evaluator.protocols import PROMPT_TEMPLATES, TEXT_KS, prompt_name
from tests.evaluator.conftest import start_stack, write_dataset

pytestmark = pytest.mark.slow  # real Caltech-101 images

MODEL = "clip-tiny-random"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def clip_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, object, str]]:
    import open_clip

    work = tmp_path_factory.mktemp("text-stack")
    config = work / "tiny-eval-clip.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    registry = Registry()
    registry.register(ModelSpec(id=MODEL, family="openclip", dim=16,
                                preprocess=Preprocess(resize=64, crop=64, std=OPENAI_CLIP_STD),
                                modalities=(IMAGE, TEXT), weights={"pretrained": ""},
                                params={"arch": "tiny-eval-clip"}, max_text_chars=1000))
    dataset = write_dataset(work / "data", classes=5, per_class=6, seed=21)
    items = [line.split("\t") for line in (dataset / "list_of_images.txt").read_text().splitlines()]
    classes = sorted({c for _, c in items})
    # One composed query per class: an image of that class, "as a <next class>", target the next class.
    first = {c: p for p, c in reversed(items)}
    lines = [f"{first[c]}\tas a {prompt_name(classes[(i + 1) % len(classes)])}\t{classes[(i + 1) % len(classes)]}"
             for i, c in enumerate(classes)]
    (dataset / "composed_queries.txt").write_text("\n".join(lines) + "\n")
    encoder = EncoderSettings(port=0, metrics_port=-1, models=[MODEL], default_model=MODEL, random_weights=True,
                              backend="torch")
    for stack in start_stack(work, [dataset], encoder_settings=encoder, registry=registry):
        yield dataset, f"127.0.0.1:{stack.encoder.port}", stack.stub, str(stack.settings.output_dir)


def _run(stub: object, **spec: object) -> dict[str, object]:
    request = evaluator_pb2.StartRunRequest(spec=evaluator_pb2.RunSpec(models=[MODEL], tsne=False, **spec))
    run_id = stub.StartRun(request).run_id  # type: ignore[attr-defined]
    final = list(stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=300))[-1].run  # type: ignore
    assert final.state == evaluator_pb2.RUN_STATE_SUCCEEDED, final.error
    report: dict[str, object] = json.loads(Path(final.reports[0]).read_text())
    report["_headline"] = dict(final.metrics)
    return report


def _catalogue(dataset: Path, address: str) -> tuple[list[str], list[str], np.ndarray]:
    items = [line.split("\t") for line in (dataset / "list_of_images.txt").read_text().splitlines()]
    with EncoderClient(address) as client:
        vectors = client.embed_files(dataset, [p for p, _ in items], model=MODEL).vectors
    return [p for p, _ in items], [c for _, c in items], vectors


def test_text_queries_report_map_at_k_and_zero_shot_accuracy(clip_stack: tuple[Path, str, object, str]) -> None:
    dataset, address, stub, _ = clip_stack
    report = _run(stub, dataset=str(dataset), protocol_name="text", run_name="text")
    metrics = report["metrics"]  # type: ignore[index]
    assert report["protocol"] == "text" and metrics["n_queries"] == 5
    assert set(TEXT_KS) <= {int(k) for k in metrics["map_at_k"]}
    _, labels, images = _catalogue(dataset, address)
    classes = sorted(set(labels))
    with EncoderClient(address) as client:
        prompts = client.embed_texts([t.format(prompt_name(c)) for c in classes for t in PROMPT_TEMPLATES],
                                     model=MODEL).vectors.reshape(len(classes), len(PROMPT_TEMPLATES), -1)
    queries = prompts.astype(np.float64).mean(1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.array([classes.index(c) for c in labels])
    aps = [average_precision_score(truth == c, images @ queries[c]) for c in range(len(classes))]
    assert metrics["map"] == pytest.approx(np.mean(aps), abs=1e-5)
    accuracy = float(((images @ queries.T).argmax(1) == truth).mean())
    # The report keeps six decimals: equal to within half of the last one.
    assert metrics["zero_shot_accuracy"] == pytest.approx(accuracy, abs=5e-7)
    assert report["_headline"][f"{MODEL}/zero_shot_accuracy"] == pytest.approx(accuracy)  # type: ignore[index]
    assert report["per_query"]["ids"] == [f"text: {prompt_name(c)}" for c in classes]  # type: ignore[index]


def test_composed_queries_are_composed_alike_by_search_and_evaluator(
        clip_stack: tuple[Path, str, object, str]) -> None:
    dataset, address, stub, _ = clip_stack
    report = _run(stub, dataset=str(dataset), protocol_name="composed", queries="composed_queries.txt",
                  run_name="composed", ks=[1, 5, 10])
    metrics = report["metrics"]  # type: ignore[index]
    assert report["protocol"] == "composed" and metrics["n_queries"] == 5
    # The search service composed each query from the stored reference and the text vector; its
    # exact top-k is the evaluator's (which composed the same vectors in numpy).
    assert all(v == 1.0 for v in report["index"]["recall_at_k"].values()), report["index"]  # type: ignore[index]
    paths, labels, images = _catalogue(dataset, address)
    lines = [line.split("\t") for line in (dataset / "composed_queries.txt").read_text().splitlines()]
    with EncoderClient(address) as client:
        texts = client.embed_texts([text for _, text, _ in lines], model=MODEL).vectors
    aps = []
    for (reference, _, target), text in zip(lines, texts, strict=True):
        r = paths.index(reference)
        v = 0.5 * images[r] / np.linalg.norm(images[r]) + 0.5 * text / np.linalg.norm(text)
        v /= np.linalg.norm(v)
        keep = np.arange(len(paths)) != r  # the reference is not a candidate for its own query
        aps.append(average_precision_score(np.array(labels)[keep] == target, (images @ v)[keep]))
    assert report["per_query"]["ap"] == pytest.approx(aps, abs=1e-5)  # type: ignore[index]


def test_specs_the_protocols_refuse(clip_stack: tuple[Path, str, object, str]) -> None:
    import grpc

    dataset, _, stub, _ = clip_stack
    for spec, message in (({"protocol_name": "composed"}, "needs a queries file"),
                          ({"protocol_name": "text", "queries": "x.txt"}, "class names")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.StartRun(evaluator_pb2.StartRunRequest(  # type: ignore[attr-defined]
                spec=evaluator_pb2.RunSpec(dataset=str(dataset), models=[MODEL], **spec)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
