"""The aggregated report of two encoders on one dataset, through the running services: intervals,
the paired comparison in words, Markdown tables that a Markdown parser reads as tables; and a
protocol added by registering it (nothing else changes)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from markdown_it import MarkdownIt
from retrieval.v1 import evaluator_pb2

from services.common.clients import SearchClient, TopK
from services.evaluator import metrics as mx
from services.evaluator.config import EvaluatorSettings
from services.evaluator.datasets import Dataset
from services.evaluator.protocols import PROTOCOLS, Embedder, LeaveOneOut, Plan, Relevance, Side, register
from services.evaluator.reports import aggregate, load_reports
from tests.conftest import REPO

pytestmark = pytest.mark.slow

MODELS = ["efficientnet-lite0", "efficientnet-lite2"]


def _run(stub: object, spec: evaluator_pb2.RunSpec) -> evaluator_pb2.Run:
    run_id = stub.StartRun(evaluator_pb2.StartRunRequest(spec=spec)).run_id  # type: ignore[attr-defined]
    final = list(stub.WatchRun(evaluator_pb2.WatchRunRequest(run_id=run_id), timeout=600))[-1].run  # type: ignore
    assert final.state == evaluator_pb2.RUN_STATE_SUCCEEDED, final.error
    return final  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def two_encoders(stack: tuple[EvaluatorSettings, object], dataset: Path) -> Path:
    settings, stub = stack
    _run(stub, evaluator_pb2.RunSpec(dataset=str(dataset), models=MODELS, tsne=False, run_name="two"))
    return Path(settings.output_dir) / "two"


def test_summary_states_intervals_and_the_paired_difference(two_encoders: Path) -> None:
    md_path, html_path = aggregate(two_encoders)
    md = md_path.read_text()
    for model in MODELS:
        assert re.search(rf"^\| {model} \| 0\.\d{{4}} \[0\.\d{{4}}, 0\.\d{{4}}\] \|", md, re.M), model
    sentence = re.search(r"^- (efficientnet-lite[02]) \u2212 (efficientnet-lite[02]): \+\d\.\d{3} mAP "
                         r"\[[+\u2212]\d\.\d{3}, [+\u2212]\d\.\d{3}\], p (<|=) \d\.\d{3} \(48 paired queries\)$",
                         md, re.M)
    assert sentence is not None and sentence.group(1) != sentence.group(2), md
    # The same text on a second aggregation: every interval and test is seeded.
    assert aggregate(two_encoders)[0].read_text() == md
    assert "<table>" in html_path.read_text()
    # `retrieval eval compare` prints the intervals and the comparison.
    done = subprocess.run([sys.executable, "-m", "services.cli", "eval", "compare", str(two_encoders)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sentence.group(0)[2:] in done.stdout
    assert re.search(r"efficientnet-lite0: mAP 0\.\d{4} \[0\.\d{4}, 0\.\d{4}\]", done.stdout)


def test_every_markdown_table_parses_as_a_table(two_encoders: Path) -> None:
    """summary.md had a table with 14 header columns and 13 separator columns: not a table at all."""
    md = aggregate(two_encoders)[0].read_text()
    tokens = MarkdownIt("commonmark").enable("table").parse(md)
    separators = [line for line in md.splitlines() if re.fullmatch(r"\|(\s*-+\s*\|)+", line)]
    assert sum(t.type == "table_open" for t in tokens) == len(separators) >= 3
    widths: list[int] = []
    for token in tokens:
        if token.type == "tr_open":
            widths.append(0)
        elif token.type in ("th_open", "td_open"):
            widths[-1] += 1
        elif token.type == "table_close":
            assert len(set(widths)) == 1, widths
            widths = []


class FirstHalfQueries(LeaveOneOut):
    """A protocol of the test only: the first half of the images query the whole set, themselves
    excluded. It reuses leave-one-out's dataset reading and differs in who queries."""

    name = "first_half_test"
    description = "the first half of the images against all of them"

    def embed_queries(self, embedder: Embedder, plan: Plan, catalogue: Side, model: str) -> Side:
        half = len(catalogue.dataset) // 2
        items = Dataset(catalogue.dataset.name, catalogue.dataset.root, catalogue.dataset.items[:half])
        return Side(items, catalogue.checked, catalogue.vectors[:half], [], 0.0, catalogue.cached)

    def relevance(self, catalogue: Side, queries: Side) -> Relevance:
        full = super().relevance(catalogue, catalogue)
        n = len(queries.dataset)
        return Relevance(full.classes, full.query_labels[:n], full.catalogue_labels,
                         None if full.exclude is None else full.exclude[:n])

    def top_k(self, search: SearchClient, collection: str, catalogue_ids: Sequence[str], queries: Side,
              depth: int, progress: mx.Progress) -> TopK:
        return search.top_k(collection, depth, point_ids=catalogue_ids[: len(queries.dataset)], progress=progress)

    def exact(self, catalogue: Side, queries: Side, relevance: Relevance, ks: Sequence[int], top_k: int,
              progress: mx.Progress) -> mx.RetrievalMetrics:
        return mx.catalogue_query(queries.vectors, relevance.query_labels, catalogue.vectors,
                                  relevance.catalogue_labels, exclude=relevance.exclude, ks=ks, top_k=top_k,
                                  class_names=relevance.classes, progress=progress)


def test_a_protocol_is_added_by_registering_it(stack: tuple[EvaluatorSettings, object], dataset: Path) -> None:
    settings, stub = stack
    register(FirstHalfQueries())
    try:
        base = evaluator_pb2.RunSpec(dataset=str(dataset), models=["efficientnet-lite0"], tsne=False)
        loo = _run(stub, evaluator_pb2.RunSpec(**{**_fields(base), "run_name": "loo"}))
        half = _run(stub, evaluator_pb2.RunSpec(**{**_fields(base), "run_name": "half",
                                                   "protocol_name": "first_half_test"}))
    finally:
        del PROTOCOLS["first_half_test"]
    [loo_report] = load_reports(Path(settings.output_dir) / "loo")
    [half_report] = load_reports(Path(settings.output_dir) / "half")
    assert half_report["protocol"] == "first_half_test" and half_report["metrics"]["n_queries"] == 24
    # Each of those 24 queries has the AP it has in leave-one-out: same catalogue, same exclusion.
    loo_ap = dict(zip(loo_report["per_query"]["ids"], loo_report["per_query"]["ap"], strict=True))
    expected = np.mean([loo_ap[q] for q in half_report["per_query"]["ids"]])
    assert half.metrics["efficientnet-lite0/map"] == pytest.approx(expected, abs=1e-6)
    assert loo.metrics["efficientnet-lite0/map"] == pytest.approx(loo_report["metrics"]["map"], abs=1e-6)


def _fields(spec: evaluator_pb2.RunSpec) -> dict[str, object]:
    return {f.name: v for f, v in spec.ListFields()}
