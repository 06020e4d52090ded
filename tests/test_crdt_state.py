"""The swarm map: CRDT laws, LWW against a reference model, admission, leases, queries."""

import dataclasses
import functools

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    SIGNING_DOMAIN,
    Delta,
    Hlc,
    Load,
    ModelId,
    RejectReason,
    ServerRecord,
    ServerState,
    SignedRecord,
    Signer,
    SwarmConfig,
    SwarmState,
    decode_message,
    decode_record,
    encode_message,
)

NOW = 1_800_000_000_000
CONFIG = SwarmConfig(max_skew_ms=10_000, max_lease_ms=600_000)
SIGNERS = [Signer(bytes([i + 1]) * 32) for i in range(6)]
MODELS = [ModelId("model-a", bytes(32)), ModelId("model-b", bytes([1]) * 32)]


@functools.lru_cache(maxsize=None)
def rec(
    who: int,
    dt: int = 0,
    logical: int = 0,
    state: ServerState = ServerState.ONLINE,
    lease: int = 60_000,
    span: tuple[int, int] = (0, 8),
    model: int = 0,
    load: int = 0,
    throughput: float = 10.0,
) -> SignedRecord:
    """A record signed by SIGNERS[who], as a replica receives it (decoded, not yet verified)."""
    signer = SIGNERS[who]
    r = ServerRecord(
        peer_id=signer.peer_id,
        model=MODELS[model],
        start=span[0],
        end=span[1],
        state=state,
        hlc=Hlc(NOW + dt, logical),
        expires_ms=NOW + dt + lease,
        throughput=throughput,
        load=Load(load, 1000),
    )
    return decode_record(signer.sign(r).wire)


@functools.lru_cache(maxsize=None)
def forged(kind: str, who: int = 0, dt: int = 0) -> SignedRecord:
    good = rec(who, dt, load=7)
    if kind == "bad_signature":
        return SignedRecord(good.record, good.public_key, bytes(reversed(good.signature)))
    if kind == "peer_id_mismatch":  # the victim's peer id, signed by someone else's key
        thief = SIGNERS[(who + 1) % len(SIGNERS)]
        return SignedRecord(good.record, thief.public_key, thief.sign_bytes(SIGNING_DOMAIN + good.body))
    if kind == "expired":
        return rec(who, dt - 70_000, lease=60_000)
    if kind == "future":
        return rec(who, CONFIG.max_skew_ms + 1 + abs(dt))
    if kind == "lease_too_long":
        return rec(who, dt, lease=CONFIG.max_lease_ms + 1)
    raise ValueError(kind)


FORGERIES = ["bad_signature", "peer_id_mismatch", "expired", "future", "lease_too_long"]

valid_records = st.builds(
    rec,
    who=st.integers(0, len(SIGNERS) - 1),
    dt=st.integers(-3, 3).map(lambda x: x * 1000),
    logical=st.integers(0, 1),
    state=st.sampled_from(ServerState),
    load=st.integers(0, 1),  # same (peer, hlc), different content: equivocation, ordered by signature
)
invalid_records = st.builds(
    forged, kind=st.sampled_from(FORGERIES), who=st.integers(0, len(SIGNERS) - 1), dt=st.integers(-2, 2).map(lambda x: x * 1000)
)
any_records = st.one_of(valid_records, valid_records, valid_records, invalid_records)
record_lists = st.lists(any_records, max_size=10)


def state_of(records) -> SwarmState:
    return SwarmState(CONFIG).merge(records, now_ms=NOW).state


def lww(records) -> dict[bytes, SignedRecord]:
    """Reference model: per peer, the greatest (hlc, peer id, signature) among valid records."""
    best: dict[bytes, SignedRecord] = {}
    for r in records:
        if CONFIG.check(r, NOW) is not None:
            continue
        cur = best.get(r.peer_id)
        if cur is None or r.order_key > cur.order_key:
            best[r.peer_id] = r
    return best


def contents(state: SwarmState) -> dict[bytes, SignedRecord]:
    return {r.peer_id: r for r in state}


def join(a: SwarmState, b: SwarmState) -> SwarmState:
    return a.merge(b, now_ms=NOW).state


LAWS = settings(max_examples=150, deadline=None)


@LAWS
@given(record_lists, record_lists)
def test_merge_is_commutative(xs, ys):
    a, b = state_of(xs), state_of(ys)
    ab, ba = join(a, b), join(b, a)
    assert ab == ba
    assert contents(ab) == contents(ba)


@LAWS
@given(record_lists, record_lists, record_lists)
def test_merge_is_associative(xs, ys, zs):
    a, b, c = state_of(xs), state_of(ys), state_of(zs)
    left, right = join(join(a, b), c), join(a, join(b, c))
    assert left == right
    assert contents(left) == contents(right)


@LAWS
@given(record_lists, record_lists)
def test_merge_is_idempotent(xs, ys):
    a, b = state_of(xs), state_of(ys)
    assert join(a, a) == a and contents(join(a, a)) == contents(a)
    ab = join(a, b)
    assert join(ab, b) == ab and join(ab, a) == ab
    assert a.merge(a, now_ms=NOW).changed == frozenset()


@LAWS
@given(st.lists(any_records, max_size=25))
def test_merge_is_last_writer_wins_over_valid_records(xs):
    """Whatever the grouping and order, the state is the LWW of the valid records, and every
    invalid record that would have won is reported with its reason (ones older than the held
    entry are dropped as stale without spending a signature check on them)."""
    expected = lww(xs)
    assert contents(state_of(xs)) == expected
    assert contents(state_of(list(reversed(xs)))) == expected
    one_by_one = SwarmState(CONFIG)
    for r in xs:
        one_by_one = one_by_one.merge([r], now_ms=NOW).state
    assert contents(one_by_one) == expected
    result = SwarmState(CONFIG).merge(xs, now_ms=NOW)
    reported = {(j.reason, j.peer_id) for j in result.rejected}
    for r in xs:
        bad = CONFIG.check(r, NOW)
        winner = expected.get(r.peer_id)
        if bad is not None and (winner is None or r.order_key > winner.order_key):
            assert (bad.reason, bad.peer_id) in reported
    assert all(any(CONFIG.check(r, NOW) == j for r in xs) for j in result.rejected)


def test_lww_marker_orders_by_hlc_then_signature():
    old, new = rec(0, 0), rec(0, 1000)
    s = state_of([new, old])
    assert s.get(SIGNERS[0].peer_id) == new
    a, b = rec(0, 0, load=0), rec(0, 0, load=1)  # equivocation at one hlc
    winner = max(a, b, key=lambda r: r.signature)
    assert state_of([a, b]).get(SIGNERS[0].peer_id) == winner
    assert state_of([b, a]).get(SIGNERS[0].peer_id) == winner


def test_merge_reports_what_changed():
    s = state_of([rec(0), rec(1)])
    result = s.merge([rec(1, 1000), rec(2), rec(0)], now_ms=NOW)
    assert result.changed == {SIGNERS[1].peer_id, SIGNERS[2].peer_id}
    assert result.rejected == ()
    assert s.merge([rec(0)], now_ms=NOW).state is s


# ---- every replica refuses bad records -----------------------------------------------------------


def replicas() -> list[SwarmState]:
    """Five replicas that each know a different part of the swarm."""
    return [state_of([rec(i % 4), rec((i + 1) % 4, -1000)]) for i in range(5)]


def attack(records_wire: list[bytes]) -> bytes:
    """A delta a malicious peer sends to everyone: the bad record plus one fresh good record."""
    good = rec(5, 2000)
    return msgpack.packb((2, (*records_wire, good.wire), (), (), b""), use_bin_type=True)


def assert_every_replica_rejects(data: bytes, reason: RejectReason, victim: bytes | None) -> None:
    for before in replicas():
        delta = decode_message(data)
        result = before.merge(delta, now_ms=NOW)
        assert [j.reason for j in result.rejected] == [reason]
        if victim is not None:
            assert result.rejected[0].peer_id == victim
            assert result.state.get(victim) == before.get(victim)
        assert result.changed == {SIGNERS[5].peer_id}  # the good record still gets in
        assert len(result.state) == len(before) + 1


VICTIM = 4  # a peer no replica has heard of yet, so a bad record for it would be news to all


def test_forged_signature_is_rejected_by_every_replica():
    bad = forged("bad_signature", who=VICTIM)
    assert_every_replica_rejects(attack([bad.wire]), RejectReason.BAD_SIGNATURE, SIGNERS[VICTIM].peer_id)


def test_record_signed_by_another_key_is_rejected_by_every_replica():
    bad = forged("peer_id_mismatch", who=VICTIM)
    assert_every_replica_rejects(attack([bad.wire]), RejectReason.PEER_ID_MISMATCH, SIGNERS[VICTIM].peer_id)


def test_expired_record_is_rejected_by_every_replica():
    bad = forged("expired", who=VICTIM)
    assert_every_replica_rejects(attack([bad.wire]), RejectReason.EXPIRED, SIGNERS[VICTIM].peer_id)


def test_far_future_record_is_rejected_by_every_replica():
    bad = forged("future", who=VICTIM)
    assert_every_replica_rejects(attack([bad.wire]), RejectReason.FUTURE, SIGNERS[VICTIM].peer_id)
    # Just inside the skew bound is accepted.
    ok = rec(VICTIM, CONFIG.max_skew_ms)
    assert state_of([ok]).get(SIGNERS[VICTIM].peer_id) == ok


def test_overlong_lease_is_rejected_by_every_replica():
    bad = forged("lease_too_long", who=VICTIM)
    assert_every_replica_rejects(attack([bad.wire]), RejectReason.LEASE_TOO_LONG, SIGNERS[VICTIM].peer_id)


def test_a_stale_forgery_is_dropped_as_superseded():
    """A bad record older than the held entry loses LWW before any check is spent on it."""
    held = state_of([rec(VICTIM, 5_000)])
    result = held.merge([forged("bad_signature", who=VICTIM)], now_ms=NOW)
    assert result.state is held and result.rejected == ()


def _resign(body_fields: list, who: int = VICTIM) -> bytes:
    signer = SIGNERS[who]
    body = msgpack.packb(body_fields, use_bin_type=True)
    return msgpack.packb((body, signer.public_key, signer.sign_bytes(SIGNING_DOMAIN + body)), use_bin_type=True)


def test_oversized_record_is_rejected_by_every_replica():
    fields = list(msgpack.unpackb(rec(VICTIM, load=3).body))
    fields[11] = ["/ip4/10.0.0.1/tcp/4001/" + "x" * 200] * 20  # validly signed, 4.5 KB
    assert_every_replica_rejects(attack([_resign(fields)]), RejectReason.OVERSIZED, None)
    fields[11] = ["/ip4/10.0.0.1/tcp/4001"] * 9  # small, but more addresses than allowed
    assert_every_replica_rejects(attack([_resign(fields)]), RejectReason.OVERSIZED, SIGNERS[VICTIM].peer_id)


def test_malformed_record_is_rejected_by_every_replica():
    fields = list(msgpack.unpackb(rec(VICTIM, load=3).body))
    fields[5] = 17  # no such state
    assert_every_replica_rejects(attack([_resign(fields)]), RejectReason.MALFORMED, SIGNERS[VICTIM].peer_id)
    assert_every_replica_rejects(attack([b"\x93\xc0\xc0\xc0"]), RejectReason.MALFORMED, None)


def test_rejected_records_never_spread():
    """A replica that refused a record has nothing to forward: gossip cannot launder it."""
    from crdt import digest, sync

    a = state_of([rec(0)]).merge([forged("bad_signature", who=1)], now_ms=NOW).state
    b = SwarmState(CONFIG)
    reply = sync(digest(b), a)
    assert all(r.peer_id != SIGNERS[1].peer_id for r in reply.records)


# ---- leases, leave, gc ----------------------------------------------------------------------


def test_graceful_leave_is_a_newer_offline_record_and_gc_collects_it():
    online = rec(0, 0, lease=60_000)
    offline = rec(0, 5_000, state=ServerState.OFFLINE, lease=55_000)  # lease ends with the online one
    s = state_of([online, rec(1, lease=300_000)])
    assert [r.peer_id for r in s.live(NOW + 1)] == sorted([SIGNERS[0].peer_id, SIGNERS[1].peer_id])
    s = s.merge([offline], now_ms=NOW + 5_000).state
    assert [r.peer_id for r in s.live(NOW + 6_000)] == [SIGNERS[1].peer_id]
    assert s.get(SIGNERS[0].peer_id) == offline  # kept until its lease ends, shadowing `online`
    assert s.merge([online], now_ms=NOW + 6_000).state is s
    later = NOW + 60_000
    collected = s.gc(later)
    assert SIGNERS[0].peer_id not in collected and SIGNERS[1].peer_id in collected
    assert collected.gc(later) is collected
    # The old online record replayed after gc cannot come back: its lease has ended too.
    replay = collected.merge([online], now_ms=later)
    assert replay.state is collected
    assert [j.reason for j in replay.rejected] == [RejectReason.EXPIRED]


def test_live_excludes_joining_draining_offline_and_expired():
    s = state_of(
        [
            rec(0, state=ServerState.JOINING),
            rec(1, state=ServerState.DRAINING),
            rec(2, state=ServerState.OFFLINE),
            rec(3, lease=1_000),
            rec(4),
        ]
    )
    assert [r.peer_id for r in s.live(NOW + 2_000)] == [SIGNERS[4].peer_id]
    assert len(s.records()) == 5


def test_router_queries():
    s = state_of(
        [
            rec(0, span=(0, 8), throughput=5.0),
            rec(1, span=(4, 12), throughput=50.0),
            rec(2, span=(8, 16), throughput=20.0),
            rec(3, span=(0, 16), model=1),
            rec(4, span=(0, 16), state=ServerState.DRAINING),
        ]
    )
    m = MODELS[0]
    assert [r.peer_id for r in s.servers_for_block(m, 5, NOW)] == [SIGNERS[1].peer_id, SIGNERS[0].peer_id]
    assert [r.peer_id for r in s.servers_for_block(m, 12, NOW)] == [SIGNERS[2].peer_id]
    assert s.servers_for_block(m, 16, NOW) == []
    assert s.coverage(m, 16, NOW) == [1] * 4 + [2] * 8 + [1] * 4
    assert s.coverage(MODELS[1], 4, NOW) == [1, 1, 1, 1]
    assert s.models(NOW) == set(MODELS)
    assert [r.peer_id for r in s.records(MODELS[1])] == [SIGNERS[3].peer_id]


def test_state_value_semantics():
    a = state_of([rec(0), rec(1)])
    b = state_of([rec(1), rec(0)])
    assert a == b and hash(a) == hash(b) and a.root == b.root
    assert a != state_of([rec(0)])
    assert len(a) == 2 and SIGNERS[0].peer_id in a and b"x" not in a
    assert a.get(b"") is None
    assert a.wire_size() == sum(len(r.wire) for r in a)
    assert SwarmState.of([rec(0)], now_ms=NOW, config=CONFIG) == state_of([rec(0)])
    assert SwarmState(CONFIG) == SwarmState()


def test_merge_accepts_states_deltas_and_iterables():
    a = state_of([rec(0)])
    b = state_of([rec(1)])
    via_state = a.merge(b, now_ms=NOW).state
    via_delta = a.merge(Delta(records=(rec(1),)), now_ms=NOW).state
    via_iter = a.merge(iter([rec(1)]), now_ms=NOW).state
    assert via_state == via_delta == via_iter


def test_merging_a_state_revalidates_at_the_receivers_time():
    """A state accepted earlier is re-checked against the receiver's clock when merged."""
    a = SwarmState(CONFIG).merge([rec(0, lease=1_000)], now_ms=NOW).state
    result = SwarmState(CONFIG).merge(a, now_ms=NOW + 5_000)
    assert len(result.state) == 0
    assert [j.reason for j in result.rejected] == [RejectReason.EXPIRED]


def test_record_changes_via_replace_keep_identity_of_peer():
    base = rec(0)
    newer = SIGNERS[0].sign(dataclasses.replace(base.record, hlc=Hlc(NOW + 1, 0), load=Load(9, 0)))
    s = state_of([base]).merge([newer], now_ms=NOW).state
    assert s.get(SIGNERS[0].peer_id).record.load.active_sessions == 9


def test_encode_message_round_trips_rejections_out_of_band():
    delta = decode_message(attack([forged("bad_signature").wire]))
    assert len(delta.records) == 2 and delta.rejected == ()  # signature is checked at merge
    again = decode_message(encode_message(delta))
    assert again == delta
