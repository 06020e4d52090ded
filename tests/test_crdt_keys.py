"""crdt computes libp2p peer ids and Ed25519 signatures itself; prove it agrees with libp2p."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PublicKey, create_new_key_pair
from libp2p.peer.id import ID

from crdt import Signer, b58decode, b58encode, peer_id_from_public_key, peer_id_from_str, peer_id_to_str, verify_signature
from crdt._keys import raw_public_key

SEEDS = [bytes([i]) * 32 for i in (1, 2, 7)] + [bytes(range(32))]


@pytest.mark.parametrize("seed", SEEDS)
def test_peer_id_matches_libp2p(seed):
    kp = create_new_key_pair(seed)
    libp2p_id = ID.from_pubkey(kp.public_key)
    signer = Signer(seed)
    assert signer.peer_id == libp2p_id.to_bytes()
    assert peer_id_to_str(signer.peer_id) == libp2p_id.to_base58()
    assert peer_id_from_str(libp2p_id.to_base58()) == signer.peer_id
    assert signer.public_key == kp.public_key.serialize()
    assert peer_id_from_public_key(kp.public_key.to_bytes()) == signer.peer_id
    assert ID(signer.peer_id).to_base58() == libp2p_id.to_base58()


@pytest.mark.parametrize("seed", SEEDS)
def test_signatures_verify_both_ways(seed):
    kp = create_new_key_pair(seed)
    signer = Signer(seed)
    data = b"lamina says hi " + seed
    by_libp2p = kp.private_key.sign(data)
    by_us = signer.sign_bytes(data)
    assert by_libp2p == by_us  # RFC 8032 signatures are deterministic
    assert verify_signature(signer.public_key, data, by_libp2p)
    assert verify_signature(raw_public_key(signer.peer_id), data, by_libp2p)
    assert kp.public_key.verify(data, by_us)
    assert Ed25519PublicKey.from_bytes(raw_public_key(signer.peer_id)).verify(data, by_us)
    assert not verify_signature(signer.public_key, data + b"!", by_us)
    assert not kp.public_key.verify(data + b"!", by_us)


def test_signer_accepts_libp2p_private_key_bytes_and_the_64_byte_form():
    kp = create_new_key_pair(SEEDS[0])
    from_libp2p = Signer(kp.private_key.to_bytes())
    assert from_libp2p.peer_id == ID.from_pubkey(kp.public_key).to_bytes()
    both = Signer(SEEDS[0] + kp.public_key.to_bytes())  # seed || public key
    assert both.peer_id == from_libp2p.peer_id
    with pytest.raises(ValueError):
        Signer(SEEDS[0] + bytes(32))  # public half does not match
    with pytest.raises(ValueError):
        Signer(b"short")


def test_verify_rejects_garbage_keys_and_signatures():
    s = Signer(SEEDS[1])
    sig = s.sign_bytes(b"x")
    assert not verify_signature(b"\x00" * 36, b"x", sig)  # not an Ed25519 protobuf
    assert not verify_signature(s.public_key, b"x", sig[:63])
    assert not verify_signature(b"\x01" * 5, b"x", sig)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=48))
def test_base58_round_trips_and_matches_the_reference_implementation(data):
    import base58  # installed with libp2p

    assert b58encode(data) == base58.b58encode(data).decode()
    assert b58decode(b58encode(data)) == data


def test_base58_rejects_foreign_characters():
    with pytest.raises(ValueError):
        b58decode("0OIl")
    with pytest.raises(ValueError):
        peer_id_from_str(b58encode(b"\x00\x05hello"))
