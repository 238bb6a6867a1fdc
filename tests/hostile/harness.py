"""Sends hostile cases through a raw channel and checks what comes back against the invariants:

- the call ends before its deadline with a status the RPC may answer (never UNKNOWN; never INTERNAL
  for anything a client can send), UNAUTHENTICATED when a protected RPC lacks the right token;
- an error's message is a bounded sentence, free of tracebacks and of Python or gRPC internals;
- an answer is well formed (per-item errors say which item, embeddings have unit norm, no more hits
  than asked for);
- and, between batches, that every server still answers health checks promptly.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import HEALTH_SERVICE
from tests.hostile.rpcs import BIDI, SERVER_STREAM, Rpc
from tests.hostile.servers import MAX_MESSAGE, Platform
from tests.hostile.wire import parse

C = grpc.StatusCode
DEADLINE = 20.0  # seconds a case may take; running out of it is a violation (a hang)
MAX_DETAILS_BYTES = 2048  # an error message longer than this is not a sentence (and risks gRPC's metadata limit)
AUTH_VARIANTS = ("ok", "none", "wrong", "double")
_INTERNALS = ("Traceback", "Exception calling application", "_MultiThreadedRendezvous", "internal error",
              "object at 0x", "Stream removed", "Exception iterating")


@dataclass(frozen=True)
class Case:
    """One hostile call: its request messages (one for unary RPCs), how they were made, its credentials,
    and, for bidirectional streams, after how many answers the client cancels (None: it never does)."""

    kind: str
    messages: tuple[bytes, ...]
    auth: str = "ok"
    cancel_after: int | None = None

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    cut: bool = False  # the client ended the call on purpose (cancelled a stream)
    seconds: float = 0.0


def metadata(platform: Platform, rpc: Rpc, auth: str) -> list[tuple[str, str]]:
    good = platform.metadata(rpc.server) or [("authorization", "Bearer not-needed")]
    wrong = [("authorization", "Bearer wrong-token")]
    return {"ok": good if platform.token(rpc.server) else [], "none": [], "wrong": wrong,
            "double": [*good, *wrong]}[auth]


def invoke(platform: Platform, rpc: Rpc, case: Case, deadline: float = DEADLINE) -> Outcome:
    """Sends ``case`` as raw bytes (no client-side encoding) and reports how the call ended."""
    chan = platform.channels[rpc.server]
    md = metadata(platform, rpc, case.auth)
    start = time.monotonic()
    responses: list[bytes] = []
    cut = False
    try:
        if rpc.kind == BIDI:
            cut = _bidi(chan, rpc, case, md, deadline, responses)
        elif rpc.kind == SERVER_STREAM:
            cut = _server_stream(chan, rpc, case, md, deadline, responses)
        else:
            responses.append(chan.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)(
                case.messages[0], metadata=md, timeout=deadline))
        code, details = C.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    return Outcome(code, details, responses, cut, time.monotonic() - start)


def _bidi(chan: grpc.Channel, rpc: Rpc, case: Case, md: list[tuple[str, str]], deadline: float,
          responses: list[bytes]) -> bool:
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from case.messages
        if case.cancel_after is not None:
            release.wait(deadline)  # an open stream, until the client cancels it

    call = chan.stream_stream(rpc.path, request_serializer=None, response_deserializer=None)(
        requests(), metadata=md, timeout=deadline)
    try:
        if case.cancel_after == 0:
            call.cancel()
            return True
        for response in call:
            responses.append(response)
            if case.cancel_after is not None and len(responses) >= case.cancel_after:
                call.cancel()
                return True
        return False
    finally:
        release.set()


def _server_stream(chan: grpc.Channel, rpc: Rpc, case: Case, md: list[tuple[str, str]], deadline: float,
                   responses: list[bytes]) -> bool:
    """Reads the first answer; a stream that has not ended shortly after it is cancelled (watches wait
    for changes that may never come)."""
    call = chan.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)(
        case.messages[0], metadata=md, timeout=deadline)
    for response in call:
        responses.append(response)
        settle = time.monotonic() + 0.15
        while not call.done() and time.monotonic() < settle:
            time.sleep(0.02)
        if not call.done():
            call.cancel()
            return True
    return False


# -- invariants --------------------------------------------------------------------------------------

def message_problems(details: str) -> list[str]:
    """Why an error message is not a bounded sentence free of internals (empty when it is one)."""
    problems = []
    if len(details.encode()) > MAX_DETAILS_BYTES:
        problems.append(f"message of {len(details.encode())} bytes, over {MAX_DETAILS_BYTES}")
    if len(re.findall(r"[A-Za-z]{2,}", details)) < 3:
        problems.append(f"message is not a sentence: {details[:80]!r}")
    problems += [f"message shows internals ({marker!r}): {details[:160]!r}" for marker in _INTERNALS
                 if marker in details]
    return problems


def violations(platform: Platform, rpc: Rpc, case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with ``outcome`` as the answer to ``case`` (empty when nothing is)."""
    code, details = outcome.code, outcome.details
    if outcome.cut and code in (C.CANCELLED, C.OK):
        return _answer_problems(rpc, case, outcome)
    oversize = any(len(m) > MAX_MESSAGE for m in case.messages)
    if case.auth != "ok" and rpc.protected(platform):
        allowed = {C.UNAUTHENTICATED} | ({C.RESOURCE_EXHAUSTED} if oversize else set())
    else:
        allowed = set(rpc.allowed)
    if code not in allowed:
        return [f"{code.name} is not an expected answer (expected one of "
                f"{', '.join(sorted(c.name for c in allowed))}): {details[:200]!r}"]
    if code == C.OK:
        return _answer_problems(rpc, case, outcome)
    if code == C.NOT_FOUND and rpc.service == HEALTH_SERVICE:
        return []  # grpc's own health servicer answers an unknown service with NOT_FOUND and no message
    return message_problems(details)


AnswerCheck = Callable[[Any, Any], list[str]]


def _answer_problems(rpc: Rpc, case: Case, outcome: Outcome) -> list[str]:
    check = ANSWER_CHECKS.get(rpc.method)
    problems = []
    for i, raw in enumerate(outcome.responses):
        response = parse(rpc.response, raw)
        if response is None:
            problems.append(f"answer {i} does not parse as {rpc.response.DESCRIPTOR.full_name}")
            continue
        request = parse(rpc.request, case.messages[min(i, len(case.messages) - 1)])
        if check is not None and request is not None:
            problems += check(request, response)
    return problems


def _item_problems(items: Sequence[Any], dim: int, what: str) -> list[str]:
    problems = []
    for i, item in enumerate(items):
        if item.HasField("vector"):
            values = list(item.vector.values)
            norm = math.sqrt(sum(v * v for v in values))
            if len(values) != dim or not all(math.isfinite(v) for v in values) or abs(norm - 1) > 1e-3:
                problems.append(f"{what} {i}: a vector of {len(values)} values and norm {norm}, not a unit {dim}-d one")
        elif not item.HasField("error"):
            problems.append(f"{what} {i}: neither a vector nor an error")
        elif item.error.code not in (C.INVALID_ARGUMENT.value[0], C.RESOURCE_EXHAUSTED.value[0]):
            problems.append(f"{what} {i}: per-item code {item.error.code}: {item.error.message[:160]!r}")
        elif not item.error.message.startswith(f"{what} {i} of {len(items)}: "):
            problems.append(f"{what} {i}: its message does not say which {what}: {item.error.message[:120]!r}")
        else:
            problems += message_problems(item.error.message)
    return problems


def _embedded(request: Any, response: Any) -> list[str]:
    if len(response.results) != len(request.images):
        return [f"{len(response.results)} results for {len(request.images)} images"]
    ids = [img.id or str(i) for i, img in enumerate(request.images)]
    if [r.id for r in response.results] != ids:
        return ["the results do not echo the images' ids in order"]
    return _item_problems(response.results, response.dim, "image")


def _texts(request: Any, response: Any) -> list[str]:
    if len(response.results) != len(request.texts):
        return [f"{len(response.results)} results for {len(request.texts)} texts"]
    return _item_problems(response.results, response.dim, "text")


def _hits(limit: int, hits: Sequence[Any]) -> list[str]:
    problems = []
    if len(hits) > limit:
        problems.append(f"{len(hits)} hits for a limit of {limit}")
    if len({h.id for h in hits}) != len(hits):
        problems.append("the same point twice among the hits")
    if any(not math.isfinite(h.score) or abs(h.score) > 1.001 for h in hits):
        problems.append(f"a score outside [-1, 1]: {[h.score for h in hits][:5]}")
    return problems


def _batch(request: Any, response: Any) -> list[str]:
    if len(response.results) != len(request.queries):
        return [f"{len(response.results)} results for {len(request.queries)} queries"]
    return [p for q, r in zip(request.queries, response.results, strict=True) for p in _hits(q.limit, r.hits)]


ANSWER_CHECKS: dict[str, AnswerCheck] = {
    "EmbedImages": _embedded,
    "StreamEmbedImages": _embedded,
    "EmbedTexts": _texts,
    "Search": lambda q, r: _hits(q.limit, r.hits),
    "SearchById": lambda q, r: _hits(q.limit, r.hits),
    "SearchBatch": _batch,
    "Scroll": lambda q, r: [f"{len(r.points)} points for a limit of {q.limit}"] if len(r.points) > (q.limit or 256)
    else [],
}


# -- the state of the servers ---------------------------------------------------------------------------

def health_problems(platform: Platform, budget: float = 1.0) -> list[str]:
    """Servers that do not answer a health check SERVING within ``budget`` seconds."""
    problems = []
    for name, chan in platform.channels.items():
        start = time.monotonic()
        try:
            status = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=budget).status
        except grpc.RpcError as err:
            problems.append(f"{name}: health check {err.code().name}: {err.details()}")
            continue
        seconds = time.monotonic() - start
        if status != health_pb2.HealthCheckResponse.SERVING:
            problems.append(f"{name}: health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")
        elif seconds > budget:
            problems.append(f"{name}: health answered in {seconds:.2f} s")
    return problems


def in_flight(platform: Platform) -> dict[str, int]:
    """RPCs each server's thread pools still count as running or waiting."""
    counts = {}
    for name, running in platform.servers.items():
        assert running.pools is not None
        counts[name] = running.pools.unary.in_flight + running.pools.streams.in_flight + \
            running.pools.open_streams.in_flight
    return counts


def settle_in_flight(platform: Platform, timeout: float = 10.0) -> dict[str, int]:
    """The in-flight counts once they reach zero, or as they are after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    counts = in_flight(platform)
    while any(counts.values()) and time.monotonic() < end:
        time.sleep(0.1)
        counts = in_flight(platform)
    return counts


def rss_mb() -> float:
    """This process's resident set (the three servers live in it), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


# -- what was seen ------------------------------------------------------------------------------------

def _signature(rpc: Rpc, problem: str) -> str:
    return f"{rpc.name}: {re.sub(r'[0-9]+', 'N', problem)[:110]}"


@dataclass
class Ledger:
    """Cases run, codes seen and violations found, per RPC; printed at the end of the session."""

    cases: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    codes: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    violations: dict[str, tuple[Case, str]] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)  # "target code" -> a message seen with it
    notes: dict[str, float | str] = field(default_factory=dict)

    def record(self, target: str, case: Case, code: str, seconds: float, problems: Sequence[str],
               rpc: Rpc | None = None, details: str = "") -> None:
        self.samples.setdefault(f"{target} {code}", details[:200])
        self.cases[target] += 1
        self.kinds[case.kind] += 1
        self.codes.setdefault(target, Counter())[code] += 1
        self.seconds[target] = self.seconds.get(target, 0.0) + seconds
        for problem in problems:
            signature = _signature(rpc, problem) if rpc is not None else f"{target}: {problem[:110]}"
            known = self.violations.get(signature)
            if known is None or case.size < known[0].size:
                self.violations[signature] = (case, problem)

    def violations_of(self, target: str) -> list[str]:
        return [f"{sig}\n    smallest case: {case.kind}, auth {case.auth}, cancel_after {case.cancel_after}, "
                f"messages {[m[:120] for m in case.messages]!r}\n    {problem[:400]}"
                for sig, (case, problem) in self.violations.items() if sig.startswith(f"{target}: ")]

    def summary(self) -> dict[str, Any]:
        return {"cases": sum(self.cases.values()), "by_kind": dict(self.kinds),
                "per_target": {t: {"cases": n, "seconds": round(self.seconds[t], 2), "codes": dict(self.codes[t])}
                               for t, n in sorted(self.cases.items())},
                "violations": sorted(self.violations), "sample_messages": dict(sorted(self.samples.items())),
                **self.notes}

    def report(self) -> str:
        s = self.summary()
        lines = [f"hostile: {s['cases']} cases ({', '.join(f'{k} {v}' for k, v in sorted(s['by_kind'].items()))})"]
        lines += [f"  {t:<34} {v['cases']:>6} cases {v['seconds']:>8.1f} s  "
                  + " ".join(f"{c}={n}" for c, n in sorted(v['codes'].items())) for t, v in s["per_target"].items()]
        lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        lines += [f"  VIOLATION {v}" for v in s["violations"]]
        return "\n".join(lines)

    def dump(self, path: str) -> None:
        with open(path, "w") as out:
            json.dump(self.summary(), out, indent=1, sort_keys=True)
