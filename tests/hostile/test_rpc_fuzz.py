"""Every RPC of the three services under generated hostile requests (structured from the message
descriptors, byte-mutated from valid requests, random bytes; streams with bad messages in the middle
and cancelled midway; callers without, with a wrong, or with two tokens). ``HOSTILE_CASES`` sizes it.

Each case must end with a status its RPC may answer and a message that is a sentence; every batch
ends with every server answering health checks; the last test checks what the whole session left
behind: no RPC still counted in flight, RSS growth within a stated bound, and good requests answered
correctly, as before the attack.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.conftest import fuzz_settings, rpc_cases
from tests.hostile.good import good_request_problems, unexpected_codes
from tests.hostile.harness import (
    AUTH_VARIANTS,
    Case,
    Ledger,
    health_problems,
    invoke,
    rss_mb,
    settle_in_flight,
    violations,
)
from tests.hostile.rpcs import BIDI, RPCS, Rpc, hints, seeds
from tests.hostile.servers import Platform
from tests.hostile.wire import Hints, request_bytes, weighted

HEALTH_EVERY = 50  # cases between health checks within a batch
RSS_GROWTH_LIMIT_MB = 400.0  # what a whole run may add to the process holding the three servers


def case_strategy(rpc: Rpc, valid: list[bytes], known: Hints) -> st.SearchStrategy[Case]:
    request = request_bytes(rpc.request.DESCRIPTOR, valid, known)
    auth = weighted((17, st.just("ok")), *((1, st.just(a)) for a in AUTH_VARIANTS[1:]))
    if rpc.kind != BIDI:
        return st.tuples(request, auth).map(lambda t: Case(t[0][0], (t[0][1],), t[1]))
    message = weighted((1, st.sampled_from(valid).map(lambda m: ("seed", m))), (1, request))

    @st.composite
    def stream(draw: st.DrawFn) -> Case:
        made = draw(st.lists(message, min_size=1, max_size=5))
        cancel = draw(weighted((3, st.none()), (1, st.integers(0, len(made)))))
        hostile = sorted({kind for kind, _ in made} - {"seed"}) or ["seed"]
        return Case("stream:" + "+".join(hostile), tuple(m for _, m in made), draw(auth), cancel)

    return stream()


@pytest.fixture(scope="module")
def valid(platform: Platform) -> dict[str, list[bytes]]:
    """Valid requests per RPC."""
    return seeds(platform)


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
def test_rpc_survives_hostile_requests(rpc: Rpc, platform: Platform, ledger: Ledger,
                                       valid: dict[str, list[bytes]]) -> None:
    strategy = case_strategy(rpc, valid[rpc.name], hints(platform, rpc.protect))
    done = 0

    @fuzz_settings(rpc_cases())
    @given(case=strategy)
    def attack(case: Case) -> None:
        nonlocal done
        outcome = invoke(platform, rpc, case)
        problems = violations(platform, rpc, case, outcome)
        done += 1
        if done % HEALTH_EVERY == 0:
            problems += health_problems(platform)
        ledger.record(rpc.name, case, "CUT" if outcome.cut else outcome.code.name, outcome.seconds, problems, rpc,
                      outcome.details)

    attack()
    for problem in health_problems(platform):
        ledger.record(rpc.name, Case("health", ()), "HEALTH", 0.0, [problem], rpc)
    assert done >= rpc_cases()
    found = ledger.violations_of(rpc.name)
    assert not found, f"{len(found)} kinds of violation:\n" + "\n".join(found)


# The tests below run last (pytest keeps the order of a module): the state the whole session left.

def test_after_the_attack_nothing_is_left_in_flight(platform: Platform) -> None:
    counts = settle_in_flight(platform)
    assert not any(counts.values()), f"RPCs still counted in flight by the servers' thread pools: {counts}"
    assert not health_problems(platform)


def test_after_the_attack_good_requests_are_answered_correctly(platform: Platform) -> None:
    problems = good_request_problems(platform)
    assert not problems, "\n".join(problems)


def test_after_the_attack_rss_growth_is_bounded(platform: Platform, ledger: Ledger) -> None:
    rss = rss_mb()
    ledger.notes["rss_mb_end"] = round(rss, 1)
    growth = rss - float(ledger.notes["rss_mb_start"])
    assert growth <= RSS_GROWTH_LIMIT_MB, f"RSS grew by {growth:.0f} MiB over {sum(ledger.cases.values())} cases"


def test_after_the_attack_no_rpc_was_counted_internal(platform: Platform) -> None:
    """The servers' own metrics (grpc_server_handled_total) never counted INTERNAL or UNKNOWN."""
    assert not unexpected_codes(platform)
