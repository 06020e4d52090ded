"""Anti-entropy: pure sync step, delta sizes, convergence under loss/duplication/reordering,
strict wire messages with golden vectors, and a smoke run of the gossip simulation."""

import functools
import importlib.util
import json
import random
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    NUM_BUCKETS,
    Delta,
    Digest,
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
    ValidationError,
    bucket_of,
    decode_message,
    decode_record,
    digest,
    encode_message,
    sync,
    wire_size,
)
from crdt._messages import sub_scope
from crdt._state import EMPTY_BUCKET_HASH

NOW = 1_800_000_000_000
CONFIG = SwarmConfig()
MODEL = ModelId("model", bytes(32))


@functools.lru_cache(maxsize=None)
def signer(i: int) -> Signer:
    return Signer(i.to_bytes(4, "big") * 8)


@functools.lru_cache(maxsize=None)
def rec(i: int, version: int = 0, state: ServerState = ServerState.ONLINE, lease: int = 120_000) -> SignedRecord:
    """Record number `version` of peer `i` (newer versions have later hlcs), as received."""
    s = signer(i)
    r = ServerRecord(
        peer_id=s.peer_id,
        model=MODEL,
        start=i % 8,
        end=i % 8 + 8,
        state=state,
        hlc=Hlc(NOW - 50_000 + version * 1000, 0),
        expires_ms=NOW + lease,
        load=Load(version, 1 << 16),
        addrs=(f"/ip4/10.0.{i // 256 % 256}.{i % 256}/tcp/4001",),
        version="lamina/0.1.0",
    )
    return decode_record(s.sign(r).wire)


def state_of(records) -> SwarmState:
    return SwarmState(CONFIG).merge(records, now_ms=NOW).state


def exchange(a: SwarmState, b: SwarmState, *, wire: bool = False, max_bytes: int = 8 << 20):
    """One full push-pull exchange started by `a`; returns (a, b, bytes sent, messages)."""
    states = [a, b]
    msg = digest(a)
    sent, count = 0, 0
    receiver = 1
    while msg is not None:
        data = encode_message(msg)
        assert wire_size(msg) == len(data)
        sent += len(data)
        count += 1
        if wire:
            msg = decode_message(data)
        if isinstance(msg, Delta):
            result = states[receiver].merge(msg, now_ms=NOW)
            assert result.rejected == ()
            states[receiver] = result.state
        msg = sync(msg, states[receiver], max_bytes=max_bytes)
        receiver = 1 - receiver
    return states[0], states[1], sent, count


# ---- the sync step --------------------------------------------------------------------------


def test_equal_replicas_stop_after_the_digest():
    a = state_of([rec(i) for i in range(50)])
    b = state_of([rec(i) for i in reversed(range(50))])
    assert sync(digest(a), b) is None
    _, _, sent, count = exchange(a, b)
    assert count == 1 and sent == wire_size(digest(a)) < 2200


def test_one_exchange_reconciles_both_directions():
    common = [rec(i) for i in range(300)]
    a = state_of(common + [rec(1000), rec(5, 1), rec(7, 2)])
    b = state_of(common + [rec(2000), rec(5, 2), rec(9, 1)])
    a2, b2, _, count = exchange(a, b, wire=True)
    assert a2 == b2
    assert a2 == a.merge(b, now_ms=NOW).state
    assert count == 4  # digest, versions, records + want, wanted records
    assert sync(digest(a2), b2) is None


def test_a_new_node_gets_everything_in_one_exchange_without_the_version_round_trip():
    full = state_of([rec(i) for i in range(500)])
    joiner = state_of([rec(9999)])
    j2, f2, sent, count = exchange(joiner, full)
    assert j2 == f2 and len(j2) == 501
    # Buckets the joiner has empty come back as records at once; only its own bucket needs versions.
    assert count <= 4
    assert sent < full.wire_size() * 1.05 + 4000


@functools.lru_cache(maxsize=None)
def big_state(n: int = 4000) -> SwarmState:
    return state_of([rec(i) for i in range(n)])


def test_delta_size_grows_with_the_difference_not_the_state():
    a = big_state()  # ~16 peers per bucket: exchanges go through the sub-bucket level
    full = a.wire_size()
    costs = {}
    for changed in (1, 10, 50):
        b = a.merge([rec(i * 37 % 4000, 1) for i in range(changed)], now_ms=NOW).state
        a2, b2, sent, count = exchange(a, b)
        assert a2 == b2 and count <= 5
        costs[changed] = sent
    record = len(rec(0, 1).wire)
    # digest (2 KiB) + per change: 128 bytes of sub-hashes, a few 24-byte versions, the record
    for changed, sent in costs.items():
        assert sent <= 2200 + changed * (record + 135 + 4 * 24 + 30)
    assert costs[1] < full / 400  # 2.5 KB against 1.1 MB of state, most of it the fixed digest
    assert costs[1] < costs[10] < costs[50]


def test_sub_bucket_level_reconciles_both_directions_and_empty_sub_buckets():
    base = big_state()
    a = base.merge([rec(5, 1), rec(90_001)], now_ms=NOW).state
    b = base.merge([rec(5, 2), rec(7, 1), rec(90_002)], now_ms=NOW).state
    a2, b2, _, _ = exchange(a, b, wire=True)
    assert a2 == b2 == a.merge(b, now_ms=NOW).state
    # A replica missing a whole sub-bucket gets its records without a version round trip.
    bucket = bucket_of(rec(5).peer_id)
    sub = rec(5).version_entry[1] >> 4
    holes = [r for r in base if bucket_of(r.peer_id) == bucket and r.version_entry[1] >> 4 == sub]
    partial = state_of([r for r in base if r not in holes])
    r1 = sync(digest(base), partial)  # partial shows its sub-hashes, one of them empty ...
    r2 = sync(r1, base)  # ... so base sends that sub-bucket's records straight away
    assert r1.hashes and set(r2.records) == set(holes) and not r2.versions and not r2.want
    assert partial.merge(r2, now_ms=NOW).state == base


def test_sync_respects_the_byte_budget_and_the_next_exchange_carries_on():
    a = state_of([rec(i) for i in range(300)])
    b = SwarmState(CONFIG)
    budget = 20 * len(rec(0).wire)
    first = sync(digest(b), a, max_bytes=budget)
    assert 0 < sum(len(r.wire) for r in first.records) <= budget
    exchanges = 0
    while a != b:
        b, a, _, _ = exchange(b, a, max_bytes=budget)
        exchanges += 1
        assert exchanges < 100
    assert exchanges >= 300 // 40  # each exchange moves at most two budgets' worth


def test_sync_refuses_unknown_messages():
    with pytest.raises(TypeError):
        sync("hello", SwarmState())


def test_stale_and_duplicated_messages_are_harmless():
    a = state_of([rec(i) for i in range(40)])
    b = state_of([rec(i, 1) for i in range(20, 60)])
    d = digest(a)
    r1 = sync(d, b)
    # the same reply delivered twice, and again after the states already converged
    a1 = a.merge(r1, now_ms=NOW).state.merge(r1, now_ms=NOW).state
    r2 = sync(r1, a1)
    b1 = b.merge(r2, now_ms=NOW).state
    r3 = sync(r2, b1)
    a2 = a1.merge(r3, now_ms=NOW).state
    assert a2 == b1 == a.merge(b, now_ms=NOW).state
    assert a2.merge(r1, now_ms=NOW).state == a2
    assert sync(r2, a2) is None or a2.merge(sync(r2, a2), now_ms=NOW).state == a2


# ---- convergence ----------------------------------------------------------------------------

N_REPLICAS = 5
ops = st.lists(
    st.tuples(
        st.integers(0, N_REPLICAS - 1),  # where the record is published
        st.integers(0, 11),  # peer
        st.integers(0, 3),  # version
        st.sampled_from([ServerState.ONLINE, ServerState.DRAINING, ServerState.OFFLINE]),
    ),
    min_size=1,
    max_size=30,
)


def _deliver(states, inflight, rng, loss, dup):
    dest, src, msg = inflight.pop(rng.randrange(len(inflight)))  # random order: reordering
    if rng.random() < dup:
        inflight.append((dest, src, msg))  # delivered again later
    if rng.random() < loss:
        return
    if isinstance(msg, Delta):
        states[dest] = states[dest].merge(msg, now_ms=NOW).state
    reply = sync(msg, states[dest])
    if reply is not None:
        inflight.append((src, dest, reply))


@settings(max_examples=60, deadline=None)
@given(ops, st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.2, 0.5]))
def test_replicas_converge_under_loss_duplication_and_reordering(operations, seed, loss):
    rng = random.Random(seed)
    states = [SwarmState(CONFIG) for _ in range(N_REPLICAS)]
    published = []
    inflight: list = []
    pending = list(operations)
    while pending or inflight:
        roll = rng.random()
        if pending and roll < 0.3:
            at, peer, version, state = pending.pop(0)
            r = rec(peer, version, state)
            published.append(r)
            states[at] = states[at].merge([r], now_ms=NOW).state
            if rng.random() < 0.3:  # scattered: sometimes also handed straight to another replica
                other = rng.randrange(N_REPLICAS)
                states[other] = states[other].merge([r], now_ms=NOW).state
        elif inflight and roll < 0.75:
            _deliver(states, inflight, rng, loss, dup=0.15)
        else:
            a, b = rng.sample(range(N_REPLICAS), 2)
            inflight.append((b, a, digest(states[a])))
        if len(inflight) > 200:
            inflight = inflight[-50:]
    # Quiet: pairwise anti-entropy without loss until no exchange changes anything.
    for sweep in range(10):
        before = list(states)
        for i in range(N_REPLICAS):
            for j in range(N_REPLICAS):
                if i != j:
                    states[i], states[j], _, _ = exchange(states[i], states[j])
        if states == before:
            break
    expected = {}
    for r in published:
        cur = expected.get(r.peer_id)
        if cur is None or r.order_key > cur.order_key:
            expected[r.peer_id] = r
    for s in states:
        assert s == states[0]
        assert {r.peer_id: r for r in s} == expected
    assert sweep <= 2  # one sweep converges; the next confirms


# ---- wire messages --------------------------------------------------------------------------

GOLDEN_SEED = bytes(range(32))


def golden_signed() -> SignedRecord:
    from test_crdt_record import golden_record

    return Signer(GOLDEN_SEED).sign(golden_record())


EMPTY_BUCKET_HEX = "cae66941d9efbd40"
EMPTY_ROOT_HEX = "069d88983c23a8d8a8ceb56c2cf2098b"
GOLDEN_STATE_ROOT_HEX = "80831a3e84ce834a115deb072d7ad4b6"
GOLDEN_BUCKET = 3
GOLDEN_BUCKET_HASH_HEX = "77385ba0ffd86c1b"
GOLDEN_VERSION_ENTRY_HEX = "03a107bff3ce10be018bcfe5680000032beded07abb45272"


def test_golden_digests():
    assert EMPTY_BUCKET_HASH.hex() == EMPTY_BUCKET_HEX
    empty = encode_message(digest(SwarmState()))
    assert empty.hex() == "9301c410" + EMPTY_ROOT_HEX + "c50800" + EMPTY_BUCKET_HEX * NUM_BUCKETS
    signed = golden_signed()
    assert bucket_of(signed.peer_id) == GOLDEN_BUCKET
    one = SwarmState().merge([signed], now_ms=1_700_000_000_000).state
    hashes = [EMPTY_BUCKET_HEX] * NUM_BUCKETS
    hashes[GOLDEN_BUCKET] = GOLDEN_BUCKET_HASH_HEX
    assert encode_message(digest(one)).hex() == "9301c410" + GOLDEN_STATE_ROOT_HEX + "c50800" + "".join(hashes)
    assert decode_message(encode_message(digest(one))) == digest(one)


GOLDEN_SUBHASHES_HEX = "".join(f"{i:02x}" * 8 for i in range(16))


def test_golden_delta():
    signed = golden_signed()
    assert signed.version_entry.hex() == GOLDEN_VERSION_ENTRY_HEX
    scope = sub_scope(GOLDEN_BUCKET, signed.version_entry[1] >> 4)
    assert scope == 314
    delta = Delta(
        records=(signed,),
        hashes=((5, bytes.fromhex(GOLDEN_SUBHASHES_HEX)),),
        versions=((scope, signed.version_entry),),
        want=(signed.version_entry[:8],),
    )
    expected = (
        "95"  # [kind, records, hashes, versions, want]
        + "02"
        + "91"  # records: [bin16 signed record]
        + "c5"
        + f"{len(signed.wire):04x}"
        + signed.wire.hex()
        + "91"  # hashes: [[5, bin8(128)]]
        + "92"
        + "05"
        + "c480"
        + GOLDEN_SUBHASHES_HEX
        + "91"  # versions: [[uint16 314, bin8(24)]]
        + "92"
        + "cd013a"
        + "c418"
        + GOLDEN_VERSION_ENTRY_HEX
        + "c408"  # want: bin8(8)
        + GOLDEN_VERSION_ENTRY_HEX[:16]
    )
    assert encode_message(delta).hex() == expected
    assert wire_size(delta) == len(expected) // 2
    back = decode_message(bytes.fromhex(expected))
    assert back == delta


def _delta_bytes(records=(), versions=(), want=b"", hashes=(), kind=2) -> bytes:
    return msgpack.packb((kind, tuple(records), tuple(hashes), tuple(versions), want), use_bin_type=True)


def _entry(fp_byte0: int, tail: int = 0, byte1: int | None = None) -> bytes:
    rest = bytes([tail]) * 7 if byte1 is None else bytes([byte1]) + bytes([tail]) * 6
    return bytes([fp_byte0]) + rest + bytes(16)


BAD_MESSAGES = [
    (b"", RejectReason.MALFORMED),
    (b"\x91\x01", RejectReason.MALFORMED),
    (msgpack.packb((1, b"x" * 16), use_bin_type=True), RejectReason.MALFORMED),  # digest missing hashes
    (msgpack.packb((1, b"x" * 15, b"y" * 2048), use_bin_type=True), RejectReason.MALFORMED),
    (msgpack.packb((1, b"x" * 16, b"y" * 2047), use_bin_type=True), RejectReason.MALFORMED),
    (_delta_bytes(kind=3), RejectReason.MALFORMED),  # unknown kind
    (msgpack.packb((2, (), (), b""), use_bin_type=True), RejectReason.MALFORMED),  # old 4-field shape
    (msgpack.packb([2, [], [], [], ""], use_bin_type=True), RejectReason.MALFORMED),  # want as str
    (msgpack.packb({2: 1}, use_bin_type=True), RejectReason.MALFORMED),
    (_delta_bytes(records=["text"]), RejectReason.MALFORMED),
    (_delta_bytes(hashes=[(5, b"h" * 128), (4, b"h" * 128)]), RejectReason.MALFORMED),  # not ascending
    (_delta_bytes(hashes=[(5, b"h" * 127)]), RejectReason.MALFORMED),
    (_delta_bytes(hashes=[(256, b"h" * 128)]), RejectReason.MALFORMED),
    (_delta_bytes(hashes=[[5]]), RejectReason.MALFORMED),
    (_delta_bytes(versions=[(5, _entry(5)), (4, _entry(4))]), RejectReason.MALFORMED),  # not ascending
    (_delta_bytes(versions=[(4352, b"")]), RejectReason.MALFORMED),  # no such scope
    (_delta_bytes(versions=[(5, _entry(6))]), RejectReason.MALFORMED),  # entry in the wrong bucket
    (_delta_bytes(versions=[(sub_scope(5, 1), _entry(5, byte1=0x20))]), RejectReason.MALFORMED),  # wrong sub
    (_delta_bytes(versions=[(5, b""), (sub_scope(5, 1), b"")]), RejectReason.MALFORMED),  # overlapping scopes
    (_delta_bytes(versions=[(5, _entry(5, 2) + _entry(5, 1))]), RejectReason.MALFORMED),  # unsorted
    (_delta_bytes(versions=[(5, _entry(5) + _entry(5))]), RejectReason.MALFORMED),  # duplicate
    (_delta_bytes(versions=[(5, b"x" * 23)]), RejectReason.MALFORMED),
    (_delta_bytes(versions=[(5, b"".join(b"\x05" + i.to_bytes(7, "big") + bytes(16) for i in range(3000)))]), RejectReason.OVERSIZED),
    (_delta_bytes(want=b"x" * 9), RejectReason.MALFORMED),
    (_delta_bytes() + b"\x00", RejectReason.MALFORMED),  # trailing bytes
    (b"\x95\x02\xdc\x00\x00\x90\x90\xc4\x00", RejectReason.MALFORMED),  # non-canonical array16 header
    (b"\x00" * ((16 << 20) + 1), RejectReason.OVERSIZED),
]


@pytest.mark.parametrize("data,reason", BAD_MESSAGES, ids=range(len(BAD_MESSAGES)))
def test_bad_messages_are_refused_with_a_reason(data, reason):
    with pytest.raises(ValidationError) as info:
        decode_message(data)
    assert info.value.reason is reason


def test_bad_records_inside_a_delta_cost_only_themselves():
    good = rec(1)
    data = _delta_bytes(records=[b"\xc1", b"x" * 5000, good.wire])
    delta = decode_message(data)
    assert delta.records == (good,)
    assert [j.reason for j in delta.rejected] == [RejectReason.MALFORMED, RejectReason.OVERSIZED]
    result = SwarmState(CONFIG).merge(delta, now_ms=NOW)
    assert len(result.state) == 1 and len(result.rejected) == 2


def test_message_constructors_check_shapes():
    with pytest.raises(ValueError):
        Digest(b"x" * 15, b"y" * 2048)
    with pytest.raises(ValueError):
        Delta(versions=((3, b"x" * 24), (3, b"x" * 24)))
    with pytest.raises(ValueError):
        Delta(hashes=((3, b"x" * 8),))
    with pytest.raises(ValueError):
        Delta(want=(b"short",))
    with pytest.raises(TypeError):
        Delta(records=[rec(0)])
    assert not Delta() and Delta(want=(b"x" * 8,))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 400), max_size=30, unique=True),
    st.lists(st.integers(0, 400), max_size=30, unique=True),
)
def test_wire_size_is_exact_and_messages_round_trip(xs, ys):
    a, b = state_of([rec(i) for i in xs]), state_of([rec(i, 1) for i in ys])
    msg = digest(a)
    seen = 0
    while msg is not None:
        data = encode_message(msg)
        assert wire_size(msg) == len(data)
        back = decode_message(data)
        assert back == msg
        if isinstance(back, Delta):
            b = b.merge(back, now_ms=NOW).state
        msg = sync(back, b)
        a, b = b, a
        seen += 1
    assert seen <= 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_only_ever_raises_validation_error(data):
    try:
        decode_message(data)
    except ValidationError:
        pass


# ---- the simulation -------------------------------------------------------------------------


def _load_sim():
    path = Path(__file__).resolve().parent.parent / "scripts" / "sim_gossip.py"
    spec = importlib.util.spec_from_file_location("sim_gossip", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scenario", ["churn", pytest.param("cold", marks=pytest.mark.slow)])  # cold: 5-12 s
def test_gossip_simulation_converges_over_the_real_wire(scenario, capsys):
    sim = _load_sim()
    assert sim.main(["--nodes", "150", "--scenario", scenario, "--wire", "--loss", "0.05", "--churn", "0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["converged"] and out["rounds_to_converge"] <= 12
    assert out["rejected_records"] == 0
    assert out["state_records_per_node"] >= 140
