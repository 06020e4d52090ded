"""The frame format, sans-IO: `encode(msg)` gives buffers, `FrameDecoder.feed(data)` gives messages.

Wire format (all integers little-endian; pinned by tests/test_p2p_wire.py golden vectors)::

    frame  := body_len:u32  body                       body_len <= max_frame_size
    body   := header_len:u32  header  (pad  tensor)*   header_len <= MAX_HEADER_SIZE
    header := msgpack [version=1, type_tag:str, fields:{str: value}, tensors:[[name, dtype, shape]]]
    pad    := zero bytes so that each tensor starts at a multiple of 8 from the body start

`tensors` lists the message's non-None `Tensor` fields in declaration order; their bytes follow
the header in that order (``numel * itemsize`` each, C order, little-endian) and end the body
exactly. Every check is strict: unknown type tags, unknown or missing fields, wrong types,
non-zero padding, trailing or missing bytes are all `RemoteProtocolError`. msgpack extension
types are refused; nothing is ever unpickled.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack

from ._constants import (
    FRAME_PREFIX_SIZE,
    HEADER_LEN_SIZE,
    MAX_FRAME_SIZE,
    MAX_HEADER_SIZE,
    MAX_TENSOR_NDIM,
    MAX_TENSORS_PER_MESSAGE,
    PREALLOCATE_LIMIT,
    TENSOR_ALIGNMENT,
    WIRE_VERSION,
)
from ._errors import LocalProtocolError, RemoteProtocolError
from ._messages import REGISTRY, Message, _construct, _Invalid, _spec
from ._tensor import DTYPE_SIZES, Tensor

__all__ = ["encode", "encode_bytes", "FrameDecoder"]

_PREFIX = struct.Struct("<II")  # body_len, header_len
_ZEROS = bytes(TENSOR_ALIGNMENT)
def _pack_default(obj: Any) -> Any:
    if isinstance(obj, Message):
        if isinstance(obj, Message) and _spec(type(obj)).tensor_fields:
            raise TypeError("nested messages cannot carry tensors")
        return {f.name: getattr(obj, f.name) for f in _spec(type(obj)).fields}
    raise TypeError(f"cannot encode {type(obj).__name__}")


# --- compiled codecs ---------------------------------------------------------------------------
# A message class whose fields are all of the simple kinds (those with a fast test, see
# `_messages._fast_test`: ints, bools, strs, bytes, tensors, optional ones) gets an encoder and
# a decoder compiled from its fields on first use: straight-line code, no loop over the field
# specs, no dict of values handed to the dataclass constructor. The generic code below stays
# the definition. A compiled function returns None whenever its case is not the plain one
# (a value that a check would refuse or normalize, a missing optional field, a tensor that is
# None, a frame too big), and the generic code then runs and answers or reports exactly as it
# always does. tests/test_p2p_wire.py checks both against each other.
class _Codec:
    __slots__ = ("encode", "decode")

    def __init__(self, encode: Any, decode: Any) -> None:
        self.encode = encode
        self.decode = decode


def _codec(cls: type[Message]) -> _Codec | None:
    """The compiled codec of a registered message class (compiled on first use), or None."""
    codec = cls.__dict__.get("_p2p_codec")
    if codec is None:
        codec = _compile_codec(cls) or False
        setattr(cls, "_p2p_codec", codec)
    return codec or None


def _compile_codec(cls: type[Message]) -> _Codec | None:
    spec = _spec(cls)
    if spec.tests is None or spec.test_env is None:
        return None
    tests = dict(zip((f.name for f in spec.fields), spec.tests))
    plain = [f.name for f in spec.fields if not f.is_tensor]
    tensors = [f.name for f in spec.fields if f.is_tensor]
    env: dict[str, Any] = dict(spec.test_env)
    env.update(_cls=cls, _tag=cls.TYPE, _new=object.__new__, _set=object.__setattr__, _packb=msgpack.packb,
               _PREFIX=_PREFIX, _ZEROS=_ZEROS, _SIZES=DTYPE_SIZES, _trusted=Tensor._trusted, _prod=math.prod)

    enc = ["def encode(msg, max_frame_size):"]
    for i, name in enumerate(tensors):
        enc += [f"    t{i} = msg.{name}", f"    if t{i} is None:", "        return None"]
    header_fields = "{" + ", ".join(f"{name!r}: msg.{name}" for name in plain) + "}"
    descriptors = "[" + ", ".join(f"[{name!r}, t{i}.dtype, list(t{i}.shape)]" for i, name in enumerate(tensors)) + "]"
    enc += ["    try:",
            f"        header = _packb([{WIRE_VERSION}, _tag, {header_fields}, {descriptors}], use_bin_type=True)",
            "    except Exception:",
            "        return None",
            "    header_len = len(header)",
            f"    if header_len > {MAX_HEADER_SIZE}:",
            "        return None",
            f"    pos = {HEADER_LEN_SIZE} + header_len",
            "    out = [None]"]
    for i in range(len(tensors)):
        enc += [f"    pad = -pos % {TENSOR_ALIGNMENT}"]
        enc += ["    first_pad = pad"] if i == 0 else ["    if pad:", "        out.append(_ZEROS[:pad])"]
        enc += [f"    n = t{i}.data.nbytes", "    pos += pad + n", "    if n:", f"        out.append(t{i}.data)"]
    if not tensors:
        enc += ["    first_pad = 0"]
    enc += ["    if pos > max_frame_size:",
            "        return None",
            "    out[0] = _PREFIX.pack(pos, header_len) + header + _ZEROS[:first_pad]",
            "    return out"]

    dec = ["def decode(fields, descriptors, view, pos, size):",
           f"    if len(fields) != {len(plain)} or len(descriptors) != {len(tensors)}:",
           "        return None"]
    if plain:
        dec += ["    try:"]
        dec += [f"        f{i} = fields[{name!r}]" for i, name in enumerate(plain)]
        dec += ["    except KeyError:", "        return None"]
    for i, name in enumerate(plain):
        dec += [f"    v = f{i}", f"    if not {tests[name]}:", "        return None"]
    for i, name in enumerate(tensors):
        dec += ["    d = descriptors[%d]" % i,
                f"    if type(d) is not list or len(d) != 3 or d[0] != {name!r}:",
                "        return None",
                "    dtype = d[1]",
                "    shape = d[2]",
                f"    if type(dtype) is not str or type(shape) is not list or len(shape) > {MAX_TENSOR_NDIM}:",
                "        return None",
                "    n = _SIZES.get(dtype)",
                "    if n is None:",
                "        return None",
                "    for dim in shape:",
                "        if type(dim) is not int or dim < 0:",
                "            return None",
                f"    pad = -pos % {TENSOR_ALIGNMENT}",
                "    if pad:",
                "        if pos + pad > size or any(view[pos:pos + pad]):",
                "            return None",
                "        pos += pad",
                "    n *= _prod(shape)",
                "    if n > size - pos:",
                "        return None",
                "    v = _trusted(dtype, tuple(shape), view[pos:pos + n])",
                "    pos += n",
                f"    if not {tests[name]}:",
                "        return None",
                f"    t{i} = v"]
    dec += ["    if pos != size:", "        return None", "    msg = _new(_cls)"]
    dec += [f"    _set(msg, {name!r}, f{i})" for i, name in enumerate(plain)]
    dec += [f"    _set(msg, {name!r}, t{i})" for i, name in enumerate(tensors)]
    dec += ["    try:", "        msg.validate()", "    except Exception:", "        return None", "    return msg"]

    exec("\n".join(enc) + "\n\n" + "\n".join(dec), env)  # noqa: S102 - built from field names and limits
    return _Codec(env["encode"], env["decode"])


def encode(msg: Message, *, max_frame_size: int = MAX_FRAME_SIZE) -> list[bytes | memoryview]:
    """The frame for `msg` as a list of buffers; tensor bytes are not copied.

    Raises `LocalProtocolError` if the message type is not registered or the frame is too big.
    """
    cls = type(msg)
    if REGISTRY.get(cls.TYPE) is cls:
        codec = _codec(cls)
        if codec is not None:
            out = codec.encode(msg, max_frame_size)
            if out is not None:
                return out
    return _encode_generic(msg, max_frame_size)


def _encode_generic(msg: Message, max_frame_size: int) -> list[bytes | memoryview]:
    cls = type(msg)
    if not cls.TYPE or REGISTRY.get(cls.TYPE) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message type (use @p2p.message)")
    spec = _spec(cls)
    fields: dict[str, Any] = {}
    tensors: list[tuple[str, Tensor]] = []
    for f in spec.fields:
        value = getattr(msg, f.name)
        if f.is_tensor and value is not None:
            tensors.append((f.name, value))
        else:
            fields[f.name] = value
    descriptors = [[name, t.dtype, list(t.shape)] for name, t in tensors]
    try:
        header = msgpack.packb([WIRE_VERSION, cls.TYPE, fields, descriptors], use_bin_type=True, default=_pack_default)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {cls.__name__}: {exc}") from exc
    if len(header) > MAX_HEADER_SIZE:
        raise LocalProtocolError(f"{cls.__name__} header is {len(header)} bytes, max {MAX_HEADER_SIZE}")

    pos = HEADER_LEN_SIZE + len(header)  # offset from the body start
    first_pad = 0
    tail: list[bytes | memoryview] = []
    for i, (_, t) in enumerate(tensors):
        pad = -pos % TENSOR_ALIGNMENT
        if i == 0:
            first_pad = pad
        elif pad:
            tail.append(_ZEROS[:pad])
        pos += pad
        if t.nbytes:
            tail.append(t.data)
        pos += t.nbytes
    if pos > max_frame_size:
        raise LocalProtocolError(f"{cls.__name__} frame is {pos} bytes, max {max_frame_size}")
    return [_PREFIX.pack(pos, len(header)) + header + _ZEROS[:first_pad], *tail]


def encode_bytes(msg: Message, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """The frame for `msg` as one bytes object (copies tensor bytes)."""
    return b"".join(encode(msg, max_frame_size=max_frame_size))


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_body(body: bytearray | bytes | memoryview, registry: dict[str, type[Message]] | None = None,
                *, fast: bool = True) -> Message:
    """Decode one frame body (without its length prefix). Tensors alias `body`. `fast=False`
    skips the compiled decoder (the tests compare the two)."""
    registry = REGISTRY if registry is None else registry
    view = memoryview(body)
    size = view.nbytes
    if size < HEADER_LEN_SIZE:
        raise RemoteProtocolError(f"frame body of {size} bytes is too short")
    header_len = int.from_bytes(view[:HEADER_LEN_SIZE], "little")
    if header_len > MAX_HEADER_SIZE or HEADER_LEN_SIZE + header_len > size:
        raise RemoteProtocolError(f"header length {header_len} does not fit a {size}-byte body")
    try:
        header = msgpack.unpackb(
            view[HEADER_LEN_SIZE : HEADER_LEN_SIZE + header_len],
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_reject_ext,
            timestamp=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise RemoteProtocolError(f"header is not valid msgpack: {exc}") from None
    if not (isinstance(header, list) and len(header) == 4):
        raise RemoteProtocolError("header must be a 4-element array")
    version, tag, fields, descriptors = header
    if version != WIRE_VERSION or type(version) is not int:
        raise RemoteProtocolError(f"unsupported wire version {version!r}")
    if type(tag) is not str:
        raise RemoteProtocolError("message type tag must be a string")
    cls = registry.get(tag)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {tag[:64]!r}")
    if type(fields) is not dict:
        raise RemoteProtocolError("message fields must be a map")
    if type(descriptors) is not list or len(descriptors) > MAX_TENSORS_PER_MESSAGE:
        raise RemoteProtocolError("tensor descriptors must be a short array")

    pos = HEADER_LEN_SIZE + header_len
    if fast:
        codec = _codec(cls)
        if codec is not None:
            msg = codec.decode(fields, descriptors, view, pos, size)
            if msg is not None:
                return msg
    spec = _spec(cls)
    tensor_names = spec.tensor_fields
    next_index = 0
    values = dict(fields)
    for desc in descriptors:
        if not (type(desc) is list and len(desc) == 3):
            raise RemoteProtocolError("tensor descriptor must be [name, dtype, shape]")
        name, dtype, shape = desc
        if type(name) is not str or name not in tensor_names[next_index:]:
            raise RemoteProtocolError(f"tensor {str(name)[:64]!r} is not a tensor field of {tag} (or out of order)")
        next_index = tensor_names.index(name) + 1
        if name in values:
            raise RemoteProtocolError(f"tensor field {name!r} also appears in the header fields")
        if type(dtype) is not str or dtype not in DTYPE_SIZES:
            raise RemoteProtocolError(f"unknown tensor dtype {str(dtype)[:32]!r}")
        if type(shape) is not list or len(shape) > MAX_TENSOR_NDIM or any(type(d) is not int or d < 0 for d in shape):
            raise RemoteProtocolError(f"invalid tensor shape for {name!r}")
        pad = -pos % TENSOR_ALIGNMENT
        if pos + pad > size or any(view[pos : pos + pad]):
            raise RemoteProtocolError("tensor padding is missing or not zero")
        pos += pad
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if nbytes > size - pos:
            raise RemoteProtocolError(f"tensor {name!r} needs {nbytes} bytes, the frame has {size - pos} left")
        values[name] = Tensor._trusted(dtype, tuple(shape), view[pos : pos + nbytes])
        pos += nbytes
    if pos != size:
        raise RemoteProtocolError(f"{size - pos} unexpected bytes after the message payload")
    try:
        return _construct(cls, spec, values)
    except (_Invalid, LocalProtocolError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"invalid {tag} message: {exc}") from None


class FrameDecoder:
    """Incremental frame decoder: feed it bytes in any chunking, get whole messages out.

    A length prefix above `max_frame_size` is refused before any of the body is buffered. When
    a chunk holds whole messages followed by invalid bytes, `feed` returns those messages and
    keeps the error in `error`, raising it from the next call; a chunk with no message before the
    invalid bytes raises at once. After an error the decoder stays failed. `feed_eof()` tells
    whether the stream ended at a frame boundary.
    """

    def __init__(self, *, max_frame_size: int = MAX_FRAME_SIZE, registry: dict[str, type[Message]] | None = None):
        self.max_frame_size = max_frame_size
        self.limit_reason = ""  # what the limit is, for the error (a session's own, say); "" says nothing
        self.frames = 0  # frames completed so far (a session's watchdog tells frames apart by it)
        self._registry = registry
        self._prefix = bytearray()
        self._expected = 0  # body length of the frame in progress; 0 between frames
        self._filled = 0
        self._body: bytearray | None = None  # small frames: the whole body, allocated up front
        self._parts: list[bytes | memoryview] = []  # big frames: the pieces received so far
        self._error: RemoteProtocolError | None = None

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has been received (EOF now would truncate it)."""
        return bool(self._prefix) or self._expected > 0

    @property
    def pending(self) -> tuple[int, int]:
        """(bytes received, bytes expected) of the frame in progress; (0, 0) between frames."""
        if not self._expected:
            return (len(self._prefix), FRAME_PREFIX_SIZE if self._prefix else 0)
        return (FRAME_PREFIX_SIZE + self._filled, FRAME_PREFIX_SIZE + self._expected)

    @property
    def error(self) -> RemoteProtocolError | None:
        """The protocol error that stopped this decoder, if any."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        if self._error is not None:
            raise self._error
        if not self._expected and not self._prefix and type(data) is bytes and len(data) > FRAME_PREFIX_SIZE:
            # the usual case on a lane (a record is a frame): exactly one whole small frame
            length = int.from_bytes(data[:FRAME_PREFIX_SIZE], "little")
            if length == len(data) - FRAME_PREFIX_SIZE and HEADER_LEN_SIZE <= length <= PREALLOCATE_LIMIT \
                    and length <= self.max_frame_size:
                self.frames += 1
                try:
                    return [decode_body(bytearray(memoryview(data)[FRAME_PREFIX_SIZE:]), self._registry)]
                except RemoteProtocolError as exc:
                    self._error = exc
                    raise
        out: list[Message] = []
        try:
            self._feed(memoryview(data).cast("B"), out, type(data) is bytes)
        except RemoteProtocolError as exc:
            self._error = exc
            self._body, self._parts = None, []
            if not out:
                raise
        return out

    def _feed(self, view: memoryview, out: list[Message], immutable: bool) -> None:
        while view.nbytes:
            if not self._expected:
                need = FRAME_PREFIX_SIZE - len(self._prefix)
                self._prefix += view[:need]
                view = view[need:]
                if len(self._prefix) < FRAME_PREFIX_SIZE:
                    break
                length = int.from_bytes(self._prefix, "little")
                self._prefix.clear()
                if length > self.max_frame_size:
                    why = f" ({self.limit_reason})" if self.limit_reason else ""
                    raise RemoteProtocolError(f"frame of {length} bytes exceeds the {self.max_frame_size}-byte "
                                              f"limit{why}")
                if length < HEADER_LEN_SIZE:
                    raise RemoteProtocolError(f"frame of {length} bytes is too short")
                self._expected, self._filled = length, 0
                # Small bodies are allocated at once. Big ones are kept as the pieces that
                # arrive and joined into one buffer at the end (one copy, no reallocation), so a
                # peer cannot make us reserve a large buffer with a 4-byte lie.
                self._body = bytearray(length) if length <= PREALLOCATE_LIMIT else None
            take = min(view.nbytes, self._expected - self._filled)
            if self._body is not None:
                self._body[self._filled : self._filled + take] = view[:take]
            else:
                # pieces of an immutable bytes object can be kept as views; anything else may
                # be reused by the caller and is copied
                self._parts.append(view[:take] if immutable else bytes(view[:take]))
            self._filled += take
            view = view[take:]
            if self._filled == self._expected:
                if self._body is not None:
                    body, self._body = self._body, None
                else:
                    body, self._parts = bytearray().join(self._parts), []
                self._expected = 0
                self.frames += 1
                out.append(decode_body(body, self._registry))

    def feed_eof(self) -> None:
        """Raise `RemoteProtocolError` if the stream ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self.in_frame:
            got, expected = self.pending
            self._error = RemoteProtocolError(f"stream ended inside a frame ({got} of {expected} bytes)")
            raise self._error
