"""Inference sessions on a node: the KV memory budget, per-session state, input validation.

A session holds one `KVCache` for its sub-span ``[start, end)`` of the node's blocks. Its memory
is reserved from the node's `CacheBudget` (in tokens: ``batch * max_length``) when it opens and
given back when it ends, however it ends (closed, idle, stream broken, node draining).

Every step is checked against its session here (`check_step`, `check_replay`) before it reaches
the batcher: a bad step gets a `StepFailed` and never touches the cache or other sessions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

import p2p
from pipeline import KVCache, Span
# The error codes are the protocol's (pipeline/_protocol.py): the client reads them too.
from pipeline._protocol import (BAD_REQUEST, BUSY, DRAINING, IDLE_TIMEOUT, INTERNAL,  # noqa: F401
                                UNKNOWN_SESSION, Replay, Step)


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


class CacheBudget:
    """KV-cache tokens and session slots, reserved when a session opens and released when it
    ends. Reservation never waits: it fails at once with "busy" so the client can route around."""

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
        return Reservation(tokens)

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
    dtype: str  # the wire dtype of its hidden states
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
        # the span's compute dtype and device, read once (the span's own properties walk its
        # modules, on every step otherwise)
        self.compute_dtype: torch.dtype = self.span.dtype
        self.device: torch.device = self.span.device

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    @property
    def batch(self) -> int:
        return self.cache.batch

    @property
    def max_length(self) -> int:
        return self.cache.max_length

    def close(self) -> None:
        self.closed = True
        for scope in list(self.cancel_scopes):
            scope.cancel()


def _check_hidden(sess: ServedSession, hidden: p2p.Tensor, position: int, what: str) -> int:
    """Check hidden states [B, T, D] at `position` against the session; returns T."""
    if hidden.dtype != sess.dtype:
        raise StepError(BAD_REQUEST, f"{what} hidden states are {hidden.dtype}, "
                                     f"the session was opened for {sess.dtype}")
    b, t, d = hidden.shape
    hidden_size = sess.span.config.hidden_size
    if d != hidden_size:
        raise StepError(BAD_REQUEST, f"{what} hidden size is {d}, the model's is {hidden_size}")
    if b != sess.batch:
        raise StepError(BAD_REQUEST, f"{what} has batch {b}, the session was opened with batch {sess.batch}")
    if t < 1:
        raise StepError(BAD_REQUEST, f"{what} has no tokens")
    if position > sess.cache.length:
        raise StepError(BAD_REQUEST, f"{what} starts at position {position} but the session holds "
                                     f"{sess.cache.length} positions (steps must be contiguous or roll back)")
    if position + t > sess.max_length:
        raise StepError(BAD_REQUEST, f"{what} reaches position {position + t}, past the session's "
                                     f"max_length {sess.max_length}")
    return t


def check_step(sess: ServedSession, step: Step) -> None:
    if step.session_id != sess.session_id:
        raise StepError(UNKNOWN_SESSION, f"session {step.session_id} is not open on this stream")
    _check_hidden(sess, step.hidden, step.position, "step")


def check_replay(sess: ServedSession, replay: Replay) -> None:
    if replay.session_id != sess.session_id:
        raise StepError(UNKNOWN_SESSION, f"session {replay.session_id} is not open on this stream")
    _check_hidden(sess, replay.hidden, 0, "replay")


def to_compute(hidden: p2p.Tensor, sess: ServedSession) -> torch.Tensor:
    """Wire hidden states as the session's compute dtype and device (no copy when they
    already are)."""
    t = hidden.to_torch()
    if t.dtype != sess.compute_dtype or t.device != sess.device:
        t = t.to(device=sess.device, dtype=sess.compute_dtype)
    return t


def to_wire(hidden: torch.Tensor, dtype: str) -> p2p.Tensor:
    """The output in the session's wire dtype, on the CPU (shared, not copied, when it is
    already both)."""
    want = getattr(torch, dtype)
    if hidden.dtype is not want or hidden.device.type != "cpu":
        hidden = hidden.to(device="cpu", dtype=want)
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
