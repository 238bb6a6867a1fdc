"""The adapter file format: the head is self-contained and checksummed, its function is the same in the
reference (numpy), the trainer (torch) and the encoder (torch), and damage is refused precisely."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.adapters.train import HeadModule
from services.common.adapters import (
    CARD_FILE,
    HEAD_FILE,
    SUMS_FILE,
    Head,
    apply_head,
    read_card,
    read_head,
    write_adapter,
)
from services.common.errors import DataLoss, NotFound
from services.encoder.adapters import AdapterHead


def _head(hidden: int, softmax: bool, seed: int = 0) -> tuple[HeadModule, Head]:
    torch.manual_seed(seed)
    module = HeadModule(24, 7, hidden, softmax=softmax).eval()
    return module, module.to_head()


@pytest.mark.parametrize(("hidden", "softmax"), [(0, False), (16, False), (0, True), (16, True)])
def test_trainer_encoder_and_reference_compute_the_same_function(hidden: int, softmax: bool) -> None:
    module, head = _head(hidden, softmax)
    x = np.random.default_rng(1).standard_normal((9, 24)).astype(np.float32) * 3  # any norm
    reference = apply_head(head, x)
    with torch.no_grad():
        trainer = torch.nn.functional.normalize(module.embed(torch.from_numpy(x)), dim=1).numpy()
        served = torch.nn.functional.normalize(AdapterHead(head)(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(trainer, reference, atol=2e-5)
    np.testing.assert_allclose(served, reference, atol=2e-5)
    assert head.output == ("softmax" if softmax else "linear") and head.out_dim == 7 and head.in_dim == 24
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-6)


def test_equal_heads_are_equal_files_and_round_trip() -> None:
    _, head = _head(16, True)
    data = head.to_bytes()
    assert data == _head(16, True)[1].to_bytes()  # no timestamps inside: same head, same checksum
    back = Head.from_bytes(data, "head")
    assert back.activation == head.activation and back.output == head.output
    for a, b in zip(back.weights + back.biases, head.weights + head.biases, strict=True):
        np.testing.assert_array_equal(a, b)


def _written(tmp_path: Path) -> Path:
    _, head = _head(0, False)
    directory = tmp_path / "my-adapter"
    write_adapter(directory, head, {"name": "my-adapter", "base": {"model": "efficientnet-lite0",
                                                                  "weights_sha256": "ab" * 32}})
    return directory


def test_card_head_and_sums(tmp_path: Path) -> None:
    directory = _written(tmp_path)
    card = read_card(directory)
    assert (card.model_id, card.in_dim, card.out_dim) == ("efficientnet-lite0+my-adapter", 24, 7)
    head, digest = read_head(directory, card)
    assert head.in_dim == 24
    assert digest == hashlib.sha256((directory / HEAD_FILE).read_bytes()).hexdigest() == card.head_sha256
    sums = dict(reversed(line.split("  ")) for line in (directory / SUMS_FILE).read_text().splitlines())
    for name in (HEAD_FILE, CARD_FILE):  # what `sha256sum -c SHA256SUMS` checks
        assert sums[name] == hashlib.sha256((directory / name).read_bytes()).hexdigest()


def test_damage_is_refused(tmp_path: Path) -> None:
    directory = _written(tmp_path)
    card = read_card(directory)
    data = bytearray((directory / HEAD_FILE).read_bytes())
    data[-40] ^= 0xFF
    (directory / HEAD_FILE).write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="the card says"):
        read_head(directory, card)
    raw = json.loads((directory / CARD_FILE).read_text())
    (directory / CARD_FILE).write_text(json.dumps({**raw, "schema": "something/v9"}))
    with pytest.raises(DataLoss, match="schema"):
        read_card(directory)
    with pytest.raises(NotFound):
        read_card(tmp_path / "absent")
    with pytest.raises(DataLoss, match="layer 1"):
        Head((np.zeros((3, 4), np.float32), np.zeros((2, 5), np.float32)),
             (np.zeros(3, np.float32), np.zeros(2, np.float32)), "gelu").check("head")
