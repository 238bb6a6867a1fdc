"""A hand-made bad request and the answer it must get: the RPC's code and a fragment of its message."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from tests.hostile.harness import Case, Outcome, invoke, message_problems
from tests.hostile.rpcs import BY_NAME
from tests.hostile.servers import Platform


@dataclass(frozen=True)
class Bad:
    """A request of ``rpc`` (messages or raw bytes; several for a stream) and its expected answer."""

    rpc: str
    messages: tuple[Message | bytes, ...]
    code: grpc.StatusCode
    fragment: str
    auth: str = "ok"

    def send(self, platform: Platform) -> Outcome:
        raw = tuple(m if isinstance(m, bytes) else m.SerializeToString() for m in self.messages)
        return invoke(platform, BY_NAME[self.rpc], Case("corpus", raw, self.auth), deadline=60)


def check(bad: Bad, platform: Platform) -> Outcome:
    """Sends ``bad`` and asserts its code, its message fragment and that the message is a sentence."""
    outcome = bad.send(platform)
    assert outcome.code == bad.code, f"{outcome.code.name}: {outcome.details[:300]}"
    assert bad.fragment in outcome.details, outcome.details[:300]
    assert not message_problems(outcome.details), message_problems(outcome.details)
    return outcome
