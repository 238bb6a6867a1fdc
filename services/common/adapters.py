"""The on-disk format of an adapter: a small head applied after a base model (DESIGN §3, §8).

Written by ``services.adapters`` (training), read by the encoder (serving ``<base>+<name>``); both
sides meet here only, in numpy and JSON, so this module never imports torch. An adapter is a
directory ``<adapters-dir>/<name>/`` holding:

- ``head.npz``: the head, self-contained: ``weight_<i>`` (out, in) and ``bias_<i>`` (out,) float32
  arrays for layers i = 0..n-1, and ``activation`` (a 0-d string array). Its SHA-256 is *the
  adapter's checksum*: it covers everything the head computes.
- ``card.json``: what the adapter is (schema ``retrieval.adapter/v1``): its base model id and the
  SHA-256 of the base weights it was trained on, the head's checksum, the loss, hyperparameters,
  validation curve, training time, the catalogue it was trained on.
- ``SHA256SUMS``: ``sha256sum -c`` lines for ``head.npz`` and ``card.json``.

The function a head computes (``apply_head`` is the reference; the encoder runs the same in torch):
``x`` is the base model's L2-normalised embedding (what the encoder serves for the base model),
``h_0 = x``, ``h_{i+1} = act(W_i h_i + b_i)`` for every layer but the last, which has no activation;
the adapter's embedding is the last layer's output (``output`` ``linear``), or its softmax
(``output`` ``softmax``: a classifier head whose embedding is the class posterior), L2-normalised.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import DataLoss, NotFound
from services.common.files import atomic_write, atomic_write_text

CARD_SCHEMA = "retrieval.adapter/v1"
CARD_FILE = "card.json"
HEAD_FILE = "head.npz"
SUMS_FILE = "SHA256SUMS"
ACTIVATIONS = ("relu", "gelu", "identity")
OUTPUTS = ("linear", "softmax")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_CARD_BYTES = 4 * 1024 * 1024  # a card holds curves and a trial table, never megabytes
MAX_HEAD_BYTES = 512 * 1024 * 1024  # a head is a few layers; refuse to read anything near a model's size


@dataclass(frozen=True)
class Head:
    """A head's layers and activation (see the module docstring for the function it computes).

    Attributes:
        weights: per layer, float32 (out, in).
        biases: per layer, float32 (out,).
        activation: ``relu``, ``gelu`` (exact, erf form) or ``identity``, between layers.
        output: ``linear`` (the last layer's output) or ``softmax`` (its softmax over the outputs).
    """

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activation: str
    output: str = "linear"

    @property
    def in_dim(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.weights[-1].shape[0])

    def check(self, where: str) -> None:
        """Shapes chain, values are finite, the activation is known; DataLoss otherwise."""
        if not self.weights or len(self.weights) != len(self.biases):
            raise DataLoss(f"{where}: {len(self.weights)} weight and {len(self.biases)} bias arrays")
        if self.activation not in ACTIVATIONS:
            raise DataLoss(f"{where}: activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.output not in OUTPUTS:
            raise DataLoss(f"{where}: output {self.output!r} is not one of {', '.join(OUTPUTS)}")
        previous = self.weights[0].shape[1] if self.weights[0].ndim == 2 else -1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if w.ndim != 2 or b.shape != (w.shape[0],) or w.shape[1] != previous:
                raise DataLoss(f"{where}: layer {i} has weight {w.shape} and bias {b.shape}, after a layer of "
                               f"{previous} outputs")
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise DataLoss(f"{where}: layer {i} has non-finite values")
            previous = w.shape[0]

    def to_bytes(self) -> bytes:
        """The ``head.npz`` file's bytes (deterministic for the same arrays)."""
        arrays: dict[str, np.ndarray] = {"activation": np.array(self.activation), "output": np.array(self.output)}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"weight_{i}"] = np.ascontiguousarray(w, dtype=np.float32)
            arrays[f"bias_{i}"] = np.ascontiguousarray(b, dtype=np.float32)
        # np.savez stamps each member with the current time; a fixed date makes equal heads equal files
        # (and equal checksums), which the reproducibility tests compare.
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, array, allow_pickle=False)
                archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Head:
        """Reads a ``head.npz`` (no pickles); DataLoss when it is not one."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (ValueError, OSError, EOFError) as exc:
            raise DataLoss(f"{where}: not a readable head file ({type(exc).__name__}: {exc})") from exc
        layers = sum(1 for k in arrays if k.startswith("weight_"))
        try:
            head = cls(tuple(arrays[f"weight_{i}"].astype(np.float32) for i in range(layers)),
                       tuple(arrays[f"bias_{i}"].astype(np.float32) for i in range(layers)),
                       str(arrays["activation"]), str(arrays["output"]))
        except KeyError as exc:
            raise DataLoss(f"{where}: the head file has no array {exc}") from exc
        head.check(where)
        return head


def apply_head(head: Head, x: np.ndarray) -> np.ndarray:
    """The reference forward: base embeddings (n, in_dim), any norm, to adapter embeddings (n, out_dim),
    float32, L2-normalised. Inputs are L2-normalised first, as the encoder serves them."""
    from math import sqrt

    h = np.asarray(x, dtype=np.float64)
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
    for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
        h = h @ w.astype(np.float64).T + b.astype(np.float64)
        if i < len(head.weights) - 1:
            if head.activation == "relu":
                h = np.maximum(h, 0.0)
            elif head.activation == "gelu":
                from scipy.special import erf

                h = 0.5 * h * (1.0 + erf(h / sqrt(2.0)))
    if head.output == "softmax":
        h = np.exp(h - h.max(axis=1, keepdims=True))
        h = h / h.sum(axis=1, keepdims=True)
    return (h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class AdapterCard:
    """The parts of ``card.json`` that serving needs (the rest is carried as ``raw``).

    Attributes:
        name: the adapter's name (its directory's name); the model id is ``<base_model>+<name>``.
        base_model: the base model id, e.g. ``efficientnet-lite0``.
        base_weights_sha256: SHA-256 of the base weights it was trained on (as GetModel reports them).
        head_sha256: SHA-256 of ``head.npz``.
        in_dim, out_dim: the head's input (base) and output (adapter) dimensions.
        raw: the whole card.
        directory: where the adapter's files are.
    """

    name: str
    base_model: str
    base_weights_sha256: str
    head_sha256: str
    in_dim: int
    out_dim: int
    raw: dict[str, Any]
    directory: Path

    @property
    def model_id(self) -> str:
        return f"{self.base_model}+{self.name}"


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter name (1 to 64 letters, digits, '.', '_', '-'); NotFound otherwise."""
    if not ADAPTER_NAME.fullmatch(name):
        shown = name if len(name) <= 80 else f"{name[:60]}... ({len(name)} characters)"
        raise NotFound(f"adapter name {shown!r} is not valid: 1 to 64 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    return name


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise DataLoss(f"{what} {path} is {size} bytes, over the {limit}-byte limit")
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise DataLoss(f"{what} {path} cannot be read ({exc.strerror})") from exc


def read_card(directory: Path) -> AdapterCard:
    """The card of the adapter in ``directory`` (its name is the directory's name).

    Raises:
        NotFound: no ``card.json`` there.
        DataLoss: the card is not a valid adapter card.
    """
    path = directory / CARD_FILE
    data = _read_bounded(path, MAX_CARD_BYTES, "adapter card")
    try:
        raw = json.loads(data)
        if raw.get("schema") != CARD_SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r}, expected {CARD_SCHEMA!r}")
        head = raw["head"]
        return AdapterCard(name=directory.name, base_model=str(raw["base"]["model"]),
                           base_weights_sha256=str(raw["base"]["weights_sha256"]),
                           head_sha256=str(head["sha256"]), in_dim=int(head["in_dim"]),
                           out_dim=int(head["out_dim"]), raw=raw, directory=directory)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataLoss(f"adapter card {path} is not valid ({type(exc).__name__}: {exc})") from exc


def read_head(directory: Path, card: AdapterCard) -> tuple[Head, str]:
    """The head of the adapter in ``directory`` and its SHA-256, checked against the card.

    Raises:
        DataLoss: the file's checksum or dimensions differ from the card's, or it is not a head.
    """
    path = directory / HEAD_FILE
    data = _read_bounded(path, MAX_HEAD_BYTES, "adapter head")
    digest = sha256_bytes(data)
    if digest != card.head_sha256:
        raise DataLoss(f"adapter {card.name}: {path} has SHA-256 {digest}, the card says {card.head_sha256} "
                       "(corrupt, or replaced without its card)")
    head = Head.from_bytes(data, str(path))
    if (head.in_dim, head.out_dim) != (card.in_dim, card.out_dim):
        raise DataLoss(f"adapter {card.name}: the head maps {head.in_dim} to {head.out_dim} dimensions, the card "
                       f"says {card.in_dim} to {card.out_dim}")
    return head, digest


def write_adapter(directory: Path, head: Head, card: dict[str, Any]) -> str:
    """Writes ``head.npz``, ``card.json`` (with the head's checksum and dimensions filled in) and
    ``SHA256SUMS`` into ``directory``; returns the head's SHA-256.

    The head is written before the card that makes it valid, each file atomically.
    """
    head.check("adapter head")
    data = head.to_bytes()
    digest = sha256_bytes(data)
    card = {**card, "schema": CARD_SCHEMA,
            "head": {**card.get("head", {}), "file": HEAD_FILE, "sha256": digest, "in_dim": head.in_dim,
                     "out_dim": head.out_dim, "layers": len(head.weights), "activation": head.activation,
                     "output": head.output}}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / HEAD_FILE, lambda fh: fh.write(data))
    card_text = json.dumps(card, indent=1, sort_keys=False) + "\n"
    atomic_write_text(directory / CARD_FILE, card_text)
    sums = f"{digest}  {HEAD_FILE}\n{sha256_bytes(card_text.encode())}  {CARD_FILE}\n"
    atomic_write_text(directory / SUMS_FILE, sums)
    for name in (HEAD_FILE, CARD_FILE, SUMS_FILE):  # temporary files are 0600; an encoder may run as another user
        (directory / name).chmod(0o644)
    return digest
