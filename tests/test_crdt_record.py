"""Server records: validation at construction, canonical encoding, signatures, golden vector."""

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from crdt import (
    MAX_RECORD_BYTES,
    SIGNING_DOMAIN,
    Hlc,
    Load,
    ModelId,
    Reachability,
    RejectReason,
    ServerRecord,
    ServerState,
    SignedRecord,
    Signer,
    ValidationError,
    decode_record,
    peer_id_to_str,
)

GOLDEN_SEED = bytes(range(32))
GOLDEN_PEER = "12D3KooWA4Xop1JaT3MHxwYMkCepYsv4iPVopMXwCz5iHYdBfeSB"
GOLDEN_BODY = (
    "dc001001c42600240801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b892b96d"
    "6574612d6c6c616d612f4c6c616d612d322d3730622d6866c4206465666768696a6b6c6d6e6f70717273747576777879"
    "7a7b7c7d7e7f8081828308180192cf0000018bcfe5680003cf0000018bcfe65260cb405ee00000000000cb40977100000000"
    "009203ce0001000092ba2f6970342f3230332e302e3131332e372f7463702f3331333337d95f2f6970342f3139382e35312e"
    "3130302e322f7463702f343030312f7032702f313244334b6f6f574b3939566f56784e4537587a79427758457a573778684b"
    "37477076383572394633563366794b53554b5048352f7032702d63697263756974019192c426002408011220fd1724385aa0"
    "c75b64fb78cd602fa1d991fdebf76b13c58ed702eac835e9f618cb4045400000000000ac6c616d696e612f302e312e30a667"
    "6f6c64656e"
)
GOLDEN_SIGNATURE = (
    "2beded07abb4527266a1a33fb4d34f82a7a8b564085b702a21360ec000cb0fddf5f369967d4b99344a39d9efb39c80d04f14"
    "09c4130b2965bb2120a43f17b40f"
)
GOLDEN_PUBKEY = "0801122003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"


def golden_record() -> ServerRecord:
    return ServerRecord(
        peer_id=Signer(GOLDEN_SEED).peer_id,
        model=ModelId("meta-llama/Llama-2-70b-hf", bytes(range(100, 132))),
        start=8,
        end=24,
        state=ServerState.ONLINE,
        hlc=Hlc(1_700_000_000_000, 3),
        expires_ms=1_700_000_060_000,
        throughput=123.5,
        inference_rps=1500.25,
        load=Load(3, 65536),
        addrs=(
            "/ip4/203.0.113.7/tcp/31337",
            "/ip4/198.51.100.2/tcp/4001/p2p/12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5/p2p-circuit",
        ),
        reachability=Reachability.RELAYED,
        next_rtts={Signer(bytes([9]) * 32).peer_id: 42.5},
        version="lamina/0.1.0",
        public_name="golden",
    )


def test_golden_vector_pins_body_signature_and_envelope():
    signer = Signer(GOLDEN_SEED)
    assert peer_id_to_str(signer.peer_id) == GOLDEN_PEER
    signed = signer.sign(golden_record())
    assert signed.body.hex() == GOLDEN_BODY
    assert signed.signature.hex() == GOLDEN_SIGNATURE
    assert signed.public_key.hex() == GOLDEN_PUBKEY
    wire = signed.wire
    # Envelope: fixarray(3), bin16 body, bin8 public key, bin8 signature.
    expected = (
        "93c5" + f"{len(GOLDEN_BODY) // 2:04x}" + GOLDEN_BODY + "c424" + GOLDEN_PUBKEY + "c440" + GOLDEN_SIGNATURE
    )
    assert wire.hex() == expected
    # libp2p's own key signs the same bytes identically.
    assert create_new_key_pair(GOLDEN_SEED).private_key.sign(SIGNING_DOMAIN + signed.body) == signed.signature
    decoded = decode_record(bytes.fromhex(expected))
    assert decoded == signed and decoded.record == golden_record()
    assert decoded.check() is None


def test_record_round_trips_and_normalises_inputs():
    rec = dataclasses.replace(golden_record(), state=2, reachability=0, throughput=7, addrs=["/ip4/1.2.3.4/tcp/1"])
    assert rec.state is ServerState.DRAINING and rec.reachability is Reachability.DIRECT
    assert rec.throughput == 7.0 and type(rec.throughput) is float
    assert rec.addrs == ("/ip4/1.2.3.4/tcp/1",)
    signed = Signer(GOLDEN_SEED).sign(rec)
    assert decode_record(signed.wire).record == rec
    assert rec.rtt_to(Signer(bytes([9]) * 32).peer_id) == 42.5
    assert rec.rtt_to(rec.peer_id) is None


def test_next_rtts_are_sorted_and_unique():
    a, b = Signer(b"\x02" * 32).peer_id, Signer(b"\x03" * 32).peer_id
    rec = dataclasses.replace(golden_record(), next_rtts=[(b, 2.0), (a, 1.0)])
    assert [p for p, _ in rec.next_rtts] == sorted([a, b])
    with pytest.raises(ValidationError) as info:
        dataclasses.replace(golden_record(), next_rtts=[(a, 1.0), (a, 2.0)])
    assert info.value.reason is RejectReason.MALFORMED


def test_model_id_from_config_is_canonical():
    m1 = ModelId.from_config("x", {"b": 1, "a": [1, 2]})
    m2 = ModelId.from_config("x", {"a": [1, 2], "b": 1})
    assert m1 == m2 and len(m1.config_hash) == 32
    assert ModelId.from_config("x", {"a": 1}) != m1


BAD_FIELDS = [
    ({"start": 5, "end": 5}, RejectReason.MALFORMED),
    ({"start": -1}, RejectReason.MALFORMED),
    ({"end": 5000}, RejectReason.MALFORMED),
    ({"state": 9}, RejectReason.MALFORMED),
    ({"throughput": float("nan")}, RejectReason.MALFORMED),
    ({"throughput": -1.0}, RejectReason.MALFORMED),
    ({"expires_ms": 1_700_000_000_000}, RejectReason.MALFORMED),  # lease ends before its own timestamp
    ({"peer_id": b"\x00" * 38}, RejectReason.MALFORMED),
    ({"addrs": ("/ip4/1.1.1.1/tcp/1",) * 9}, RejectReason.OVERSIZED),
    ({"addrs": ("/" + "a" * 300,)}, RejectReason.OVERSIZED),
    ({"addrs": (b"/ip4",)}, RejectReason.MALFORMED),
    ({"public_name": "n" * 65}, RejectReason.OVERSIZED),
    ({"version": "v" * 33}, RejectReason.OVERSIZED),
    ({"next_rtts": {Signer(bytes([i]) * 32).peer_id: 1.0 for i in range(1, 10)}}, RejectReason.OVERSIZED),
    ({"start": True}, RejectReason.MALFORMED),
]


@pytest.mark.parametrize("changes,reason", BAD_FIELDS)
def test_invalid_fields_fail_construction_with_a_reason(changes, reason):
    with pytest.raises(ValidationError) as info:
        dataclasses.replace(golden_record(), **changes)
    assert info.value.reason is reason


def test_load_and_model_are_validated_too():
    with pytest.raises(ValidationError):
        Load(-1, 0)
    with pytest.raises(ValidationError):
        ModelId("", bytes(32))
    with pytest.raises(ValidationError):
        ModelId("m", bytes(31))


def test_largest_valid_record_fits_the_wire_limit():
    signers = [Signer(bytes([i]) * 32) for i in range(1, 9)]
    rec = dataclasses.replace(
        golden_record(),
        model=ModelId("m" * 128, bytes(32)),
        addrs=tuple("/" + "a" * 255 for _ in range(8)),
        next_rtts={s.peer_id: 1.5 for s in signers},
        version="v" * 32,
        public_name="n" * 64,
        load=Load(2**32 - 1, 2**48 - 1),
    )
    assert len(Signer(GOLDEN_SEED).sign(rec).wire) < MAX_RECORD_BYTES


def test_signer_refuses_to_sign_someone_elses_record():
    with pytest.raises(ValueError):
        Signer(b"\x05" * 32).sign(golden_record())


def test_check_reports_forgeries_and_caches_the_verdict():
    signer = Signer(GOLDEN_SEED)
    good = signer.sign(golden_record())
    assert SignedRecord(good.record, good.public_key, good.signature).check() is None
    bad_sig = SignedRecord(good.record, good.public_key, bytes(64))
    assert bad_sig.check().reason is RejectReason.BAD_SIGNATURE
    other = Signer(b"\x06" * 32)
    wrong_key = SignedRecord(good.record, other.public_key, other.sign_bytes(SIGNING_DOMAIN + good.body))
    assert wrong_key.check().reason is RejectReason.PEER_ID_MISMATCH
    # A good signature pasted onto another body: the cache is keyed by the whole envelope.
    changed = dataclasses.replace(good.record, public_name="evil")
    pasted = SignedRecord(changed, good.public_key, good.signature)
    assert pasted.check().reason is RejectReason.BAD_SIGNATURE
    assert pasted.check() is pasted.check()


def _envelope(body: bytes, signer: Signer) -> bytes:
    return msgpack.packb((body, signer.public_key, signer.sign_bytes(SIGNING_DOMAIN + body)), use_bin_type=True)


def test_decode_refuses_non_canonical_and_malformed_bytes():
    signer = Signer(GOLDEN_SEED)
    good = signer.sign(golden_record())
    t = list(msgpack.unpackb(good.body))

    def reason_of(data: bytes) -> RejectReason:
        with pytest.raises(ValidationError) as info:
            decode_record(data)
        return info.value.reason

    # float32 instead of float64, an int where a float belongs, a wider-than-needed int
    assert reason_of(_envelope(msgpack.packb(t, use_bin_type=True, use_single_float=True), signer)) is RejectReason.MALFORMED
    t_int = list(t)
    t_int[8] = 123
    assert reason_of(_envelope(msgpack.packb(t_int, use_bin_type=True), signer)) is RejectReason.MALFORMED
    body = bytearray(good.body)
    idx = body.index(bytes([0x08, 0x18]))  # start=8, end=24 as positive fixints
    wide = bytes(body[:idx]) + b"\xcc\x08" + bytes(body[idx + 1 :])
    assert reason_of(_envelope(wide, signer)) is RejectReason.MALFORMED
    t_neg = list(t)
    t_neg[8] = -0.0  # normalised to 0.0 on construction, so its bytes are not canonical
    assert reason_of(_envelope(msgpack.packb(t_neg, use_bin_type=True), signer)) is RejectReason.MALFORMED
    assert dataclasses.replace(good.record, throughput=-0.0).encode() == dataclasses.replace(good.record, throughput=0.0).encode()
    # wrong field count, unknown format version, garbage, truncated, trailing bytes
    assert reason_of(_envelope(msgpack.packb(t[:-1], use_bin_type=True), signer)) is RejectReason.MALFORMED
    assert reason_of(_envelope(msgpack.packb([2, *t[1:]], use_bin_type=True), signer)) is RejectReason.MALFORMED
    assert reason_of(b"\xc1") is RejectReason.MALFORMED
    assert reason_of(good.wire[:-1]) is RejectReason.MALFORMED
    assert reason_of(good.wire + b"\x00") is RejectReason.MALFORMED
    assert reason_of(msgpack.packb([good.body, good.public_key], use_bin_type=True)) is RejectReason.MALFORMED
    assert reason_of(msgpack.packb({"body": good.body}, use_bin_type=True)) is RejectReason.MALFORMED


def test_decode_refuses_oversized_records_before_parsing():
    signer = Signer(GOLDEN_SEED)
    t = list(msgpack.unpackb(signer.sign(golden_record()).body))
    t[11] = ["/ip4/10.0.0.1/tcp/1" * 10] * 40  # 40 addrs of 190 bytes: far over the limit
    data = _envelope(msgpack.packb(t, use_bin_type=True), signer)
    assert len(data) > MAX_RECORD_BYTES
    with pytest.raises(ValidationError) as info:
        decode_record(data)
    assert info.value.reason is RejectReason.OVERSIZED
    # Under the byte limit but over a count limit: still oversized, and the peer id is known.
    t[11] = ["/ip4/10.0.0.1/tcp/1"] * 9
    with pytest.raises(ValidationError) as info:
        decode_record(_envelope(msgpack.packb(t, use_bin_type=True), signer))
    assert info.value.reason is RejectReason.OVERSIZED
    assert info.value.peer_id == signer.peer_id


texts = st.text(max_size=20)
records = st.builds(
    lambda start, length, state, wall, logical, lease, thr, rps, sessions, tokens, addrs, reach, rtts, ver, name: (
        ServerRecord(
            peer_id=Signer(GOLDEN_SEED).peer_id,
            model=ModelId("model", bytes(32)),
            start=start,
            end=start + length,
            state=state,
            hlc=Hlc(wall, logical),
            expires_ms=wall + lease,
            throughput=thr,
            inference_rps=rps,
            load=Load(sessions, tokens),
            addrs=addrs,
            reachability=reach,
            next_rtts={Signer(bytes([i + 1]) * 32).peer_id: ms for i, ms in rtts},
            version=ver,
            public_name=name,
        )
    ),
    st.integers(0, 4000),
    st.integers(1, 95),
    st.sampled_from(ServerState),
    st.integers(0, 2**47),
    st.integers(0, 2**16 - 1),
    st.integers(1, 2**40),
    st.floats(0, 1e12, allow_nan=False),
    st.floats(0, 1e12, allow_nan=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**48 - 1),
    st.lists(texts, max_size=8),
    st.sampled_from(Reachability),
    st.dictionaries(st.integers(0, 20), st.floats(0, 3.6e6, allow_nan=False), max_size=8).map(lambda d: list(d.items())),
    st.text(max_size=8),
    st.text(max_size=16),
)


@settings(max_examples=150, deadline=None)
@given(records)
def test_any_valid_record_round_trips_byte_for_byte(rec):
    signed = Signer(GOLDEN_SEED).sign(rec)
    back = decode_record(signed.wire)
    assert back.record == rec
    assert back.wire == signed.wire
    assert back.check() is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decoding_arbitrary_bytes_only_ever_raises_validation_error(data):
    try:
        decode_record(data)
    except ValidationError as exc:
        assert exc.reason in (RejectReason.MALFORMED, RejectReason.OVERSIZED)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 457), st.integers(0, 255))
def test_any_single_byte_corruption_is_refused_or_fails_verification(pos, value):
    good = Signer(GOLDEN_SEED).sign(golden_record()).wire
    corrupt = good[:pos] + bytes([value]) + good[pos + 1 :]
    if corrupt == good:
        return
    try:
        rec = decode_record(corrupt)
    except ValidationError:
        return
    assert rec.check() is not None


def test_each_distinct_signed_record_is_verified_once_per_process(monkeypatch):
    import crdt._record as record_module

    calls = []
    real = record_module.verify_signature

    def counting(public_key, data, signature):
        calls.append(signature)
        return real(public_key, data, signature)

    monkeypatch.setattr(record_module, "verify_signature", counting)
    signed = Signer(b"\x0b" * 32).sign(dataclasses.replace(golden_record(), peer_id=Signer(b"\x0b" * 32).peer_id))
    copies = [decode_record(signed.wire) for _ in range(5)]  # five separate objects, same bytes
    assert all(c.check() is None for c in copies)
    assert all(c.check() is None for c in copies)
    assert len(calls) == 1
    forged = SignedRecord(dataclasses.replace(signed.record, public_name="x"), signed.public_key, signed.signature)
    assert forged.check().reason is RejectReason.BAD_SIGNATURE  # same signature, other body: verified anew
    assert len(calls) == 2
