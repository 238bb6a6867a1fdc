"""What a run evaluates (``RunSpec``) and what it yields per model (``ModelResult``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import InvalidArgument
from services.evaluator.protocols import protocol_named

LEAVE_ONE_OUT = "leave_one_out"
CATALOGUE_QUERY = "catalogue_query"
MAX_K = 1000  # deepest cut-off: the top-k of every query comes back through the search service
MAX_MODELS = 32  # models in one run spec (each is a full evaluation)
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunSpec:
    """What to evaluate.

    Attributes:
        dataset: dataset root (``list_of_images.txt`` or class folders; ``train/`` + ``test/`` for a
            folder split) or a list file.
        models: encoder model ids to compare.
        protocol: a name of ``protocols.PROTOCOLS`` (``leave_one_out``, ``catalogue_query``...).
        catalogue, queries: list files of a catalogue/query split.
        ks: cut-offs of P@k, R@k and mAP@k.
        name: dataset display name (empty: the folder's name).
        tsne: draw the t-SNE map (seconds to a minute on a CPU).
        run_name: the run's report folder under the runner's report directory (empty: that
            directory itself). Clients name runs; only the server decides where reports go.
    """

    dataset: str
    models: tuple[str, ...]
    protocol: str = LEAVE_ONE_OUT
    catalogue: str = ""
    queries: str = ""
    ks: tuple[int, ...] = (1, 5, 10, 20, 100)
    name: str = ""
    tsne: bool = True
    run_name: str = ""

    def validate(self) -> None:
        if not self.dataset:
            raise InvalidArgument("run spec: dataset is empty")
        if not self.models:
            raise InvalidArgument("run spec: no models")
        if len(self.models) > MAX_MODELS:
            raise InvalidArgument(f"run spec: {len(self.models)} models; at most {MAX_MODELS} per run")
        protocol_named(self.protocol).check(self.catalogue, self.queries)
        if not self.ks or min(self.ks) < 1 or max(self.ks) > MAX_K:
            raise InvalidArgument(f"run spec: ks must be integers from 1 to {MAX_K}, got {list(self.ks)}")
        for what, value in (("run_name", self.run_name), ("name", self.name)):
            if value and not _RUN_NAME.fullmatch(value):
                raise InvalidArgument(f"run spec: {what} {value!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
                                      "starting with a letter or digit")


@dataclass
class ModelResult:
    """The outcome of one (dataset, model, protocol)."""

    model: str
    report_path: Path
    metrics: dict[str, float] = field(default_factory=dict)
