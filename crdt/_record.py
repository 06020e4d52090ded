"""Server records, their canonical encoding, and signatures.

A `ServerRecord` is what one server says about itself. It is a frozen value validated at
construction (types, ranges, per-field limits chosen so every valid record encodes to well under
`MAX_RECORD_BYTES`). A `SignedRecord` wraps it with the peer's libp2p Ed25519 public key and a
signature over `SIGNING_DOMAIN || body`, where `body` is the record's canonical msgpack encoding:
a fixed-order array, smallest int encodings, float64 floats, `bin` for bytes, `str` for text. The
decoder re-encodes what it parsed and refuses anything that is not byte-identical, so every record
has exactly one encoding and the signature covers exactly the bytes that were read.

Wire form of a signed record (pinned by golden vectors in tests/test_crdt_wire.py):

    msgpack array [body: bin, public_key: bin(36, libp2p protobuf), signature: bin(64)]

    body = [1 (format), peer_id: bin(38), [model_name: str, config_hash: bin(32)], start, end,
            state, [hlc_wall_ms, hlc_logical], expires_ms, throughput: f64, inference_rps: f64,
            [active_sessions, free_cache_tokens], [addr: str, ...], reachability,
            [[peer_id: bin(38), rtt_ms: f64], ...] (sorted by peer id), version: str,
            public_name: str]

Verification is cached: on the object (records are immutable and shared between replicas) and
process-wide by a BLAKE2b-256 hash of the exact wire bytes, so every distinct signed record is
verified once per process. Keying by the whole envelope (not the signature alone) is what makes
the cache safe: a valid signature pasted onto a different body is a different key.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ._errors import RejectReason, Rejection, ValidationError
from ._hlc import MAX_WALL_MS, Hlc
from ._keys import (
    PUBKEY_PB_LEN,
    SIGNATURE_LEN,
    Ed25519Key,
    is_ed25519_peer_id,
    peer_id_to_str,
    verify_signature,
)

FORMAT_VERSION = 1
SIGNING_DOMAIN = b"lamina/crdt/server-record/v1\x00"

# Limits. Every record that passes the per-field limits encodes to < 3 KiB, so MAX_RECORD_BYTES
# only ever bites on bytes from the network.
MAX_RECORD_BYTES = 4096  # whole signed envelope
MAX_BLOCKS = 4096  # span end bound
MAX_MODEL_NAME_BYTES = 128
CONFIG_HASH_LEN = 32
MAX_ADDRS = 8
MAX_ADDR_BYTES = 256
MAX_RTTS = 8
MAX_VERSION_BYTES = 32
MAX_PUBLIC_NAME_BYTES = 64
MAX_RATE = 1e12  # tokens/s or steps/s: anything above is nonsense
MAX_RTT_MS = 3_600_000.0
MAX_SESSIONS = (1 << 32) - 1
MAX_CACHE_TOKENS = (1 << 48) - 1


class ServerState(enum.IntEnum):
    JOINING = 0  # loading weights; not routable yet
    ONLINE = 1
    DRAINING = 2  # finishing its sessions; takes no new ones
    OFFLINE = 3  # left gracefully


class Reachability(enum.IntEnum):
    DIRECT = 0
    RELAYED = 1


def _err(reason: RejectReason, detail: str, peer_id: bytes | None = None) -> ValidationError:
    return ValidationError(reason, detail, peer_id)


def _check_text(value: Any, what: str, limit: int, peer_id: bytes | None) -> None:
    if type(value) is not str:
        raise _err(RejectReason.MALFORMED, f"{what} must be str", peer_id)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _err(RejectReason.MALFORMED, f"{what} is not valid UTF-8", peer_id) from None
    if size > limit:
        raise _err(RejectReason.OVERSIZED, f"{what} is {size} bytes (max {limit})", peer_id)


def _check_int(value: Any, what: str, lo: int, hi: int, peer_id: bytes | None) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise _err(RejectReason.MALFORMED, f"{what} must be an int in [{lo}, {hi}], got {value!r}", peer_id)


def _as_float(value: Any, what: str, hi: float, peer_id: bytes | None) -> float:
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not math.isfinite(value) or not 0.0 <= value <= hi:
        raise _err(RejectReason.MALFORMED, f"{what} must be a finite float in [0, {hi}], got {value!r}", peer_id)
    return value + 0.0  # -0.0 -> 0.0: one encoding per value


@dataclass(frozen=True, slots=True)
class ModelId:
    """A model: its name and a 32-byte hash that identifies it, so look-alikes never mix.

    Nodes put `pipeline.model_hash` in `config_hash` (the field keeps its wire name): the model's
    config and its weights' identity, so two fine-tunes with one config.json differ. crdt only
    compares the bytes; `from_config` is a config-only hash for tests and simulations."""

    name: str
    config_hash: bytes

    def __post_init__(self) -> None:
        _check_text(self.name, "model name", MAX_MODEL_NAME_BYTES, None)
        if not self.name:
            raise _err(RejectReason.MALFORMED, "model name is empty")
        if type(self.config_hash) is not bytes or len(self.config_hash) != CONFIG_HASH_LEN:
            raise _err(RejectReason.MALFORMED, f"config_hash must be {CONFIG_HASH_LEN} bytes")

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> ModelId:
        """Hash a JSON-able config (e.g. a Hugging Face config.json dict) canonically."""
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return cls(name, hashlib.sha256(text.encode("utf-8")).digest())


@dataclass(frozen=True, slots=True)
class Load:
    active_sessions: int = 0
    free_cache_tokens: int = 0

    def __post_init__(self) -> None:
        _check_int(self.active_sessions, "active_sessions", 0, MAX_SESSIONS, None)
        _check_int(self.free_cache_tokens, "free_cache_tokens", 0, MAX_CACHE_TOKENS, None)


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What one server announces about itself. Frozen, validated at construction.

    `next_rtts` maps peer ids of some servers of the next blocks to measured RTT in ms; pass a
    dict or pairs, it is stored as a tuple of `(peer_id, ms)` sorted by peer id (see `rtt_to`).
    `expires_ms` is the absolute lease end on the signer's wall clock.
    """

    peer_id: bytes
    model: ModelId
    start: int
    end: int
    state: ServerState
    hlc: Hlc
    expires_ms: int
    throughput: float = 0.0  # tokens/s through the whole span
    inference_rps: float = 0.0  # inference steps/s per block
    load: Load = Load()
    addrs: tuple[str, ...] = ()  # multiaddrs, relay (/p2p-circuit) ones included
    reachability: Reachability = Reachability.DIRECT
    next_rtts: tuple[tuple[bytes, float], ...] = ()
    version: str = ""  # software version
    public_name: str = ""

    def __post_init__(self) -> None:
        pid = self.peer_id
        if not is_ed25519_peer_id(pid):
            raise _err(RejectReason.MALFORMED, "peer_id must be a 38-byte Ed25519 identity multihash")
        if type(self.model) is not ModelId:
            raise _err(RejectReason.MALFORMED, "model must be a ModelId", pid)
        _check_int(self.start, "start", 0, MAX_BLOCKS - 1, pid)
        _check_int(self.end, "end", 1, MAX_BLOCKS, pid)
        if self.start >= self.end:
            raise _err(RejectReason.MALFORMED, f"empty span [{self.start}, {self.end})", pid)
        try:
            object.__setattr__(self, "state", ServerState(self.state))
            object.__setattr__(self, "reachability", Reachability(self.reachability))
        except ValueError as exc:
            raise _err(RejectReason.MALFORMED, str(exc), pid) from None
        if type(self.hlc) is not Hlc:
            raise _err(RejectReason.MALFORMED, "hlc must be an Hlc", pid)
        _check_int(self.expires_ms, "expires_ms", 0, MAX_WALL_MS, pid)
        if self.expires_ms <= self.hlc.wall_ms:
            raise _err(RejectReason.MALFORMED, "lease expires before the record's own timestamp", pid)
        object.__setattr__(self, "throughput", _as_float(self.throughput, "throughput", MAX_RATE, pid))
        object.__setattr__(self, "inference_rps", _as_float(self.inference_rps, "inference_rps", MAX_RATE, pid))
        if type(self.load) is not Load:
            raise _err(RejectReason.MALFORMED, "load must be a Load", pid)
        addrs = tuple(self.addrs) if isinstance(self.addrs, (list, tuple)) else self.addrs
        if type(addrs) is not tuple:
            raise _err(RejectReason.MALFORMED, "addrs must be a sequence of str", pid)
        if len(addrs) > MAX_ADDRS:
            raise _err(RejectReason.OVERSIZED, f"{len(addrs)} addrs (max {MAX_ADDRS})", pid)
        for a in addrs:
            _check_text(a, "addr", MAX_ADDR_BYTES, pid)
        object.__setattr__(self, "addrs", addrs)
        rtts = self.next_rtts
        items = rtts.items() if isinstance(rtts, Mapping) else rtts
        try:
            pairs = [(p, ms) for p, ms in items]
        except (TypeError, ValueError):
            raise _err(RejectReason.MALFORMED, "next_rtts must be (peer_id, ms) pairs", pid) from None
        if len(pairs) > MAX_RTTS:
            raise _err(RejectReason.OVERSIZED, f"{len(pairs)} next_rtts (max {MAX_RTTS})", pid)
        norm = []
        for p, ms in pairs:
            if not is_ed25519_peer_id(p):
                raise _err(RejectReason.MALFORMED, "next_rtts key is not an Ed25519 peer id", pid)
            norm.append((p, _as_float(ms, "rtt", MAX_RTT_MS, pid)))
        norm.sort()
        if any(norm[i][0] == norm[i + 1][0] for i in range(len(norm) - 1)):
            raise _err(RejectReason.MALFORMED, "duplicate peer in next_rtts", pid)
        object.__setattr__(self, "next_rtts", tuple(norm))
        _check_text(self.version, "version", MAX_VERSION_BYTES, pid)
        _check_text(self.public_name, "public_name", MAX_PUBLIC_NAME_BYTES, pid)

    def rtt_to(self, peer_id: bytes) -> float | None:
        for p, ms in self.next_rtts:
            if p == peer_id:
                return ms
        return None

    def covers(self, block: int) -> bool:
        return self.start <= block < self.end

    def is_live(self, now_ms: int) -> bool:
        """Routable now: online and within its lease."""
        return self.state is ServerState.ONLINE and self.expires_ms > now_ms

    def encode(self) -> bytes:
        """The canonical body bytes (what is signed)."""
        return msgpack.packb(_body_tuple(self), use_bin_type=True)


def _body_tuple(r: ServerRecord) -> tuple:
    return (
        FORMAT_VERSION,
        r.peer_id,
        (r.model.name, r.model.config_hash),
        r.start,
        r.end,
        int(r.state),
        (r.hlc.wall_ms, r.hlc.logical),
        r.expires_ms,
        r.throughput,
        r.inference_rps,
        (r.load.active_sessions, r.load.free_cache_tokens),
        r.addrs,
        int(r.reachability),
        r.next_rtts,
        r.version,
        r.public_name,
    )


_BODY_FIELDS = 16


def _unpack(data: bytes, max_len: int) -> Any:
    return msgpack.unpackb(
        data,
        raw=False,
        use_list=False,
        strict_map_key=True,
        max_str_len=max_len,
        max_bin_len=max_len,
        max_array_len=max_len,
        max_map_len=0,
        max_ext_len=0,
    )


def _decode_body(body: bytes) -> ServerRecord:
    try:
        t = _unpack(body, MAX_RECORD_BYTES)
    except (ValueError, msgpack.exceptions.UnpackException) as exc:
        raise _err(RejectReason.MALFORMED, f"body is not msgpack: {exc}") from None
    if type(t) is not tuple or len(t) != _BODY_FIELDS:
        raise _err(RejectReason.MALFORMED, "body must be an array of 16 fields")
    pid = t[1] if is_ed25519_peer_id(t[1]) else None
    if t[0] != FORMAT_VERSION or type(t[0]) is not int:
        raise _err(RejectReason.MALFORMED, f"unsupported record format {t[0]!r}", pid)
    try:
        (_, peer_id, model, start, end, state, hlc, expires, thr, rps, load, addrs, reach, rtts, ver, name) = t
        if not all(type(x) is tuple and len(x) == 2 for x in (model, hlc, load)):
            raise _err(RejectReason.MALFORMED, "model, hlc and load must be pairs", pid)
        if type(addrs) is not tuple or type(rtts) is not tuple:
            raise _err(RejectReason.MALFORMED, "addrs and next_rtts must be arrays", pid)
        if not all(type(x) is tuple and len(x) == 2 for x in rtts):
            raise _err(RejectReason.MALFORMED, "next_rtts entries must be pairs", pid)
        if type(state) is not int or type(reach) is not int:
            raise _err(RejectReason.MALFORMED, "state and reachability must be ints", pid)
        if type(thr) is not float or type(rps) is not float or not all(type(ms) is float for _, ms in rtts):
            raise _err(RejectReason.MALFORMED, "rates and rtts must be float64", pid)
        record = ServerRecord(
            peer_id=peer_id,
            model=ModelId(*model),
            start=start,
            end=end,
            state=state,
            hlc=Hlc(*hlc),
            expires_ms=expires,
            throughput=thr,
            inference_rps=rps,
            load=Load(*load),
            addrs=addrs,
            reachability=reach,
            next_rtts=rtts,
            version=ver,
            public_name=name,
        )
    except ValidationError as exc:
        raise _err(exc.reason, exc.detail, pid) from None
    if record.encode() != body:
        raise _err(RejectReason.MALFORMED, "non-canonical record encoding", pid)
    return record


_UNCHECKED = object()
_VERIFIED: dict[bytes, bool] = {}
_MAX_VERIFIED = 1 << 18


def _verify_wire(wire: bytes, public_key: bytes, body: bytes, signature: bytes) -> bool:
    key = hashlib.blake2b(wire, digest_size=32).digest()
    ok = _VERIFIED.get(key)
    if ok is None:
        ok = verify_signature(public_key, SIGNING_DOMAIN + body, signature)
        if len(_VERIFIED) >= _MAX_VERIFIED:
            _VERIFIED.clear()
        _VERIFIED[key] = ok
    return ok


@dataclass(frozen=True, slots=True, eq=False)
class SignedRecord:
    """A `ServerRecord` with the signer's public key (libp2p protobuf form) and signature.

    Immutable and meant to be shared: replicas hold references, never copies. Equal when the
    wire bytes are equal. Build one with `Signer.sign` or `decode_record`; constructing one by
    hand (tests do, to forge) is allowed: it is only trusted once `check()` passes.
    """

    record: ServerRecord
    public_key: bytes
    signature: bytes
    body: bytes = field(init=False, repr=False)
    _wire: bytes | None = field(init=False, repr=False, default=None)
    _verdict: Any = field(init=False, repr=False, default=_UNCHECKED)
    _ventry: bytes | None = field(init=False, repr=False, default=None)
    _wsize: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        if type(self.record) is not ServerRecord:
            raise TypeError("record must be a ServerRecord")
        if type(self.public_key) is not bytes or type(self.signature) is not bytes:
            raise TypeError("public_key and signature must be bytes")
        object.__setattr__(self, "body", self.record.encode())

    @classmethod
    def _decoded(cls, record: ServerRecord, public_key: bytes, signature: bytes, body: bytes, wire: bytes) -> SignedRecord:
        self = object.__new__(cls)
        object.__setattr__(self, "record", record)
        object.__setattr__(self, "public_key", public_key)
        object.__setattr__(self, "signature", signature)
        object.__setattr__(self, "body", body)
        object.__setattr__(self, "_wire", wire)
        object.__setattr__(self, "_verdict", _UNCHECKED)
        object.__setattr__(self, "_ventry", None)
        object.__setattr__(self, "_wsize", 0)
        return self

    @property
    def peer_id(self) -> bytes:
        return self.record.peer_id

    @property
    def hlc(self) -> Hlc:
        return self.record.hlc

    @property
    def order_key(self) -> tuple[int, bytes, bytes]:
        """The LWW marker: (hlc, peer id), ties between two records of one signer by signature."""
        return (self.record.hlc.packed, self.record.peer_id, self.signature)

    def newer_than(self, other: SignedRecord) -> bool:
        """LWW order for two records of the same peer."""
        a, b = self.record.hlc.packed, other.record.hlc.packed
        return a > b or (a == b and self.signature > other.signature)

    @property
    def wire(self) -> bytes:
        """Canonical wire bytes of the signed envelope."""
        w = self._wire
        if w is None:
            w = msgpack.packb((self.body, self.public_key, self.signature), use_bin_type=True)
            object.__setattr__(self, "_wire", w)
        return w

    def to_bytes(self) -> bytes:
        return self.wire

    @property
    def wire_bin_size(self) -> int:
        """Size of the wire bytes as a msgpack `bin` inside a message (for exact message sizes)."""
        n = self._wsize
        if not n:
            w = len(self.wire)
            n = w + (2 if w < 256 else 3)
            object.__setattr__(self, "_wsize", n)
        return n

    @property
    def version_entry(self) -> bytes:
        """24 bytes used by version digests: peer fingerprint(8) | hlc(8) | signature prefix(8).

        Bytewise order of the last 16 bytes matches the LWW order of one peer's records (up to
        a signer equivocating at one hlc with colliding 64-bit signature prefixes, which only
        leaves that signer's own entry unsynced).
        """
        v = self._ventry
        if v is None:
            pid = self.record.peer_id
            v = pid[6:14] + self.record.hlc.packed.to_bytes(8, "big") + self.signature[:8]
            object.__setattr__(self, "_ventry", v)
        return v

    def check(self) -> Rejection | None:
        """Time-independent validity: key/peer id binding and signature. Cached."""
        v = self._verdict
        if v is _UNCHECKED:
            v = self._check()
            object.__setattr__(self, "_verdict", v)
        return v

    def _check(self) -> Rejection | None:
        pid = self.record.peer_id
        if len(self.public_key) != PUBKEY_PB_LEN or pid[2:] != self.public_key:
            return Rejection(RejectReason.PEER_ID_MISMATCH, pid, "peer id is not the identity hash of the signing key")
        if len(self.signature) != SIGNATURE_LEN or not _verify_wire(self.wire, self.public_key, self.body, self.signature):
            return Rejection(RejectReason.BAD_SIGNATURE, pid, "signature does not verify")
        return None

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, SignedRecord):
            return NotImplemented
        return self.signature == other.signature and self.body == other.body and self.public_key == other.public_key

    def __hash__(self) -> int:
        return hash(self.signature)

    def __repr__(self) -> str:
        r = self.record
        return (
            f"SignedRecord({peer_id_to_str(r.peer_id)[-8:]} {r.model.name} [{r.start},{r.end}) "
            f"{r.state.name} hlc={r.hlc.wall_ms}.{r.hlc.logical} exp={r.expires_ms})"
        )


def decode_record(data: bytes) -> SignedRecord:
    """Parse and structurally validate a signed record's wire bytes (signature not yet checked).

    Raises `ValidationError` (OVERSIZED / MALFORMED) on anything but the canonical encoding.
    """
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) > MAX_RECORD_BYTES:
        raise _err(RejectReason.OVERSIZED, f"signed record is {len(data)} bytes (max {MAX_RECORD_BYTES})")
    try:
        t = _unpack(data, MAX_RECORD_BYTES)
    except (ValueError, msgpack.exceptions.UnpackException) as exc:
        raise _err(RejectReason.MALFORMED, f"signed record is not msgpack: {exc}") from None
    if type(t) is not tuple or len(t) != 3 or not all(type(x) is bytes for x in t):
        raise _err(RejectReason.MALFORMED, "signed record must be [body, public_key, signature] as bin")
    body, public_key, signature = t
    record = _decode_body(body)
    if len(public_key) != PUBKEY_PB_LEN or len(signature) != SIGNATURE_LEN:
        raise _err(RejectReason.MALFORMED, "bad public key or signature length", record.peer_id)
    if msgpack.packb(t, use_bin_type=True) != data:
        raise _err(RejectReason.MALFORMED, "non-canonical envelope encoding", record.peer_id)
    return SignedRecord._decoded(record, public_key, signature, body, data)


class Signer:
    """Signs this node's records with its libp2p Ed25519 identity.

    `private_key` is the raw 32-byte seed, or libp2p's 64-byte `seed || public key`.
    """

    __slots__ = ("_key",)

    def __init__(self, private_key: bytes) -> None:
        self._key = Ed25519Key(private_key)

    @property
    def peer_id(self) -> bytes:
        return self._key.peer_id

    @property
    def public_key(self) -> bytes:
        """libp2p protobuf-serialised public key (36 bytes)."""
        return self._key.public_key

    def sign_bytes(self, data: bytes) -> bytes:
        return self._key.sign_bytes(data)

    def sign(self, record: ServerRecord) -> SignedRecord:
        if record.peer_id != self.peer_id:
            raise ValueError("a node can only sign its own record (record.peer_id != signer.peer_id)")
        body = record.encode()
        signed = SignedRecord._decoded(record, self.public_key, self._key.sign_bytes(SIGNING_DOMAIN + body), body, None)
        object.__setattr__(signed, "_verdict", None)  # we just made the signature ourselves
        return signed

    def __repr__(self) -> str:
        return f"Signer(peer_id={peer_id_to_str(self.peer_id)})"
