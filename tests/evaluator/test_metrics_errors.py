"""Bad inputs to the metrics are refused with InvalidArgument, saying what is wrong."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.evaluator.metrics import catalogue_query, encode_labels, evaluate_scores, leave_one_out

LABELS = np.array([0, 1, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_name_the_query(bad: float) -> None:
    scores = np.zeros((3, 3), dtype=np.float32)
    scores[2, 1] = bad
    with pytest.raises(InvalidArgument, match="query 2: scores must be finite"):
        evaluate_scores(scores, LABELS, LABELS)


def test_embeddings_must_be_finite_and_l2_normalised() -> None:
    x = np.eye(3, dtype=np.float32)
    x[1] *= 2
    with pytest.raises(InvalidArgument, match=r"row 1 has L2 norm 2\.000000"):
        leave_one_out(x, LABELS)
    x[1] = np.nan
    with pytest.raises(InvalidArgument, match="row 1 is not finite"):
        leave_one_out(x, LABELS)
    with pytest.raises(InvalidArgument, match="equal dimensions"):
        catalogue_query(np.eye(3, dtype=np.float32), LABELS, np.eye(4, dtype=np.float32), np.arange(4))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ks": []}, "ks must be"),
    ({"ks": [0, 5]}, "ks must be"),
    ({"top_k": -1}, "top_k must be"),
    ({"exclude": np.array([0, 1, 3])}, "exclude must"),
    ({"exclude": np.array([0, 1])}, "exclude must"),
    ({"class_names": ["a"]}, "1 class names for 2 label columns"),
])
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        evaluate_scores(np.zeros((3, 3)), LABELS, LABELS, **kwargs)  # type: ignore[arg-type]


def test_bad_labels() -> None:
    with pytest.raises(InvalidArgument, match="2 query labels for 3 queries"):
        evaluate_scores(np.zeros((3, 3)), LABELS[:2], LABELS)
    with pytest.raises(InvalidArgument, match="integer class ids"):
        evaluate_scores(np.zeros((3, 3)), LABELS.astype(float), LABELS)
    with pytest.raises(InvalidArgument, match="class ids must be >= 0"):
        evaluate_scores(np.zeros((3, 3)), np.array([0, -1, 0]), LABELS)
    with pytest.raises(InvalidArgument, match="label columns"):
        evaluate_scores(np.zeros((3, 3)), np.ones((3, 2), bool), np.ones((3, 3), bool))


def test_encode_labels() -> None:
    classes, ids = encode_labels([("cat",), ("dog",), ("cat",)])
    assert classes == ["cat", "dog"] and ids.tolist() == [0, 1, 0]
    classes, member = encode_labels([("cat",), ("cat", "dog"), ("bird",), ()])  # multi-label or unlabelled
    assert classes == ["bird", "cat", "dog"]
    assert member.tolist() == [[False, True, False], [False, True, True], [True, False, False], [False] * 3]
    with pytest.raises(InvalidArgument, match="item 0: label 'fish' is not among the 3 classes"):
        encode_labels([("fish",)], classes)
