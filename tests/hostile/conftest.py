"""The hostile suite's fixtures: the platform under attack, the ledger of what was seen, the case budget.

``HOSTILE_CASES`` sets how many generated cases the whole suite runs (default 400: tens of seconds);
``HOSTILE_SEED`` explores with another seed (by default every run generates the same cases);
``HOSTILE_REPORT`` names a JSON file for the ledger (cases, codes per RPC, RSS, violations).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.hostile.harness import Ledger, rss_mb
from tests.hostile.rpcs import RPCS
from tests.hostile.servers import Platform, start_platform

DEFAULT_CASES = 400
DECODER_SHARE = 0.2  # of the cases, for the image decoder alone; the rest are spread over the RPCs

_LEDGER = Ledger()


def total_cases() -> int:
    return int(os.environ.get("HOSTILE_CASES", DEFAULT_CASES))


def decoder_cases() -> int:
    return max(40, int(total_cases() * DECODER_SHARE))


def rpc_cases() -> int:
    """Generated cases per RPC."""
    return max(6, math.ceil((total_cases() - decoder_cases()) / len(RPCS)))


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    """Hypothesis settings of a fuzz batch: ``examples`` cases, no deadline, no example database,
    the same cases every run unless ``HOSTILE_SEED`` says otherwise."""
    seed = os.environ.get("HOSTILE_SEED")
    base = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                    suppress_health_check=list(HealthCheck), print_blob=True)
    if seed is None:
        return base
    from hypothesis import seed as with_seed

    return lambda test: with_seed(int(seed))(base(test))


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return _LEDGER


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory, ledger: Ledger) -> Iterator[Platform]:
    for running in start_platform(tmp_path_factory.mktemp("hostile")):
        ledger.notes["rss_mb_start"] = round(rss_mb(), 1)
        yield running


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LEDGER.cases:
        terminalreporter.write_line(_LEDGER.report())
    path = os.environ.get("HOSTILE_REPORT")
    if path and _LEDGER.cases:
        _LEDGER.dump(path)
