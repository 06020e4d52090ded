"""Fuzzing every decoder that takes bytes from the network, in process, thousands of examples.

The real message types (the inference protocol, swarm sync, dial-back, lanes, the p2p control
messages) are drawn field by field from their own annotations and limits, then broken: a field
of the wrong type or out of range, a missing or unknown field, a tensor whose descriptor lies
about its dtype or shape, declared lengths far beyond what follows, frames cut, duplicated and
reordered. Every outcome must be a decoded message that re-encodes to the same bytes, or the
decoder's own typed error (`RemoteProtocolError`, `PeerBrokenError` at a broken end,
`crdt.ValidationError` for swarm state): never another exception, and never memory that grows
with a length the peer only declared. tests/test_p2p_fuzz.py throws garbage at real hosts;
tests/test_adversarial_node.py at a real `run-node`.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import tracemalloc
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crdt
import p2p
import p2p._lane  # noqa: F401  (registers the lane messages)
import p2p._reach  # noqa: F401  (registers the dial-back messages)
import pipeline._swarm  # noqa: F401  (registers SwarmSync)
import pipeline.protocol  # noqa: F401  (registers the inference protocol)
from p2p._messages import REGISTRY
from p2p._wire import decode_body

MESSAGES = sorted((cls for tag, cls in REGISTRY.items() if not tag.startswith("test.")), key=lambda c: c.TYPE)
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values of every msgpack-native kind, many of them wrong for any given field
WRONG = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40)
         | st.binary(max_size=40) | st.lists(st.integers(-3, 2**62), max_size=5)
         | st.dictionaries(st.text(max_size=4), st.integers(-9, 9), max_size=2))
HEX32 = st.text("0123456789abcdef", min_size=32, max_size=32)
DIMS = st.integers(0, 3) | st.integers(2**20, 2**62) | st.integers(-(2**40), -1)


def _limits(f: dataclasses.Field) -> dict:
    return f.metadata.get("p2p", {})


def _plausible(hint: typing.Any, limits: dict, name: str) -> st.SearchStrategy:
    """Values near the field's own kind: mostly in range, sometimes just beyond its limits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        inner = next(a for a in args if a is not type(None))
        return st.none() | _plausible(inner, limits, name)
    if hint is bool:
        return st.booleans()
    if hint is int:
        lo, hi = limits.get("min_value", 0), limits.get("max_value", 2**20)
        return st.integers(int(lo), int(hi)) | st.sampled_from([int(lo) - 1, int(hi) + 1, 2**63, -(2**63)])
    if hint is float:
        return st.floats()
    if hint is str:
        n = limits.get("max_len", 64)
        if "session" in name or name in ("target", "next_session"):
            return HEX32 | st.text(max_size=n + 1)
        if name == "dtype":
            return st.sampled_from(["float32", "bfloat16", "float16", "int8", "", "float32\x00"])
        return st.text(max_size=n + 1)
    if hint is bytes:
        return st.binary(min_size=max(0, limits.get("min_len", 0) - 1), max_size=limits.get("max_len", 64) + 1)
    if origin in (tuple, list):
        return st.lists(st.integers(-1, 8) | st.integers(2**30, 2**62), max_size=6)
    return WRONG


@st.composite
def broken_bodies(draw: st.DrawFn) -> bytes:
    """A frame body of a real message type, valid or broken in one or more ways."""
    cls = draw(st.sampled_from(MESSAGES))
    hints = typing.get_type_hints(cls)
    fields: dict = {}
    descriptors: list = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        is_tensor = hint is p2p.Tensor or p2p.Tensor in typing.get_args(hint)
        if is_tensor:
            if draw(st.integers(0, 9)) or f.default is dataclasses.MISSING:
                dtype = draw(st.sampled_from(["float32", "bfloat16", "float16", "int64", "bool", "float128", 7]))
                shape = draw(st.lists(DIMS, min_size=0, max_size=4) | st.just([1, 2, 4]))
                descriptors.append([f.name, dtype, shape])
            continue
        if f.default is not dataclasses.MISSING and draw(st.integers(0, 3)) == 0:
            continue  # an optional field left out
        fields[f.name] = draw(_plausible(hint, _limits(f), f.name) if draw(st.integers(0, 7)) else WRONG)
    wrong = draw(st.sampled_from(["none"] * 4 + ["missing", "unknown", "tag", "version", "order", "header"]))
    tag, version = cls.TYPE, 1
    if wrong == "missing" and fields:
        fields.pop(draw(st.sampled_from(sorted(fields))))
    elif wrong == "unknown":
        fields[draw(st.text(min_size=1, max_size=8))] = draw(WRONG)
    elif wrong == "tag":
        tag = draw(st.sampled_from([t.TYPE for t in MESSAGES] + ["", "x" * 65]) | WRONG)
    elif wrong == "version":
        version = draw(WRONG)
    elif wrong == "order":
        descriptors.reverse()
    header = msgpack.packb([version, tag, fields, descriptors], use_bin_type=True)
    if wrong == "header":
        header = draw(st.sampled_from([header[:-1], header + b"\x00", msgpack.packb([version, tag, fields])]))
    body = struct.pack("<I", len(header)) + header
    for desc in descriptors:
        body += bytes(-len(body) % 8)
        body += bytes(_payload_size(desc, draw))
    return body + draw(st.sampled_from([b"", b"", b"", b"\x00", b"\xff" * 9]))


def _payload_size(desc: list, draw: st.DrawFn) -> int:
    """Bytes to put after a descriptor: what it declares (capped: a lie stays a lie), or not."""
    try:
        size = math.prod(desc[2]) * p2p.DTYPE_SIZES[desc[1]]
    except (KeyError, TypeError):
        size = 8
    size = max(0, min(size, 1 << 12))
    return size + draw(st.sampled_from([0, 0, 0, -1, 1, 8])) if size else draw(st.sampled_from([0, 0, 4]))


def _decode_or_refuse(body: bytes) -> p2p.Message | None:
    """The message in `body`, or None when refused with RemoteProtocolError (anything else
    propagates and fails the test)."""
    try:
        msg = decode_body(bytearray(body))
    except p2p.RemoteProtocolError:
        return None
    assert type(msg) in MESSAGES
    return msg


@FUZZ
@given(broken_bodies())
def test_every_real_message_type_decodes_or_is_refused_with_a_protocol_error(body: bytes) -> None:
    msg = _decode_or_refuse(body)
    if msg is not None:  # what decodes is a valid message: it re-encodes and decodes the same
        again = p2p.encode_bytes(msg)
        assert _decode_or_refuse(again[4:]) == msg
        if all(getattr(msg, f.name) != f.default for f in dataclasses.fields(msg)):
            assert again[4:] == body  # nothing left to its default: the very bytes that were read


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_bodies())
def test_the_compiled_and_generic_decoders_agree_on_real_messages(body: bytes) -> None:
    def outcome(fast: bool) -> object:
        try:
            return decode_body(bytearray(body), fast=fast)
        except p2p.RemoteProtocolError as exc:
            return str(exc)

    assert outcome(True) == outcome(False)


def _frames() -> list[bytes]:
    t = p2p.Tensor("float32", (1, 2, 4), bytes(32))
    sid = "ab" * 16
    P = pipeline.protocol
    msgs = [P.OpenSession(sid, "m" * 64, 0, 4, 16, 1, "float32"), P.Step(sid, 3, 0, t),
            P.Replay(sid, (1, 2), (1, 1), t), P.SetNextHop(sid), P.CloseSession(sid), p2p.Heartbeat(),
            pipeline._swarm.SwarmSync(b"\x91\x01"), p2p.ErrorMessage("busy", "x"), p2p.Goodbye()]
    return [p2p.encode_bytes(m) for m in msgs]


FRAMES = _frames()


@FUZZ
@given(st.lists(st.sampled_from(range(len(FRAMES))), max_size=12), st.data())
def test_cut_duplicated_and_reordered_frames_end_in_messages_or_a_typed_error(order: list[int], data) -> None:
    """A session's receiving side fed frames in any order, duplicated, cut anywhere, chunked
    anyhow, with an end anywhere: messages, then RemoteProtocolError or PeerBrokenError."""
    stream = b"".join(FRAMES[i] for i in order)
    if stream and data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(stream) - 1))
        stream = stream[:cut] + data.draw(st.binary(max_size=6)) + stream[cut + data.draw(st.integers(0, 9)):]
    chunk = data.draw(st.integers(1, 97))
    proto = p2p.SessionProtocol(max_frame_size=1 << 16)
    try:
        for i in range(0, len(stream), chunk):
            for msg in proto.receive_data(stream[i:i + chunk]):
                assert isinstance(msg, p2p.Message)
        proto.receive_eof()
    except (p2p.RemoteProtocolError, p2p.PeerBrokenError):
        pass


# --- declared lengths never allocate what they declare ------------------------------------------
def _peak_while(fn: typing.Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        try:
            fn()
        except (p2p.RemoteProtocolError, p2p.PeerBrokenError, crdt.ValidationError):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _lying_frames() -> dict[str, bytes]:
    header = msgpack.packb([1, "lamina.step", {"session_id": "ab" * 16, "step_id": 1, "position": 0},
                            [["hidden", "float32", [64, 1 << 20, 4096]]]], use_bin_type=True)
    body = struct.pack("<I", len(header)) + header
    huge_replay = msgpack.packb([1, "lamina.replay", {"session_id": "ab" * 16, "step_ids": list(range(4097)),
                                                      "chunks": [2**62] * 4}, []], use_bin_type=True)
    return {
        "frame-length-4GiB": struct.pack("<I", 2**32 - 1) + b"\x00" * 1000,
        "frame-length-127MiB-then-1KB": struct.pack("<I", 127 << 20) + b"\x00" * 1024,
        "header-length-4GiB": struct.pack("<II", 64, 2**32 - 1) + bytes(60),
        "msgpack-array-of-4G-items": struct.pack("<II", 9, 5) + b"\xdd\xff\xff\xff\xff",
        "msgpack-bin-of-4GiB": struct.pack("<II", 9, 5) + b"\xc6\xff\xff\xff\xff",
        "tensor-of-1PiB": struct.pack("<I", len(body) + 8) + body + bytes(-len(body) % 8) + bytes(8),
        "replay-of-4097-chunks": struct.pack("<II", len(huge_replay) + 4, len(huge_replay)) + huge_replay,
    }


@pytest.mark.parametrize("name", list(_lying_frames()))
def test_a_declared_length_costs_only_the_bytes_that_arrived(name: str) -> None:
    data = _lying_frames()[name]

    def feed() -> None:
        decoder = p2p.FrameDecoder()  # the default limit: 128 MiB frames
        for i in range(0, len(data), 256):
            decoder.feed(data[i:i + 256])
        decoder.feed_eof()

    assert _peak_while(feed) < 256 * 1024 + 4 * len(data), name


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_random_length_prefixes_never_allocate_beyond_the_preallocation_limit(length: int, header_len: int,
                                                                            rest: bytes) -> None:
    data = struct.pack("<II", length, header_len) + rest
    peak = _peak_while(lambda: p2p.FrameDecoder().feed(data))
    assert peak < p2p.constants.PREALLOCATE_LIMIT + 256 * 1024


# --- swarm state from the network ----------------------------------------------------------------
SIGNER = crdt.Signer(b"\x09" * 32)


def _good_record_fields() -> list:
    r = crdt.ServerRecord(peer_id=SIGNER.peer_id, model=crdt.ModelId("m", bytes(32)), start=0, end=4,
                          state=crdt.ServerState.ONLINE, hlc=crdt.Hlc(1_700_000_000_000, 0),
                          expires_ms=1_700_000_060_000, throughput=5.0, inference_rps=20.0)
    return list(msgpack.unpackb(r.encode()))


GOOD_FIELDS = _good_record_fields()


@FUZZ
@given(st.integers(0, len(GOOD_FIELDS) - 1), WRONG | st.lists(WRONG, max_size=3), st.booleans())
def test_a_validly_signed_record_with_any_field_broken_is_refused_with_a_reason(i: int, value, sign: bool) -> None:
    """The signer is honest about its key but lies in one field: the record is refused as
    MALFORMED or OVERSIZED (or, when the value happens to be valid, it decodes and verifies)."""
    fields = list(GOOD_FIELDS)
    fields[i] = value
    try:
        body = msgpack.packb(fields, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    sig = SIGNER.sign_bytes(crdt.SIGNING_DOMAIN + body) if sign else bytes(64)
    wire = msgpack.packb((body, SIGNER.public_key, sig), use_bin_type=True)
    try:
        signed = crdt.decode_record(wire)
    except crdt.ValidationError as exc:
        assert exc.reason in (crdt.RejectReason.MALFORMED, crdt.RejectReason.OVERSIZED)
        return
    assert (signed.check() is None) == sign


DELTA_PARTS = st.tuples(
    st.lists(st.binary(max_size=40) | WRONG, max_size=3),
    st.lists(st.tuples(st.integers(-1, 300), st.binary(min_size=120, max_size=136)).map(list) | WRONG, max_size=3),
    st.lists(st.tuples(st.integers(-1, 5000), st.binary(max_size=72)).map(list) | WRONG, max_size=3),
    st.binary(max_size=40) | WRONG,
)


@FUZZ
@given(st.sampled_from([1, 2, 3, -1, "2"]), DELTA_PARTS)
def test_structured_sync_messages_decode_or_are_refused_with_a_reason(kind, parts) -> None:
    try:
        data = msgpack.packb([kind, *parts], use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    try:
        msg = crdt.decode_message(data)
    except crdt.ValidationError as exc:
        assert isinstance(exc.reason, crdt.RejectReason)
        return
    assert crdt.encode_message(msg) == data or isinstance(msg, crdt.Delta) and msg.rejected
    crdt.SwarmState().merge(msg, now_ms=1_700_000_000_000) if isinstance(msg, crdt.Delta) else None
