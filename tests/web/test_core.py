"""The gateway's pure parts: queries, near-duplicate hiding, errors as sentences with HTTP statuses."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from services.common.clients import Hit
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, Unauthenticated, Unavailable
from services.web.errors import error_for, http_status, sentence
from services.web.gateway import Query, hide_near_duplicates


def _hit(i: int, vector: list[float]) -> Hit:
    return Hit(id=str(i), score=1.0 - i / 10, vector=np.asarray(vector, dtype=np.float32))


def test_near_duplicates_of_a_better_ranked_shown_hit_are_hidden() -> None:
    hits = [_hit(0, [1, 0, 0]), _hit(1, [0.999, 0.045, 0]), _hit(2, [0, 1, 0]), _hit(3, [0.05, 0.9987, 0]),
            _hit(4, [0.7, 0.7, 0.14])]
    kept, hidden = hide_near_duplicates(hits, 0.99)
    assert [h.id for h in kept] == ["0", "2", "4"] and hidden == 2
    assert hide_near_duplicates(hits, 1.0)[1] == 0  # only exact copies at 1.0, and there are none
    kept, _ = hide_near_duplicates(hits, 0.5)
    assert [h.id for h in kept] == ["0", "2"]  # hit 4 is within 0.5 of both
    with pytest.raises(ValueError):
        hide_near_duplicates([Hit("x", 1.0)], 0.9)


def test_queries_round_trip_and_bad_ones_are_sentences() -> None:
    assert str(Query.parse("text:a photo: of a cat")) == "text:a photo: of a cat"
    assert Query.parse("id: 123 ") == Query("id", "123")
    for bad in ("cat", "image:x", "text:", "id:  "):
        with pytest.raises(InvalidArgument, match="is not one of"):
            Query.parse(bad)


def test_service_errors_become_statuses_and_sentences() -> None:
    down = Unavailable("encoder service at 10.0.0.7:50051: UNAVAILABLE: failed to connect to all addresses; "
                       "last error: UNKNOWN: ipv4:10.0.0.7:50051: Connection refused")
    assert http_status(down) == 503
    assert sentence(down) == ("The encoder service (10.0.0.7:50051) is not reachable: searching by image or text "
                              "is off until it is back; 'Search with this' on results and the reports still work.")
    refused = Unauthenticated("search service at h:1: UNAUTHENTICATED: missing bearer token")
    assert http_status(refused) == 401 and "refused the access token" in sentence(refused)
    missing = NotFound("search service at h:1: NOT_FOUND: no collection named 'x'")
    assert http_status(missing) == 404 and sentence(missing) == "The search service refused: No collection named 'x'."
    assert http_status(ResourceExhausted("too large")) == 413
    busy = ResourceExhausted("encoder service at h:1: RESOURCE_EXHAUSTED: queue full", retry_after=2.0)
    assert http_status(busy) == 429 and sentence(busy) == "The encoder service is busy; try again in 2 s."
    assert sentence(InvalidArgument("k must be between 1 and 500, not 0")) == "k must be between 1 and 500, not 0."
    assert isinstance(error_for(grpc.StatusCode.INVALID_ARGUMENT, "x"), InvalidArgument)
    assert http_status(error_for(grpc.StatusCode.UNKNOWN, "x")) == 500
