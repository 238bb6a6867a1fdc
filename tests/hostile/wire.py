"""Hostile protobuf requests as bytes on the wire, as hypothesis strategies.

``structured`` builds a request from its message descriptor, field by field, the way a careless or
malicious client could encode it: strings that are not UTF-8, huge and negative numbers, NaN and
infinite floats, repeated fields up to and past the server's limits, packed and unpacked encodings,
singular fields sent twice, unknown fields, fields in any order. ``mutated`` takes a valid serialized
request and flips bits, truncates, inserts, deletes and overwrites bytes; ``junk`` is random bytes.
Which values a field gets comes from ``Hints``: valid names and ids of the running services (so that
requests get past the first check), their limits, and hostile values of every kind.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import strategies as st

T = TypeVar("T")
F = FieldDescriptor

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_VARINT_TYPES = frozenset({F.TYPE_INT32, F.TYPE_INT64, F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_BOOL, F.TYPE_ENUM,
                           F.TYPE_SINT32, F.TYPE_SINT64})
_I32_TYPES = frozenset({F.TYPE_FLOAT, F.TYPE_FIXED32, F.TYPE_SFIXED32})
_I64_TYPES = frozenset({F.TYPE_DOUBLE, F.TYPE_FIXED64, F.TYPE_SFIXED64})

HOSTILE_STRINGS: tuple[bytes, ...] = (
    b"", b"\x00", b"a\x00b", b".", b"..", b"../../../etc/passwd", b"/etc/passwd", b"C:\\Windows", b" ", b"\t\n\r",
    b"%s%n%x", b"${jndi:x}", b"'; DROP TABLE x; --", "é".encode(), "\u202eevil".encode(), "🙂🙃".encode(),
    "\ufeff".encode(), "\u0301".encode(), "\U0010ffff".encode(), b"x" * 255, b"x" * 256, b"-x", b"_", b"a/b",
)
INVALID_UTF8: tuple[bytes, ...] = (
    b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b", b"\xe2\x82",
    b"\xf8\x88\x80\x80\x80",
)
INTS: tuple[int, ...] = (0, 1, 2, 3, 7, 8, 9, -1, -2, 255, 256, 1000, 65536, 2**31 - 1, 2**31, -(2**31), 2**32 - 1,
                         2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1)
FLOATS: tuple[float, ...] = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-38, 3.4028235e38,
                             -3.4028235e38, 1e30, 65504.0)
_MASK64 = (1 << 64) - 1


def varint(value: int) -> bytes:
    """The base-128 varint of ``value``; negative numbers as their 64-bit two's complement (10 bytes)."""
    value &= _MASK64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return key(number, LEN) + varint(len(payload)) + payload


@dataclass(frozen=True)
class Hints:
    """What the generator knows about request fields, looked up by ``Message.field`` then ``field``.

    Attributes:
        strings: likely values of string and bytes fields (valid names and ids, paths, images).
        ints: likely values of integer and enum fields (limits and their neighbours).
        counts: interesting lengths of repeated fields (limits, limit + 1, a vector's dimension).
        well_formed: build messages that parse (valid UTF-8, no malformed unknown or nested fields), so
            that their hostile values reach the service's own checks; otherwise anything goes.
    """

    strings: Mapping[str, Sequence[bytes]] = field(default_factory=dict)
    ints: Mapping[str, Sequence[int]] = field(default_factory=dict)
    counts: Mapping[str, Sequence[int]] = field(default_factory=dict)
    well_formed: bool = False

    def lookup(self, table: Mapping[str, Sequence[T]], fd: FieldDescriptor) -> Sequence[T]:
        owner = getattr(fd.containing_type, "name", "")
        return table.get(f"{owner}.{fd.name}", table.get(fd.name, ()))


def weighted(*options: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of ``options``, picked with the given integer weights."""
    choices = [s for w, s in options for _ in range(w)]
    return st.integers(0, len(choices) - 1).flatmap(lambda i: choices[i])


def _long_strings() -> st.SearchStrategy[bytes]:
    unit = st.sampled_from([b"a", b"\xff", "é".encode(), b"../", b"\x00", "🙂".encode()])
    return st.tuples(unit, st.sampled_from([200, 201, 1000, 1001, 4096, 20_000, 100_000])).map(lambda t: t[0] * t[1])


def _text() -> st.SearchStrategy[bytes]:
    return st.text(st.characters(codec="utf-8"), max_size=40).map(lambda s: s.encode())


def string_values(fd: FieldDescriptor, hints: Hints) -> st.SearchStrategy[bytes]:
    """A string or bytes field's value: hinted, hinted with hostile additions, or hostile outright."""
    hinted = list(hints.lookup(hints.strings, fd))
    loose = not hints.well_formed or fd.type == F.TYPE_BYTES
    hostile: list[tuple[int, st.SearchStrategy[bytes]]] = [(3, st.sampled_from(HOSTILE_STRINGS)), (2, _text()),
                                                           (1, _long_strings())]
    if loose:
        hostile += [(2, st.sampled_from(INVALID_UTF8)), (1, st.binary(max_size=64))]
    if not hinted:
        return weighted(*hostile)
    glue = HOSTILE_STRINGS + INVALID_UTF8 if loose else HOSTILE_STRINGS
    glued = st.tuples(st.sampled_from(hinted), st.sampled_from(glue), st.booleans()).map(
        lambda t: t[0] + t[1] if t[2] else t[1] + t[0])
    return weighted((10 if loose else 20, st.sampled_from(hinted)), (2, glued), *hostile)


def int_values(fd: FieldDescriptor, hints: Hints) -> st.SearchStrategy[int]:
    hinted = list(hints.lookup(hints.ints, fd))
    if fd.type == F.TYPE_BOOL:
        hinted += [0, 1, 2]
    elif fd.type == F.TYPE_ENUM and fd.enum_type is not None:
        hinted += [v.number for v in fd.enum_type.values]
    options = [(3, st.sampled_from(INTS)), (1, st.integers(-(2**63), 2**64 - 1))]
    return weighted((6, st.sampled_from(hinted)), *options) if hinted else weighted(*options)


def _float_bytes(wire: str) -> st.SearchStrategy[bytes]:
    size = 4 if wire == "<f" else 8
    return weighted((3, st.sampled_from(FLOATS).map(lambda v: struct.pack(wire, v))),
                    (3, st.floats(width=32 if size == 4 else 64, allow_nan=True).map(lambda v: struct.pack(wire, v))),
                    (1, st.binary(min_size=size, max_size=size)))


def scalar_bytes(fd: FieldDescriptor, hints: Hints) -> st.SearchStrategy[bytes]:
    """One encoded value (without its key) of a scalar field."""
    if fd.type in (F.TYPE_STRING, F.TYPE_BYTES):
        return string_values(fd, hints).map(lambda v: varint(len(v)) + v)
    if fd.type in _VARINT_TYPES:
        return int_values(fd, hints).map(varint)
    if fd.type == F.TYPE_FLOAT:
        return _float_bytes("<f")
    if fd.type == F.TYPE_DOUBLE:
        return _float_bytes("<d")
    return st.binary(min_size=8, max_size=8) if fd.type in _I64_TYPES else st.binary(min_size=4, max_size=4)


def wire_type(fd: FieldDescriptor) -> int:
    if fd.type in _VARINT_TYPES:
        return VARINT
    if fd.type in _I32_TYPES:
        return I32
    return I64 if fd.type in _I64_TYPES else LEN


@st.composite
def _float_run(draw: st.DrawFn, count: int) -> bytes:
    """``count`` float32 values, mostly ordinary, some special, as packed little-endian bytes."""
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(count).astype("<f4")
    for _ in range(draw(weighted((3, st.just(0)), (1, st.integers(1, 3)))) if count else 0):
        values[draw(st.integers(0, count - 1))] = draw(st.sampled_from(FLOATS))
    return values.tobytes()


def _counts(fd: FieldDescriptor, hints: Hints) -> st.SearchStrategy[int]:
    return st.sampled_from(list(hints.lookup(hints.counts, fd)) or [0, 1, 2, 3])


@st.composite
def field_bytes(draw: st.DrawFn, fd: FieldDescriptor, hints: Hints, depth: int) -> bytes:
    """Every occurrence of one field on the wire (empty when the field is left out)."""
    if fd.message_type is not None:
        inner = message_bytes(fd.message_type, hints, depth + 1) if depth < 3 else st.just(b"")
        garbage = st.binary(max_size=24)
        payloads = inner if hints.well_formed else weighted((9, inner), (1, garbage))
        one = payloads.map(lambda payload: length_delimited(fd.number, payload))
        if not fd.is_repeated:
            return b"".join(draw(st.lists(one, max_size=2)))
        count = draw(_counts(fd, hints))
        if count <= 3:
            return b"".join(draw(st.lists(one, min_size=count, max_size=count)))
        common, odd, at = draw(one), draw(one), draw(st.integers(0, count - 1))
        return b"".join(odd if i == at else common for i in range(count))
    number, wire = fd.number, wire_type(fd)
    if not fd.is_repeated:
        value = scalar_bytes(fd, hints).map(lambda v: key(number, wire) + v)
        return b"".join(draw(weighted((2, st.just([])), (7, st.lists(value, min_size=1, max_size=1)),
                                      (1, st.lists(value, min_size=2, max_size=2)))))
    count = draw(_counts(fd, hints))
    if fd.type == F.TYPE_FLOAT:
        raw = draw(_float_run(count))
        values = [raw[i:i + 4] for i in range(0, len(raw), 4)]
    elif count <= 8:
        values = draw(st.lists(scalar_bytes(fd, hints), min_size=count, max_size=count))
    else:
        common, numbered = draw(scalar_bytes(fd, hints)), draw(st.booleans())
        values = [_numbered(common, i) if numbered and wire == LEN else common for i in range(count)]
    if wire != LEN and draw(st.booleans()):  # packed: one length-delimited run of values
        return length_delimited(number, b"".join(values)) if values else b""
    return b"".join(key(number, wire) + v for v in values)


def _numbered(encoded: bytes, index: int) -> bytes:
    """A length-prefixed string with ``index`` appended (distinct repeated values)."""
    length, skip = _read_varint(encoded)
    payload = encoded[skip:skip + length] + str(index).encode()
    return varint(len(payload)) + payload


def _read_varint(data: bytes) -> tuple[int, int]:
    value = shift = 0
    for i, byte in enumerate(data):
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i + 1
    return value, len(data)


def unknown_field(well_formed: bool) -> st.SearchStrategy[bytes]:
    """A field the schema does not have (or a reserved one), of every wire type, some malformed."""
    number = st.one_of(st.sampled_from([7, 15, 16, 99, 1000, 2**29 - 1]), st.integers(1, 2**29 - 1))
    valid = [
        st.tuples(number, st.sampled_from(INTS)).map(lambda t: key(t[0], VARINT) + varint(t[1])),
        st.tuples(number, st.binary(max_size=32)).map(lambda t: length_delimited(*t)),
        st.tuples(number, st.binary(min_size=4, max_size=4)).map(lambda t: key(t[0], I32) + t[1]),
        st.tuples(number, st.binary(min_size=8, max_size=8)).map(lambda t: key(t[0], I64) + t[1]),
        number.map(lambda n: key(n, SGROUP) + key(n, EGROUP)),
    ]
    if well_formed:
        return st.one_of(valid)
    return st.one_of(*valid, st.tuples(number, st.sampled_from([SGROUP, EGROUP, 6, 7])).map(lambda t: key(*t)))


_MESSAGES: dict[tuple[int, int, int], st.SearchStrategy[bytes]] = {}


def message_bytes(descriptor: Any, hints: Hints, depth: int = 0) -> st.SearchStrategy[bytes]:
    """A message built field by field from ``descriptor``, its fields (and unknown ones) in any order."""
    memo = (id(descriptor), id(hints), depth)
    if memo not in _MESSAGES:
        _MESSAGES[memo] = _message_bytes(descriptor, hints, depth)
    return _MESSAGES[memo]


def _message_bytes(descriptor: Any, hints: Hints, depth: int) -> st.SearchStrategy[bytes]:
    parts = [field_bytes(fd, hints, depth) for fd in descriptor.fields]
    unknown = weighted((8, st.just([])), (2, st.lists(unknown_field(hints.well_formed), min_size=1, max_size=2)))
    chunks = st.tuples(st.tuples(*parts), unknown).map(lambda t: [c for c in (*t[0], *t[1]) if c])
    return chunks.flatmap(lambda cs: st.permutations(cs)).map(b"".join)


_SPECIAL_WORDS = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00",
                  b"\xff\xff\xff\xff\xff\xff\xff\xff\x01")


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A valid serialized message with 1 to 6 byte-level mutations."""
    data = bytearray(draw(st.sampled_from(list(seeds))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "byte", "word", "duplicate", "splice"]))
        at = draw(st.integers(0, 2**20)) % (len(data) + 1)
        size = draw(st.integers(1, 16))
        if op == "flip" and data:
            data[at % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + size]
        elif op == "byte" and data:
            data[at % len(data)] = draw(st.integers(0, 255))
        elif op == "word":
            data[at:at + 4] = draw(st.sampled_from(_SPECIAL_WORDS))
        elif op == "duplicate":
            data[at:at] = data[at:at + size * 4]
        elif op == "splice":
            other = draw(st.sampled_from(list(seeds)))
            data = data[:at] + other[draw(st.integers(0, len(other))):]
    return bytes(data)


def junk() -> st.SearchStrategy[bytes]:
    """Random bytes, sometimes starting like a length-delimited field that claims too much."""
    return st.one_of(st.binary(max_size=256),
                     st.tuples(st.integers(1, 15), st.sampled_from(INTS[:14]), st.binary(max_size=8)).map(
                         lambda t: key(t[0], LEN) + varint(t[1]) + t[2]))


_WELL_FORMED: dict[int, Hints] = {}


def request_bytes(descriptor: Any, seeds: Sequence[bytes], hints: Hints) -> st.SearchStrategy[tuple[str, bytes]]:
    """One request and how it was made: ``seed`` (valid, as it is), ``structured``, ``mutated`` or ``junk``."""
    def tag(kind: str) -> Callable[[bytes], tuple[str, bytes]]:
        return lambda data: (kind, data)

    strict = _WELL_FORMED.setdefault(id(hints), replace(hints, well_formed=True))
    return weighted((2, st.sampled_from(list(seeds)).map(tag("seed"))),
                    (6, message_bytes(descriptor, strict).map(tag("structured"))),
                    (3, message_bytes(descriptor, hints).map(tag("structured"))),
                    (9, mutated(seeds).map(tag("mutated"))), (2, junk().map(tag("junk"))))


def parse(message_type: Any, data: bytes) -> Any | None:
    """``data`` parsed as ``message_type``, or None when it does not parse (the server refuses it too)."""
    message = message_type()
    try:
        message.ParseFromString(data)
    except Exception:  # DecodeError, and the RuntimeWarning-free failures of upb
        return None
    return message
