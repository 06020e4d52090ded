"""The sans-IO wire format: golden vectors, chunking, validation, and garbage. No sockets."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import p2p
from p2p._protocol import State


@p2p.message("test.golden")
@dataclass(frozen=True)
class Golden(p2p.Message):
    session_id: str
    positions_start: int
    hidden: p2p.Tensor
    mask: p2p.Tensor | None = None
    tokens: list[int] = p2p.field(default_factory=list)
    scale: float = 1.0


@p2p.message("test.step")
@dataclass(frozen=True)
class Step(p2p.Message):
    session_id: str = p2p.field(max_len=16)
    hidden: p2p.Tensor = p2p.field(dtypes=("float32", "bfloat16"), ndim=2, max_numel=1024)
    positions_start: int = p2p.field(min_value=0)


@dataclass(frozen=True)
class Load(p2p.Message):  # nested record: no tag needed
    peer: str
    free_kv: int


@p2p.message("test.everything")
@dataclass(frozen=True)
class Everything(p2p.Message):
    flag: bool
    ratio: float
    blob: bytes
    pair: tuple[int, str]
    names: tuple[str, ...]
    table: dict[str, list[int]]
    loads: list[Load]
    anything: Any = None
    note: str | None = None


BF16 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]], dtype=torch.bfloat16)
I64 = torch.tensor([5, -1], dtype=torch.int64)

# Pinned wire bytes. If one of these changes, the wire format changed: bump WIRE_VERSION.
GOLDEN = {
    "error": (
        p2p.ErrorMessage("busy", "out of KV memory"),
        "35000000310000009401a97032702e6572726f7282a4636f6465a462757379a76d657373616765b06f7574"
        "206f66204b56206d656d6f727990",
    ),
    "heartbeat": (p2p.Heartbeat(), "16000000120000009401ad7032702e6865617274626561748090"),
    "goodbye": (p2p.Goodbye(), "100000000c0000009401a77032702e6279658090"),
    "tensors": (
        Golden("s1", 7, p2p.Tensor.from_torch(BF16), p2p.Tensor.from_torch(I64), [1, 2, 3], 0.5),
        # body_len=144 | header_len=107 | msgpack header | 1 pad | 12 B bf16 | 4 pad | 16 B int64
        "900000006b0000009401ab746573742e676f6c64656e84aa73657373696f6e5f6964a27331af706f736974"
        "696f6e735f737461727407a6746f6b656e7393010203a57363616c65cb3fe00000000000009293a6686964"
        "64656ea862666c6f6174313692020393a46d61736ba5696e743634910200803f00c0003f4040000080be00"
        "0000000500000000000000ffffffffffffffff",
    ),
}


def _decode_all(data: bytes, chunk: int | None = None) -> list[p2p.Message]:
    decoder = p2p.FrameDecoder()
    if chunk is None:
        return decoder.feed(data)
    out: list[p2p.Message] = []
    for i in range(0, len(data), chunk):
        out += decoder.feed(data[i : i + chunk])
    assert not decoder.in_frame
    return out


# --- golden vectors ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vectors_encode_exactly(name: str) -> None:
    msg, hexdata = GOLDEN[name]
    assert p2p.encode_bytes(msg).hex() == hexdata


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_golden_vectors_decode_whole_and_byte_by_byte(name: str, chunk: int | None) -> None:
    msg, hexdata = GOLDEN[name]
    assert _decode_all(bytes.fromhex(hexdata), chunk) == [msg]


def test_golden_tensor_layout_is_aligned_little_endian() -> None:
    data = bytes.fromhex(GOLDEN["tensors"][1])
    body_len, header_len = struct.unpack_from("<II", data)
    assert body_len == len(data) - 4
    header = msgpack.unpackb(data[8 : 8 + header_len])
    assert header == [1, "test.golden", {"session_id": "s1", "positions_start": 7, "tokens": [1, 2, 3], "scale": 0.5},
                      [["hidden", "bfloat16", [2, 3]], ["mask", "int64", [2]]]]
    body = data[4:]
    hidden_at = 4 + header_len + (-(4 + header_len) % 8)
    assert hidden_at % 8 == 0
    assert body[hidden_at : hidden_at + 12] == BF16.view(torch.uint8).numpy().tobytes()
    assert struct.unpack_from("<qq", body, hidden_at + 16) == (5, -1)


# --- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
)
def test_tensor_round_trip_every_dtype(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 10).to(dtype)
    msg = Golden("x", 0, p2p.Tensor.from_torch(t))
    (out,) = _decode_all(p2p.encode_bytes(msg), chunk=5)
    back = out.hidden.to_torch()
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_received_tensors_are_zero_copy_views_of_the_frame() -> None:
    t = torch.arange(1024, dtype=torch.float32).reshape(32, 32)
    decoder = p2p.FrameDecoder()
    (out,) = decoder.feed(p2p.encode_bytes(Golden("x", 0, p2p.Tensor.from_torch(t))))
    a, b = out.hidden.to_torch(), out.hidden.to_torch()
    a[0, 0] = 42.0  # same memory: the second view sees the write
    assert b[0, 0].item() == 42.0 and not out.hidden.data.readonly


def test_sending_does_not_copy_tensor_bytes() -> None:
    t = torch.zeros(1 << 16)
    buffers = p2p.encode(Golden("x", 0, p2p.Tensor.from_torch(t)))
    assert len(buffers) == 2 and isinstance(buffers[1], memoryview)
    t[3] = 7.0
    assert bytes(buffers[1][12:16]) == struct.pack("<f", 7.0)


def test_non_contiguous_and_empty_tensors() -> None:
    t = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    assert torch.equal(p2p.Tensor.from_torch(t).to_torch(), t)
    empty = p2p.Tensor.from_torch(torch.zeros(0, 4))
    (out,) = _decode_all(p2p.encode_bytes(Golden("x", 0, empty)), chunk=3)
    assert out.hidden.to_torch().shape == (0, 4)


def test_all_field_kinds_round_trip_and_normalize_to_tuples() -> None:
    msg = Everything(
        flag=True, ratio=2, blob=b"\x00\xff", pair=[1, "a"], names=["x", "y"], table={"k": [1, 2]},
        loads=[Load("p", 3)], anything={"a": [1, b"b", None]}, note=None,
    )
    assert msg.ratio == 2.0 and type(msg.ratio) is float
    assert msg.pair == (1, "a") and msg.names == ("x", "y") and msg.table == {"k": (1, 2)}
    (out,) = _decode_all(p2p.encode_bytes(msg), chunk=2)
    assert out == msg and out.loads[0] == Load("p", 3) and out.anything == {"a": (1, b"b", None)}


# --- validation at construction -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, complaint",
    [
        (dict(session_id="x" * 17), "max_len"),
        (dict(session_id=3), "expected str"),
        (dict(positions_start=-1), "min_value"),
        (dict(positions_start=True), "expected int"),
        (dict(positions_start=1.0), "expected int"),
        (dict(hidden=p2p.Tensor.from_torch(torch.zeros(2, 2, dtype=torch.float16))), "dtype"),
        (dict(hidden=p2p.Tensor.from_torch(torch.zeros(4))), "dimensions"),
        (dict(hidden=p2p.Tensor.from_torch(torch.zeros(64, 64))), "max_numel"),
        (dict(hidden=torch.zeros(2, 2)), "p2p.Tensor"),
    ],
)
def test_invalid_fields_raise_local_protocol_error(kwargs: dict, complaint: str) -> None:
    good = dict(session_id="s", hidden=p2p.Tensor.from_torch(torch.zeros(2, 2)), positions_start=0)
    with pytest.raises(p2p.LocalProtocolError, match=complaint):
        Step(**{**good, **kwargs})


def test_tensor_validation() -> None:
    with pytest.raises(p2p.LocalProtocolError, match="needs 16"):
        p2p.Tensor("float32", (2, 2), b"\x00" * 15)
    with pytest.raises(p2p.LocalProtocolError, match="unknown tensor dtype"):
        p2p.Tensor("complex64", (1,), b"\x00" * 8)
    with pytest.raises(p2p.LocalProtocolError, match="non-negative"):
        p2p.Tensor("uint8", (-1,), b"")


def test_validate_hook_and_definition_errors() -> None:
    @p2p.message("test.ranged")
    @dataclass(frozen=True)
    class Ranged(p2p.Message):
        start: int
        end: int

        def validate(self) -> None:
            if self.end < self.start:
                raise ValueError("end before start")

    with pytest.raises(p2p.LocalProtocolError, match="end before start"):
        Ranged(5, 1)
    with pytest.raises(TypeError, match="unsupported field annotation"):

        @p2p.message("test.bad")
        @dataclass(frozen=True)
        class Bad(p2p.Message):
            value: complex

    with pytest.raises(TypeError, match="already used"):

        @p2p.message("test.golden")
        @dataclass(frozen=True)
        class Clash(p2p.Message):
            x: int

    with pytest.raises(TypeError, match="reserved"):
        p2p.message("p2p.mine")
    with pytest.raises(TypeError, match="frozen"):

        @p2p.message("test.mutable")
        @dataclass
        class Mutable(p2p.Message):
            x: int


def test_unregistered_and_oversized_messages_are_refused_locally() -> None:
    with pytest.raises(p2p.LocalProtocolError, match="not a registered"):
        p2p.encode(Load("p", 1))
    big = Golden("x", 0, p2p.Tensor.from_torch(torch.zeros(1024)))
    with pytest.raises(p2p.LocalProtocolError, match="frame is"):
        p2p.encode(big, max_frame_size=1000)


# --- garbage from the peer -----------------------------------------------------------------------
def _frame(header: object, tensor: bytes | None = None, *, raw_header: bytes | None = None, pad: int = 0, extra: bytes = b"") -> bytes:
    """A hand-made frame: `tensor` bytes are placed at the next 8-byte boundary (padding made
    of `pad` bytes), `extra` appended after everything."""
    h = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    body = struct.pack("<I", len(h)) + h
    if tensor is not None:
        body += bytes([pad]) * (-len(body) % 8) + tensor
    body += extra
    return struct.pack("<I", len(body)) + body


GOOD_FIELDS = {"session_id": "s", "positions_start": 0}
ONE_BY_ONE = [["hidden", "float32", [1, 1]]]
GOOD_HEADER = [1, "test.step", GOOD_FIELDS, ONE_BY_ONE]
ONE_FLOAT = struct.pack("<f", 1.0)
assert (4 + len(msgpack.packb(GOOD_HEADER))) % 8, "the padding case below needs a non-aligned header"


@pytest.mark.parametrize(
    "data, complaint",
    [
        (struct.pack("<I", 2**31), "exceeds"),
        (struct.pack("<I", 2), "too short"),
        (_frame(None, raw_header=b"\xc1"), "not valid msgpack"),
        (_frame({"not": "a list"}), "4-element array"),
        (_frame([2, "test.step", {}, []]), "wire version"),
        (_frame([1, "no.such.type", {}, []]), "unknown message type"),
        (_frame([1, "test.step", [], []]), "must be a map"),
        (_frame([1, "test.step", GOOD_FIELDS, []]), "missing fields"),
        (_frame([1, "test.step", {**GOOD_FIELDS, "extra": 1}, ONE_BY_ONE], ONE_FLOAT), "unknown fields"),
        (_frame([1, "test.step", {**GOOD_FIELDS, "session_id": 5}, ONE_BY_ONE], ONE_FLOAT), "expected str"),
        (_frame([1, "test.step", {**GOOD_FIELDS, "positions_start": -3}, ONE_BY_ONE], ONE_FLOAT), "min_value"),
        (_frame([1, "test.step", GOOD_FIELDS, [["hidden", "float32", [1, 2]]]], ONE_FLOAT), "needs 8 bytes"),
        (_frame([1, "test.step", GOOD_FIELDS, [["hidden", "float99", [1, 1]]]], ONE_FLOAT), "unknown tensor dtype"),
        (_frame([1, "test.step", GOOD_FIELDS, [["hidden", "float32", [-1]]]], ONE_FLOAT), "invalid tensor shape"),
        (_frame([1, "test.step", GOOD_FIELDS, [["session_id", "float32", [1, 1]]]], ONE_FLOAT), "not a tensor field"),
        (_frame([1, "test.step", GOOD_FIELDS, [["hidden", "float16", [1, 2]]]], ONE_FLOAT), "dtype float16 not in"),
        (_frame(GOOD_HEADER, ONE_FLOAT, extra=b"\x00"), "unexpected bytes"),
        (_frame(GOOD_HEADER, ONE_FLOAT, pad=1), "padding"),
        (_frame(None, raw_header=msgpack.packb(GOOD_HEADER) + b"\x00"), "not valid msgpack"),
        (_frame([1, "test.everything", {"anything": msgpack.ExtType(5, b"x")}, []]), "not valid msgpack"),
    ],
)
def test_invalid_frames_raise_remote_protocol_error(data: bytes, complaint: str) -> None:
    decoder = p2p.FrameDecoder()
    with pytest.raises(p2p.RemoteProtocolError, match=complaint):
        decoder.feed(data)
    with pytest.raises(p2p.RemoteProtocolError):  # stays failed
        decoder.feed(p2p.encode_bytes(p2p.Heartbeat()))


def test_well_formed_reference_frame_decodes() -> None:
    (msg,) = p2p.FrameDecoder().feed(_frame(GOOD_HEADER, ONE_FLOAT))
    assert msg.hidden.to_torch().item() == 1.0


def test_oversized_frame_is_refused_from_its_prefix_alone() -> None:
    decoder = p2p.FrameDecoder(max_frame_size=1024)
    with pytest.raises(p2p.RemoteProtocolError, match="exceeds the 1024-byte limit"):
        decoder.feed(struct.pack("<I", 1025))


def test_truncated_frame_is_never_delivered() -> None:
    data = p2p.encode_bytes(GOLDEN["tensors"][0])
    for cut in (1, 4, 9, len(data) - 1):
        decoder = p2p.FrameDecoder()
        assert decoder.feed(data[:cut]) == []
        assert decoder.in_frame
        with pytest.raises(p2p.RemoteProtocolError, match="inside a frame"):
            decoder.feed_eof()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_random_bytes_only_ever_raise_remote_protocol_error(data: bytes, chunk: int) -> None:
    decoder = p2p.FrameDecoder(max_frame_size=4096)
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
        decoder.feed_eof()
    except p2p.RemoteProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_frames_decode_or_raise_remote_protocol_error(data: st.DataObject) -> None:
    frame = bytearray(bytes.fromhex(GOLDEN["tensors"][1]))
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = p2p.FrameDecoder(max_frame_size=4096).feed(bytes(frame))
        assert all(isinstance(m, p2p.Message) for m in out)
    except p2p.RemoteProtocolError:
        pass


# --- compiled codecs against the generic code ----------------------------------------------------
@p2p.message("test.compiled")
@dataclass(frozen=True)
class Compiled(p2p.Message):
    """Every simple kind, optional ones with defaults, two tensors, and a cross-field check."""

    sid: str = p2p.field(max_len=8)
    step: int = p2p.field(min_value=0, max_value=1000)
    hidden: p2p.Tensor = p2p.field(dtypes=("float32", "bfloat16"), ndim=2, max_numel=64)
    blob: bytes = p2p.field(min_len=1, max_len=4)
    push: bool = True
    mask: p2p.Tensor | None = None
    note: str | None = p2p.field(default=None, max_len=4)

    def validate(self) -> None:
        if self.step == 13:
            raise ValueError("unlucky step")


def test_simple_message_classes_get_a_compiled_codec_and_others_do_not() -> None:
    from p2p._wire import _codec

    assert _codec(Compiled) is not None and _codec(Step) is not None
    assert _codec(Everything) is None and _codec(Golden) is None  # floats, lists, maps, nesting


_DTYPES = st.sampled_from(["float32", "bfloat16", "int64", "float16"])
_SHAPES = st.lists(st.integers(0, 5), max_size=3)
_WIRE_SHAPES = st.lists(st.integers(-1, 5), max_size=3)  # (a negative size, as a peer may send)


@st.composite
def _compiled_messages(draw: st.DrawFn) -> Compiled:
    def tensor(dtype: str, shape: list[int]) -> p2p.Tensor:
        return p2p.Tensor.from_torch(torch.zeros(shape, dtype=getattr(torch, dtype)))

    mask = draw(st.none() | st.builds(tensor, _DTYPES, _SHAPES))
    return Compiled(draw(st.text(max_size=8)), draw(st.integers(0, 1000).filter(lambda s: s != 13)),
                    tensor(draw(st.sampled_from(["float32", "bfloat16"])), draw(st.lists(st.integers(0, 4), min_size=2, max_size=2))),
                    draw(st.binary(min_size=1, max_size=4)), draw(st.booleans()), mask,
                    draw(st.none() | st.text(max_size=4)))


@settings(max_examples=200, deadline=None)
@given(_compiled_messages())
def test_compiled_encoder_writes_the_generic_bytes(msg: Compiled) -> None:
    from p2p._wire import _encode_generic

    assert b"".join(p2p.encode(msg)) == b"".join(_encode_generic(msg, p2p.constants.MAX_FRAME_SIZE))
    (back,) = p2p.FrameDecoder().feed(p2p.encode_bytes(msg))
    assert back == msg


_ANY_VALUE = st.none() | st.booleans() | st.integers(-5, 1005) | st.text(max_size=10) | st.binary(max_size=6) \
    | st.floats(allow_nan=False) | st.lists(st.integers(0, 3), max_size=3)


@st.composite
def _compiled_bodies(draw: st.DrawFn) -> bytes:
    """A Compiled frame body: valid, or with one thing drawn wrong (a field's type or range, a
    missing, extra or renamed field or descriptor, misordered tensors, a descriptor's dtype or
    shape, non-zero padding, a payload short or long, a failing cross-field check)."""
    fields: dict = {"sid": draw(st.text(max_size=8)), "step": draw(st.integers(0, 1000).filter(lambda s: s != 13)),
                    "blob": draw(st.binary(min_size=1, max_size=4)), "push": draw(st.booleans())}
    if draw(st.booleans()):
        fields["note"] = draw(st.none() | st.text(max_size=4))
    descriptors: list[list] = [["hidden", draw(st.sampled_from(["float32", "bfloat16"])),
                                draw(st.lists(st.integers(0, 4), min_size=2, max_size=2))]]
    if draw(st.booleans()):
        descriptors.append(["mask", draw(_DTYPES), draw(_WIRE_SHAPES)])
    pad_byte, extra, cut = 0, b"", False
    wrong = draw(st.sampled_from(["nothing", "nothing", "value", "missing", "extra", "descriptor", "order",
                                  "padding", "extra bytes", "cut", "check"]))
    if wrong == "value":
        fields[draw(st.sampled_from(["sid", "step", "blob", "push", "note"]))] = draw(_ANY_VALUE)
    elif wrong == "missing":
        fields.pop(draw(st.sampled_from(sorted(fields))))
    elif wrong == "extra":
        fields[draw(st.sampled_from(["mask", "hidden", "other"]))] = draw(_ANY_VALUE)
    elif wrong == "descriptor":
        descriptors[-1][draw(st.integers(0, 2))] = draw(_ANY_VALUE | _DTYPES | _WIRE_SHAPES)
    elif wrong == "order":
        descriptors.insert(0, ["mask", "float32", [1]])
    elif wrong == "padding":
        pad_byte = draw(st.integers(1, 255))
    elif wrong == "extra bytes":
        extra = draw(st.binary(min_size=1, max_size=9))
    elif wrong == "check":
        fields["step"] = 13
    cut = wrong == "cut"
    header = msgpack.packb([1, "test.compiled", fields, descriptors], use_bin_type=True)
    body = struct.pack("<I", len(header)) + header
    for _, dtype, shape in descriptors:
        try:
            size = min(math.prod(shape) * p2p.DTYPE_SIZES[dtype], 4096)
        except (TypeError, KeyError):
            size = 4
        body += bytes([pad_byte]) * (-len(body) % 8) + bytes(range(size % 256)) + bytes(max(0, size - 256))
    body += extra
    return body[:-1] if cut else body


def _outcome(body: bytes, fast: bool) -> object:
    from p2p._wire import decode_body

    try:
        return decode_body(bytearray(body), fast=fast)
    except p2p.RemoteProtocolError as exc:
        return ("refused", str(exc))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_compiled_bodies())
def test_compiled_decoder_answers_exactly_like_the_generic_one(body: bytes) -> None:
    assert _outcome(body, True) == _outcome(body, False)


def test_compiled_decoder_refuses_negative_dimensions_whose_product_fits() -> None:
    fields = {"sid": "a", "step": 1, "blob": b"x", "push": True}
    header = msgpack.packb([1, "test.compiled", fields, [["hidden", "float32", [-1, -1]]]], use_bin_type=True)
    body = struct.pack("<I", len(header)) + header
    body += bytes(-len(body) % 8) + bytes(4)  # the 4 bytes that [-1, -1] float32 would claim
    assert _outcome(body, True) == _outcome(body, False) == ("refused", "invalid tensor shape for 'hidden'")


# --- the session state machine -------------------------------------------------------------------
def test_session_protocol_goodbye_state_machine() -> None:
    a, b = p2p.SessionProtocol(), p2p.SessionProtocol()
    wire = b"".join(a.send(p2p.ErrorMessage("x")) + a.heartbeat() + a.goodbye())
    assert a.our_state is State.DONE
    with pytest.raises(p2p.LocalProtocolError, match="already said goodbye"):
        a.send(p2p.Heartbeat())
    with pytest.raises(p2p.LocalProtocolError, match="already said goodbye"):
        a.goodbye()
    received = []
    for byte in wire:  # one byte at a time
        received += b.receive_data(bytes([byte]))
    assert received == [p2p.ErrorMessage("x"), p2p.Goodbye()]  # heartbeat consumed
    assert b.their_state is State.DONE
    b.receive_eof()  # a clean end
    with pytest.raises(p2p.RemoteProtocolError, match="after its goodbye"):
        b.receive_data(p2p.encode_bytes(p2p.ErrorMessage("late")))


def test_session_protocol_eof_without_goodbye_or_mid_frame_is_peer_broken() -> None:
    a = p2p.SessionProtocol()
    a.receive_data(p2p.encode_bytes(p2p.ErrorMessage("x")))
    with pytest.raises(p2p.PeerBrokenError, match="without a goodbye"):
        a.receive_eof()
    b = p2p.SessionProtocol()
    b.receive_data(p2p.encode_bytes(p2p.ErrorMessage("x"))[:-3])
    with pytest.raises(p2p.PeerBrokenError, match="mid-frame"):
        b.receive_eof()


def test_session_protocol_refuses_non_messages() -> None:
    with pytest.raises(p2p.LocalProtocolError, match="p2p.Message"):
        p2p.SessionProtocol().send(b"raw bytes")  # type: ignore[arg-type]


def test_big_frames_decode_in_any_chunking_even_from_reused_buffers() -> None:
    """Frames above PREALLOCATE_LIMIT are assembled from their pieces: pieces of immutable
    bytes are kept as views, pieces of a caller's reusable buffer are copied."""
    t = torch.arange((p2p.constants.PREALLOCATE_LIMIT // 4) + 1000, dtype=torch.float32)
    data = p2p.encode_bytes(Golden("big", 0, p2p.Tensor.from_torch(t)))
    assert len(data) > p2p.constants.PREALLOCATE_LIMIT
    for chunk in (65507, 1 << 20, 99991):
        decoder = p2p.FrameDecoder()
        out = []
        scratch = bytearray(chunk)
        for i in range(0, len(data), chunk):
            piece = data[i : i + chunk]
            if (i // chunk) % 2:  # every other piece comes in a buffer the caller then reuses
                view = memoryview(scratch)[: len(piece)]
                view[:] = piece
                out += decoder.feed(view)
                view[:] = b"\xff" * len(piece)
            else:
                out += decoder.feed(piece)
        assert len(out) == 1 and torch.equal(out[0].hidden.to_torch(), t)
