"""Admission limits against resource exhaustion (issue 21): per-peer open rates and the gate on
inbound connections still in their handshake.

Both answer at once and cost next to nothing when they refuse: a stream over its peer's open
rate gets an error frame before any session machinery starts (`Host._serve_stream`); a
connection over the handshake limits is closed before a byte of it is read.

* `RateLimiter`: a token bucket per key (a peer): `rate` opens a second, bursts of `burst`.
* `HandshakeGate`: at most `limit` inbound connections in their security handshake at once
  (`per_ip` of them from one IP address), each for at most `deadline` seconds. When the gate is
  full, a new connection evicts the oldest handshake that has run for more than `evict_after`
  (an honest Noise handshake takes milliseconds; a flood's connections sit idle), or is refused
  when none has. `gate_libp2p_handshakes` puts one in front of py-libp2p's inbound upgrade.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ._constants import RESET_DEADLINE

logger = logging.getLogger("lamina.p2p")

__all__ = ["RateLimiter", "HandshakeGate", "gate_libp2p_handshakes", "limit_libp2p_connections", "refuse_stream"]

PRUNE_EVERY = 1024  # RateLimiter: forget full buckets after this many calls (bounded memory)


class RateLimiter:
    """Token buckets, one per key: each holds at most `burst` tokens and gains `rate` a second;
    `allow(key)` takes one, or answers False (and takes nothing) when the key has none left."""

    def __init__(self, rate: float, burst: int) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self._buckets: dict[Any, tuple[float, float]] = {}  # key -> (tokens, when counted)
        self._calls = 0
        self.refused = 0

    def allow(self, key: Any) -> bool:
        now = trio.current_time()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        self._calls += 1
        if self._calls % PRUNE_EVERY == 0:
            self._prune(now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled: they are what a new key gets anyway."""
        full = [k for k, (tokens, then) in self._buckets.items() if tokens + (now - then) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]

    def describe(self) -> str:
        return f"{self.rate:g} a second, bursts of {self.burst}"


class HandshakeGate:
    """Inbound connections in their handshake (see the module docstring). Use::

        scope = gate.admit(ip)
        if scope is None: close it, it was refused
        try:
            with scope: handshake
        finally:
            gate.done(scope)
        if scope.cancelled_caught: close it, it timed out or was evicted
    """

    def __init__(self, limit: int, per_ip: int, deadline: float, evict_after: float) -> None:
        if limit < 1 or per_ip < 1 or not deadline > 0 or evict_after < 0:
            raise ValueError("a handshake gate needs limit, per_ip >= 1, deadline > 0, evict_after >= 0")
        self.limit, self.per_ip, self.deadline, self.evict_after = limit, per_ip, deadline, evict_after
        self._open: dict[int, tuple[float, str | None, trio.CancelScope]] = {}  # in order of arrival
        self._by_ip: dict[str | None, int] = {}
        self.refused = 0  # new connections closed at once
        self.evicted = 0  # handshakes cut short to make room

    @property
    def handshaking(self) -> int:
        return len(self._open)

    def admit(self, ip: str | None) -> trio.CancelScope | None:
        """A cancel scope (with the handshake deadline) for a new connection from `ip`, or None
        when it is refused."""
        now = trio.current_time()
        if ip is not None and self._by_ip.get(ip, 0) >= self.per_ip:
            self.refused += 1
            return None
        if len(self._open) >= self.limit:
            key = next(iter(self._open))
            started, old_ip, old = self._open[key]
            if now - started < self.evict_after:
                self.refused += 1
                return None
            self._forget(key)
            old.cancel()
            self.evicted += 1
        scope = trio.CancelScope(deadline=now + self.deadline)
        self._open[id(scope)] = (now, ip, scope)
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1
        return scope

    def done(self, scope: trio.CancelScope) -> None:
        self._forget(id(scope))

    def _forget(self, key: int) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        ip = entry[1]
        left = self._by_ip.get(ip, 1) - 1
        if left:
            self._by_ip[ip] = left
        else:
            self._by_ip.pop(ip, None)


def _remote_ip(raw_conn: Any) -> str | None:
    try:
        remote = raw_conn.get_remote_address()
    except Exception:
        return None
    return remote[0] if remote else None


def gate_libp2p_handshakes(network: Any, gate: HandshakeGate) -> None:
    """Put `gate` in front of py-libp2p's inbound upgrade (private-swarm handshake, Noise,
    yamux): over the limits, a new connection is closed before a byte is read; a handshake that
    is evicted or outlives the deadline is closed. py-libp2p's own upgrade deadline is set to
    the gate's, so the two agree."""
    from libp2p.network.exceptions import SwarmException

    upgrade = network.upgrade_inbound_raw_conn
    if getattr(upgrade, "_lamina_gated", False):
        return
    network.connection_config.inbound_upgrade_timeout = gate.deadline

    async def gated(raw_conn: Any, maddr: Any) -> Any:
        scope = gate.admit(_remote_ip(raw_conn))
        if scope is None:
            await _close(raw_conn)
            raise SwarmException(f"refused: {gate.handshaking} connections are handshaking (the limit is "
                                 f"{gate.limit}, {gate.per_ip} per IP address)")
        try:
            with scope:
                return await upgrade(raw_conn, maddr)
        finally:
            gate.done(scope)
            if scope.cancelled_caught:  # (py-libp2p's clean-up was cancelled with it)
                await _close(raw_conn)
        raise SwarmException(f"the handshake took more than {gate.deadline:g} s, or was evicted by newer "
                             f"connections while {gate.limit} were handshaking")

    gated._lamina_gated = True  # type: ignore[attr-defined]
    network.upgrade_inbound_raw_conn = gated


def limit_libp2p_connections(network: Any, max_connections: int) -> None:
    """At most `max_connections` libp2p connections (inbound and outbound): py-libp2p refuses
    more at its inbound limiter (before any handshake) and when registering a connection."""
    config = network.connection_config
    config.max_connections = max_connections
    config.high_watermark = max_connections  # py-libp2p's pruner trims above this
    limiter = getattr(network, "_inbound_limiter", None)
    if limiter is not None:
        limiter.total_tokens = max(1, max_connections - config.min_connections)


async def _close(raw_conn: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
        try:
            await raw_conn.close()
        except Exception:
            pass


async def refuse_stream(stream: Any, error: Any) -> None:
    """Answer a new libp2p stream with `error` (an `ErrorMessage`) and a goodbye, then close our
    side, without starting a session for it (no tasks, no timers); reset it when even that does
    not go out within `RESET_DEADLINE`."""
    from ._messages import Goodbye
    from ._wire import encode

    with trio.CancelScope(shield=True):
        with trio.move_on_after(RESET_DEADLINE) as scope:
            try:
                await stream.write(b"".join([*encode(error), *encode(Goodbye())]))
                await stream.close()
            except Exception:
                scope.cancel()
        if scope.cancelled_caught:
            with trio.move_on_after(RESET_DEADLINE):
                try:
                    await stream.reset()
                except Exception:
                    pass
