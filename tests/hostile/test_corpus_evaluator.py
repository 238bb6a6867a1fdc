"""Hand-made bad requests to the evaluator (datasets only under one allowed root), each with the code and
message it must get."""

from __future__ import annotations

import base64

import grpc
import pytest
from retrieval.v1 import evaluator_pb2

from tests.hostile.corpus import Bad, check
from tests.hostile.servers import MICRO, Platform
from tests.hostile.wire import length_delimited

C = grpc.StatusCode
V = evaluator_pb2


def _start(**spec: object) -> V.StartRunRequest:
    return V.StartRunRequest(spec=V.RunSpec(**{"models": [MICRO.id], "tsne": False, **spec}))  # type: ignore[arg-type]


def corpus(platform: Platform) -> dict[str, Bad]:
    tiny = str(platform.dataset)
    old_client = length_delimited(1, _start(dataset=tiny).spec.SerializeToString() + length_delimited(7, b"/tmp/x"))
    return {
        "dataset outside the allowed roots": Bad("evaluator.StartRun", (_start(dataset="/etc"),), C.INVALID_ARGUMENT,
                                                 "dataset path '/etc' is outside the allowed roots"),
        "dataset climbing out with '..'": Bad("evaluator.StartRun", (_start(dataset=tiny + "/../../.."),),
                                              C.INVALID_ARGUMENT, "is outside the allowed roots"),
        "dataset that does not exist": Bad("evaluator.StartRun", (_start(dataset=tiny + "/missing"),), C.NOT_FOUND,
                                           "does not exist"),
        "dataset path with a NUL byte": Bad("evaluator.StartRun", (_start(dataset=tiny + "/a\0b"),),
                                            C.INVALID_ARGUMENT, "dataset path"),
        "dataset path too long for the file system": Bad(
            "evaluator.StartRun", (_start(dataset=tiny + "/" + "d" * 5000),), C.INVALID_ARGUMENT, "dataset path"),
        "run_name with '../'": Bad("evaluator.StartRun", (_start(dataset=tiny, run_name="../x"),), C.INVALID_ARGUMENT,
                                   "run spec: run_name '../x' must be 1 to 64 letters"),
        "output_dir from an old client": Bad("evaluator.StartRun", (old_client,), C.INVALID_ARGUMENT,
                                             "output_dir is no longer accepted"),
        "no models": Bad("evaluator.StartRun", (_start(dataset=tiny, models=[]),), C.INVALID_ARGUMENT,
                         "run spec: no models"),
        "a cut-off past the deepest": Bad("evaluator.StartRun", (_start(dataset=tiny, ks=[1, 1001]),),
                                          C.INVALID_ARGUMENT, "run spec: ks must be integers from 1 to 1000"),
        "an unknown protocol": Bad("evaluator.StartRun", (_start(dataset=tiny, protocol=7),), C.INVALID_ARGUMENT,
                                   "run spec: unknown protocol value 7"),
        "a catalogue without queries": Bad("evaluator.StartRun", (_start(dataset=tiny, catalogue="a.txt",
                                                                         protocol=2),),
                                           C.INVALID_ARGUMENT, "give both catalogue and queries lists"),
        "a page_token that was never issued": Bad("evaluator.ListRuns", (V.ListRunsRequest(page_token="garbage"),),
                                                  C.INVALID_ARGUMENT, "page_token is not one this server gave"),
        "a page_token of deeply nested JSON": Bad(
            "evaluator.ListRuns", (V.ListRunsRequest(page_token=base64.urlsafe_b64encode(b"[" * 50_000).decode()),),
            C.INVALID_ARGUMENT, "page_token is not one this server gave"),
        "a page size over the maximum": Bad("evaluator.ListRuns", (V.ListRunsRequest(page_size=1001),),
                                            C.INVALID_ARGUMENT, "page_size 1001 is over the maximum of 1000"),
        "an unknown run": Bad("evaluator.GetRun", (V.GetRunRequest(run_id="nope"),), C.NOT_FOUND, "no run 'nope'"),
        "watching an unknown run": Bad("evaluator.WatchRun", (V.WatchRunRequest(run_id="nope"),), C.NOT_FOUND,
                                       "no run 'nope'"),
        "a run id of 100 KB": Bad("evaluator.GetRun", (V.GetRunRequest(run_id="r" * 100_000),), C.NOT_FOUND, "no run"),
        "cancelling a finished run": Bad("evaluator.CancelRun", (V.CancelRunRequest(run_id=platform.finished_run),),
                                         C.FAILED_PRECONDITION, f"run {platform.finished_run} already succeeded"),
    }


NAMES = ("dataset outside the allowed roots", "dataset climbing out with '..'", "dataset that does not exist",
         "dataset path with a NUL byte", "dataset path too long for the file system", "run_name with '../'",
         "output_dir from an old client", "no models", "a cut-off past the deepest", "an unknown protocol",
         "a catalogue without queries", "a page_token that was never issued", "a page_token of deeply nested JSON",
         "a page size over the maximum", "an unknown run", "watching an unknown run", "a run id of 100 KB",
         "cancelling a finished run")


@pytest.mark.parametrize("name", NAMES)
def test_bad_evaluator_request(name: str, platform: Platform) -> None:
    check(corpus(platform)[name], platform)


def test_every_case_of_the_corpus_runs(platform: Platform) -> None:
    assert sorted(corpus(platform)) == sorted(NAMES)
