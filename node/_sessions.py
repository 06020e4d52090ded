"""Inference sessions on a node: the KV memory budget, per-session state, its steps' way in and out.

A session holds one `KVCache` for its sub-span ``[start, end)`` of the node's blocks. Its memory
is reserved from the node's `CacheBudget` (in tokens: ``batch * max_length``) when it opens and
given back when it ends, however it ends (closed, idle, stream broken, node draining).

Every step is checked against its session before it reaches the batcher, in the call that turns
its wire tensor into the span's compute tensor (`ServedSession.accept`): a bad step gets a
`StepFailed` and never touches the cache or other sessions. `ServedSession.to_wire` turns the
output back into the session's wire format: its dtype, or on a session that packs
(``<dtype>+int8:<N>``, `pipeline.protocol`), int8 blockwise for a step of at least N tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

import p2p
from pipeline import KVCache, Span
from pipeline._wire_format import decode_int8, encode_int8, packed_width, unpacked_width
from pipeline.protocol import (BAD_REQUEST, BUSY, HIDDEN_DTYPES, PACKED_DTYPE, PACKINGS, UNKNOWN_SESSION, Replay,
                               Step, parse_wire_format)


class StepError(Exception):
    """A step (or replay) refused or failed; becomes a `StepFailed` with this code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message[:1000]


@dataclass
class Reservation:
    tokens: int
    released: bool = False
    budget: "CacheBudget | None" = field(default=None, repr=False)  # where it came from


class CacheBudget:
    """KV-cache tokens and session slots, reserved when a session opens and released when it
    ends. Reservation never waits: it fails at once with BUSY so the client can route around."""

    def __init__(self, tokens: int, max_sessions: int) -> None:
        if tokens < 1 or max_sessions < 1:
            raise ValueError("the cache budget needs >= 1 token and >= 1 session")
        self.total_tokens = tokens
        self.max_sessions = max_sessions
        self.used_tokens = 0
        self.sessions = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

    def reserve(self, tokens: int) -> Reservation:
        if self.sessions >= self.max_sessions:
            raise p2p.RemoteError(BUSY, f"this node already serves its maximum of {self.max_sessions} sessions")
        if tokens > self.free_tokens:
            raise p2p.RemoteError(
                BUSY, f"not enough KV cache: {tokens} tokens (batch x max_length) asked, "
                      f"{self.free_tokens} of {self.total_tokens} free")
        self.used_tokens += tokens
        self.sessions += 1
        return Reservation(tokens, budget=self)

    def release(self, reservation: Reservation) -> None:
        if reservation.released:
            return
        reservation.released = True
        self.used_tokens -= reservation.tokens
        self.sessions -= 1


class StepGate:
    """A session's mutex: one step at a time touches its cache. Taking a free gate costs no
    trip through the scheduler (trio.Lock's uncontended acquire still yields once, and a step
    should run from its read to its send in one go)."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        while self._held:  # woken by release; another task may have taken it meanwhile
            await self._lot.park()
        self._held = True

    def release(self) -> None:
        self._held = False
        self._lot.unpark()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class ServedSession:
    """One client's inference session on this node."""

    session_id: str
    client: p2p.Session  # the client's /lamina/inference/1 stream: every result goes here
    span: Span  # the sub-span [start, end) this session runs
    cache: KVCache
    dtype: str  # the wire format asked for (`OpenSession.dtype`); its dtype part once opened
    reservation: Reservation
    next_peer: str | None = None
    next_session: str | None = None
    lock: StepGate = field(default_factory=StepGate)  # one step at a time touches the cache
    last_active: float = field(default_factory=trio.current_time)
    last_step_id: int | None = None  # steps with a lower id are stale and dropped
    pusher: Any = None  # the session's _Pusher, while it runs
    closed: bool = False
    cancel_scopes: set[trio.CancelScope] = field(default_factory=set)  # push streams into it

    def __post_init__(self) -> None:
        # What every step is checked against and converted to, read once: the span's compute
        # dtype and device (its own properties walk its modules), the wire dtype as torch's, and
        # the cache's fixed sizes (properties too).
        self.wire_format = self.dtype
        self.dtype, self.int8_from = self._wire_format(self.dtype)
        self.compute_dtype: torch.dtype = self.span.dtype
        self.device: torch.device = self.span.device
        self.wire_dtype: torch.dtype = getattr(torch, self.dtype)
        self.hidden_size: int = self.span.config.hidden_size
        self.batch: int = self.cache.batch
        self.max_length: int = self.cache.max_length

    def _wire_format(self, name: str) -> tuple[str, int | None]:
        """(dtype, min tokens of an int8 blockwise step or None) of the format asked for. One
        this node does not take is refused with BAD_REQUEST, the reservation given back (the
        session never opens: `SpanServer._open` reserved before it built the session)."""
        try:
            dtype, packing, int8_from = parse_wire_format(name)
            if packing is not None and packing not in PACKINGS:
                raise ValueError(f"this node does not support the wire format {name!r}: it takes "
                                 f"{', '.join(HIDDEN_DTYPES)}, each alone or as <dtype>+int8:<min tokens> "
                                 f"(steps of that many tokens or more int8 blockwise)")
        except ValueError as exc:
            if self.reservation.budget is not None:
                self.reservation.budget.release(self.reservation)
            raise p2p.RemoteError(BAD_REQUEST, str(exc)) from None
        return dtype, int8_from

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    def close(self) -> None:
        self.closed = True
        for scope in list(self.cancel_scopes):
            scope.cancel()

    # -- a step's way in and out (one call each: this is every decode step's path) ------------
    def accept(self, msg: Step | Replay) -> torch.Tensor:
        """The hidden states [B, T, D] of a Step (at its position) or a Replay (from position 0),
        checked against this session and as the span's compute dtype and device (not copied when
        they already are). Raises `StepError`: UNKNOWN_SESSION for another session's id,
        BAD_REQUEST for a dtype, shape or position that does not fit."""
        if type(msg) is Step:
            position, what = msg.position, "step"
        else:
            position, what = 0, "replay"
        if msg.session_id != self.session_id:
            raise StepError(UNKNOWN_SESSION, f"session {msg.session_id} is not open on this stream")
        hidden = msg.hidden
        b, t, d = hidden.shape
        coded = hidden.dtype != self.dtype
        if coded:  # packed, or a replay's float32 on a session that packs; anything else refused
            d = self._coded_width(hidden, what)
        if d != self.hidden_size:
            raise StepError(BAD_REQUEST, f"{what} hidden size is {d}, the model's is {self.hidden_size}")
        if b != self.batch:
            raise StepError(BAD_REQUEST, f"{what} has batch {b}, the session was opened with batch {self.batch}")
        if t < 1:
            raise StepError(BAD_REQUEST, f"{what} has no tokens")
        if position > self.cache.length:
            raise StepError(BAD_REQUEST, f"{what} starts at position {position} but the session holds "
                                         f"{self.cache.length} positions (steps must be contiguous or roll back)")
        if position + t > self.max_length:
            raise StepError(BAD_REQUEST, f"{what} reaches position {position + t}, past the session's "
                                         f"max_length {self.max_length}")
        if coded and hidden.dtype == PACKED_DTYPE:
            try:
                x = decode_int8(hidden.to_torch(), d)
            except ValueError as exc:
                raise StepError(BAD_REQUEST, f"{what} int8 blockwise hidden states: {exc}") from None
        else:
            x = hidden.to_torch()
        if x.dtype != self.compute_dtype or x.device != self.device:
            x = x.to(device=self.device, dtype=self.compute_dtype)
        return x

    def _coded_width(self, hidden: p2p.Tensor, what: str) -> int:
        """The hidden size a tensor not in the session's dtype carries, if the session takes it:
        a step packed int8 blockwise, or a replay in float32, on a session that packs."""
        if self.int8_from is None:
            raise StepError(BAD_REQUEST, f"{what} hidden states are {hidden.dtype}, "
                                         f"the session was opened for {self.dtype}")
        if hidden.dtype == PACKED_DTYPE and what == "step":
            width = hidden.shape[2]
            d = unpacked_width(width)
            if d != self.hidden_size:
                raise StepError(BAD_REQUEST, f"step int8 blockwise rows are {width} bytes wide; the model's hidden "
                                             f"size {self.hidden_size} packs to {packed_width(self.hidden_size)}")
            return d
        if hidden.dtype == "float32" and what == "replay":
            return hidden.shape[2]
        raise StepError(BAD_REQUEST, f"{what} hidden states are {hidden.dtype}; the session was opened for "
                                     f"{self.wire_format}: steps come as {self.dtype} or int8 blockwise, "
                                     f"replays as {self.dtype} or float32")

    def to_wire(self, hidden: torch.Tensor) -> p2p.Tensor:
        """A step's output in the session's wire format, on the CPU (shared, not copied, when it
        already is in its dtype there): packed when the session packs steps this long and the
        values pack, else in the session's dtype."""
        if self.int8_from is not None and hidden.shape[1] >= self.int8_from:
            packed = encode_int8(hidden)
            if packed is not None:
                return p2p.Tensor.from_torch(packed)
        if hidden.dtype is not self.wire_dtype or hidden.device.type != "cpu":
            hidden = hidden.to(device="cpu", dtype=self.wire_dtype)
        return p2p.Tensor.from_torch(hidden)


def cache_tokens_for(batch: int, max_length: int) -> int:
    return batch * max_length


def default_cache_tokens(span: Span, fraction: float = 0.5) -> int:
    """KV tokens that fit in `fraction` of the free memory of the span's device."""
    per_token = span.cache_bytes_per_token()
    device = span.device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        import os

        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    return max(1, math.floor(free * fraction / per_token))
