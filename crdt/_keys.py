"""libp2p-compatible Ed25519 identities without importing libp2p.

A libp2p Ed25519 public key is serialised as the protobuf `PublicKey{Type: Ed25519(1), Data: raw}`
= `08 01 12 20 || raw32`; since that is shorter than 42 bytes, the peer id is its *identity*
multihash `00 24 || protobuf`, shown in base58btc (`12D3KooW...`). We compute both here and use
`cryptography`'s Ed25519, which agrees bit for bit with libp2p/PyNaCl (RFC 8032 signatures are
deterministic); `tests/test_crdt_keys.py` proves it against libp2p itself.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


ED25519_PUBKEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # KeyType=Ed25519, Data: 32 bytes
PUBKEY_PB_LEN = len(ED25519_PUBKEY_PREFIX) + 32  # 36
PEER_ID_PREFIX = bytes([0x00, PUBKEY_PB_LEN]) + ED25519_PUBKEY_PREFIX  # identity multihash
PEER_ID_LEN = 2 + PUBKEY_PB_LEN  # 38
SIGNATURE_LEN = 64

_B58_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (what libp2p calls base58btc), leading zero bytes as '1'."""
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * zeros + bytes(reversed(out))).decode("ascii")


def b58decode(text: str) -> bytes:
    raw = text.encode("ascii")
    n = 0
    for c in raw:
        try:
            n = n * 58 + _B58_INDEX[c]
        except KeyError:
            raise ValueError(f"not base58: {text!r}") from None
    zeros = len(raw) - len(raw.lstrip(b"1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def public_key_protobuf(raw_public_key: bytes) -> bytes:
    """libp2p's serialised form of an Ed25519 public key (what `PublicKey.serialize()` returns)."""
    if len(raw_public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return ED25519_PUBKEY_PREFIX + raw_public_key


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """Peer id bytes (identity multihash) for a raw 32-byte or protobuf 36-byte Ed25519 key."""
    if len(public_key) == 32:
        public_key = public_key_protobuf(public_key)
    if len(public_key) != PUBKEY_PB_LEN or not public_key.startswith(ED25519_PUBKEY_PREFIX):
        raise ValueError("not a libp2p Ed25519 public key")
    return bytes([0x00, PUBKEY_PB_LEN]) + public_key


def is_ed25519_peer_id(peer_id: bytes) -> bool:
    return type(peer_id) is bytes and len(peer_id) == PEER_ID_LEN and peer_id.startswith(PEER_ID_PREFIX)


def raw_public_key(peer_id: bytes) -> bytes:
    """The 32-byte Ed25519 key inlined in an Ed25519 peer id."""
    if not is_ed25519_peer_id(peer_id):
        raise ValueError("not an Ed25519 identity-multihash peer id")
    return peer_id[len(PEER_ID_PREFIX):]


def peer_id_to_str(peer_id: bytes) -> str:
    """The usual `12D3KooW...` text form (equal to libp2p's `ID.to_base58()`)."""
    return b58encode(peer_id)


def peer_id_from_str(text: str) -> bytes:
    peer_id = b58decode(text)
    if not is_ed25519_peer_id(peer_id):
        raise ValueError(f"not an Ed25519 peer id: {text!r}")
    return peer_id


_PUBLIC_KEYS: dict[bytes, Ed25519PublicKey] = {}
_MAX_CACHED_KEYS = 1 << 17


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Verify an Ed25519 signature; `public_key` is raw (32) or libp2p protobuf (36) bytes."""
    if len(public_key) == PUBKEY_PB_LEN:
        if not public_key.startswith(ED25519_PUBKEY_PREFIX):
            return False
        public_key = public_key[len(ED25519_PUBKEY_PREFIX):]
    if len(public_key) != 32 or len(signature) != SIGNATURE_LEN:
        return False
    key = _PUBLIC_KEYS.get(public_key)
    if key is None:
        try:
            key = Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError:
            return False
        if len(_PUBLIC_KEYS) >= _MAX_CACHED_KEYS:
            _PUBLIC_KEYS.clear()
        _PUBLIC_KEYS[public_key] = key
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


class Ed25519Key:
    """An Ed25519 private key in libp2p's terms: `.peer_id`, `.public_key` (protobuf), `.sign_bytes`.

    Built from the raw 32-byte private seed, or the 64-byte `seed || public key` form (checked).
    """

    __slots__ = ("_key", "raw_public_key", "public_key", "peer_id")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) == 64:
            seed, pub = private_key[:32], private_key[32:]
        elif len(private_key) == 32:
            seed, pub = private_key, None
        else:
            raise ValueError("an Ed25519 private key is 32 bytes (seed) or 64 bytes (seed || public)")
        self._key = Ed25519PrivateKey.from_private_bytes(bytes(seed))
        self.raw_public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if pub is not None and pub != self.raw_public_key:
            raise ValueError("64-byte private key: public half does not match the seed")
        self.public_key = public_key_protobuf(self.raw_public_key)
        self.peer_id = peer_id_from_public_key(self.public_key)

    def sign_bytes(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(peer_id={peer_id_to_str(self.peer_id)})"

