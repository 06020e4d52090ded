"""Hybrid logical clock: monotonic, bounded skew, pure (virtual wall time passed in)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import HLC_ZERO, ClockSkewError, Hlc, HybridClock, RejectReason, ValidationError, hlc_now, hlc_update
from crdt._hlc import MAX_LOGICAL

SKEW = 1_000


def test_local_events_follow_wall_clock_and_break_ties_with_logical():
    c = HybridClock(SKEW)
    assert c.now(100) == Hlc(100, 0)
    assert c.now(100) == Hlc(100, 1)
    assert c.now(250) == Hlc(250, 0)
    # The wall clock stepping backwards does not take the clock with it.
    assert c.now(200) == Hlc(250, 1)
    assert c.last == Hlc(250, 1)


def test_receive_takes_the_max_and_bumps_logical():
    c = HybridClock(SKEW)
    c.now(100)
    assert c.update(Hlc(500, 7), 120) == Hlc(500, 8)  # remote ahead, within skew
    assert c.update(Hlc(400, 0), 130) == Hlc(500, 9)  # remote behind: ours wins
    assert c.update(Hlc(500, 20), 140) == Hlc(500, 21)  # same wall: max logical + 1
    assert c.update(Hlc(10, 0), 900) == Hlc(900, 0)  # wall clock caught up


def test_remote_beyond_max_skew_is_refused_and_leaves_clock_unchanged():
    c = HybridClock(SKEW)
    c.now(100)
    with pytest.raises(ClockSkewError) as info:
        c.update(Hlc(100 + SKEW + 1, 0), 100)
    assert info.value.reason is RejectReason.FUTURE
    assert isinstance(info.value, ValidationError)
    assert c.last == Hlc(100, 0)
    assert c.update(Hlc(100 + SKEW, 0), 100) == Hlc(100 + SKEW, 1)  # exactly at the bound: fine


def test_logical_overflow_borrows_the_next_millisecond():
    assert hlc_now(Hlc(5, MAX_LOGICAL), 5) == Hlc(6, 0)
    assert hlc_update(Hlc(5, 3), Hlc(5, MAX_LOGICAL), 5, SKEW) == Hlc(6, 0)


def test_packing_is_order_preserving_and_round_trips():
    a, b, c = Hlc(1, MAX_LOGICAL), Hlc(2, 0), Hlc(2, 1)
    assert a.packed < b.packed < c.packed
    assert Hlc.unpack(c.packed) == c
    assert HLC_ZERO.packed == 0


@pytest.mark.parametrize("wall,logical", [(-1, 0), (1 << 48, 0), (0, -1), (0, 1 << 16), (1.0, 0), (True, 0)])
def test_out_of_range_timestamps_are_malformed(wall, logical):
    with pytest.raises(ValidationError) as info:
        Hlc(wall, logical)
    assert info.value.reason is RejectReason.MALFORMED


events = st.lists(
    st.tuples(
        st.integers(0, 10_000),  # local wall clock reading (may jump backwards)
        st.none() | st.tuples(st.integers(0, 12_000), st.integers(0, 5)),  # remote timestamp, if a receive
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_clock_is_strictly_monotonic_and_never_runs_past_skew(evts):
    c = HybridClock(SKEW)
    prev = c.last
    highest_wall = 0
    for wall, remote in evts:
        highest_wall = max(highest_wall, wall)
        if remote is None:
            ts = c.now(wall)
        else:
            r = Hlc(*remote)
            try:
                ts = c.update(r, wall)
            except ClockSkewError:
                assert r.wall_ms > wall + SKEW
                assert c.last == prev
                continue
            assert ts > r
        assert ts > prev
        # Never further ahead than any wall clock reading plus the tolerated skew.
        assert ts.wall_ms <= highest_wall + SKEW
        prev = ts
