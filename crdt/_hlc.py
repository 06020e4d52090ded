"""Hybrid logical clock (Kulkarni et al., 2014), pure: wall time is always passed in.

A timestamp `Hlc(wall_ms, logical)` orders like the tuple. The clock never goes backwards: a
local event takes `max(last.wall_ms, wall_ms)` and bumps `logical` when the wall part did not
advance; a receive event also folds in the remote timestamp, but only if that timestamp is at
most `max_skew_ms` ahead of our own wall clock, so a peer with a runaway clock cannot drag ours
into the future (`ClockSkewError`). Packed into 64 bits as `wall_ms << 16 | logical`, which is
how timestamps go on the wire inside version digests.

Nothing here reads a real clock: callers pass `wall_ms` (a node passes `time.time_ns() // 10**6`,
tests and the gossip simulation pass virtual time).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import RejectReason, ValidationError

WALL_BITS = 48  # milliseconds since the epoch: good until the year 10889
LOGICAL_BITS = 16
MAX_WALL_MS = (1 << WALL_BITS) - 1
MAX_LOGICAL = (1 << LOGICAL_BITS) - 1


@dataclass(frozen=True, order=True, slots=True)
class Hlc:
    """A hybrid logical timestamp. Totally ordered by (wall_ms, logical)."""

    wall_ms: int
    logical: int = 0

    def __post_init__(self) -> None:
        if type(self.wall_ms) is not int or not 0 <= self.wall_ms <= MAX_WALL_MS:
            raise ValidationError(RejectReason.MALFORMED, f"hlc wall_ms out of range: {self.wall_ms!r}")
        if type(self.logical) is not int or not 0 <= self.logical <= MAX_LOGICAL:
            raise ValidationError(RejectReason.MALFORMED, f"hlc logical out of range: {self.logical!r}")

    @property
    def packed(self) -> int:
        """64-bit form, ordered like the timestamp."""
        return (self.wall_ms << LOGICAL_BITS) | self.logical

    @classmethod
    def unpack(cls, packed: int) -> Hlc:
        return cls(packed >> LOGICAL_BITS, packed & MAX_LOGICAL)


HLC_ZERO = Hlc(0, 0)


class ClockSkewError(ValidationError):
    """A remote timestamp is further ahead of our wall clock than the configured max skew."""

    def __init__(self, remote: Hlc, wall_ms: int, max_skew_ms: int) -> None:
        super().__init__(
            RejectReason.FUTURE,
            f"remote hlc {remote.wall_ms} ms is {remote.wall_ms - wall_ms} ms ahead of local wall "
            f"clock (max skew {max_skew_ms} ms)",
        )
        self.remote = remote


def _advance(wall: int, logical: int) -> Hlc:
    # 65536 events inside one millisecond: borrow the next millisecond rather than overflow.
    if logical > MAX_LOGICAL:
        return Hlc(wall + 1, 0)
    return Hlc(wall, logical)


def hlc_now(last: Hlc, wall_ms: int) -> Hlc:
    """The timestamp of a local (or send) event after `last`, at local wall time `wall_ms`."""
    if wall_ms > last.wall_ms:
        return Hlc(wall_ms, 0)
    return _advance(last.wall_ms, last.logical + 1)


def hlc_update(last: Hlc, remote: Hlc, wall_ms: int, max_skew_ms: int) -> Hlc:
    """The timestamp of a receive event of `remote` after `last`; raises `ClockSkewError`."""
    if remote.wall_ms > wall_ms + max_skew_ms:
        raise ClockSkewError(remote, wall_ms, max_skew_ms)
    wall = max(last.wall_ms, remote.wall_ms, wall_ms)
    if wall == last.wall_ms and wall == remote.wall_ms:
        logical = max(last.logical, remote.logical) + 1
    elif wall == last.wall_ms:
        logical = last.logical + 1
    elif wall == remote.wall_ms:
        logical = remote.logical + 1
    else:
        logical = 0
    return _advance(wall, logical)


class HybridClock:
    """A node's clock: the last issued timestamp plus the max tolerated skew.

    The one mutable object in this package, because a clock is a sequence of events; the logic
    is the two pure functions above.
    """

    __slots__ = ("max_skew_ms", "_last")

    def __init__(self, max_skew_ms: int, last: Hlc = HLC_ZERO) -> None:
        if max_skew_ms < 0:
            raise ValueError("max_skew_ms must be >= 0")
        self.max_skew_ms = max_skew_ms
        self._last = last

    @property
    def last(self) -> Hlc:
        return self._last

    def now(self, wall_ms: int) -> Hlc:
        """Timestamp a local event (e.g. signing a new record)."""
        self._last = hlc_now(self._last, wall_ms)
        return self._last

    def update(self, remote: Hlc, wall_ms: int) -> Hlc:
        """Observe a remote timestamp; raises `ClockSkewError` (clock unchanged) if too far ahead.

        A restarted node should observe its own latest record from the swarm before signing a new
        one, so that the new record is newer even if its wall clock went backwards.
        """
        self._last = hlc_update(self._last, remote, wall_ms, self.max_skew_ms)
        return self._last

    def __repr__(self) -> str:
        return f"HybridClock(max_skew_ms={self.max_skew_ms}, last={self._last!r})"
