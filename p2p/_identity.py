"""`Identity`: a node's ed25519 key pair, its peer id, and a persistent key file.

The key file holds the libp2p protobuf encoding of the private key (the format go-libp2p and
rust-libp2p use for key files). It is created once with mode 0600, atomically (a second process
racing to create it ends up loading the winner's key), and reused on every restart so the peer id
stays the same.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key, deserialize_public_key
from libp2p.peer.id import ID

from ._errors import LocalProtocolError

logger = logging.getLogger("lamina.p2p")

ED25519_SEED_SIZE = 32


@dataclass(frozen=True)
class Identity:
    """An ed25519 key pair and the peer id derived from it."""

    key_pair: KeyPair

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def generate(cls, seed: bytes | None = None) -> "Identity":
        """A fresh identity; a 32-byte `seed` makes it deterministic (tests, fixtures)."""
        if seed is not None and (not isinstance(seed, bytes) or len(seed) != ED25519_SEED_SIZE):
            raise LocalProtocolError(f"identity seed must be {ED25519_SEED_SIZE} bytes")
        return cls(create_new_key_pair(seed))

    @classmethod
    def from_private_key_bytes(cls, data: bytes) -> "Identity":
        """From the libp2p protobuf encoding of an ed25519 private key."""
        try:
            private = deserialize_private_key(data)
        except Exception as exc:
            raise ValueError(f"not a libp2p private key: {exc}") from exc
        if private.get_type() is not KeyType.Ed25519:
            raise ValueError(f"identity keys must be ed25519, got {private.get_type().name}")
        return cls(KeyPair(private, private.get_public_key()))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> "Identity":
        """Load the identity stored at `path`, creating it (mode 0600) on first use."""
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = cls.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # in case a umask or filesystem widened it
            os.write(fd, identity.private_key_bytes())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and fails if another process created the file first
        except FileExistsError:
            return cls._load(path)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("created identity %s at %s", identity.peer_id_str, path)
        return identity

    @classmethod
    def _load(cls, path: Path) -> "Identity":
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("identity file %s is readable by others (mode %o); use 0600", path, mode & 0o777)
        return cls.from_private_key_bytes(data)

    # -- derived values ---------------------------------------------------------------------
    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    @property
    def peer_id_str(self) -> str:
        return self.peer_id.to_base58()

    @property
    def public_key_bytes(self) -> bytes:
        """The libp2p protobuf encoding of the public key (what peers verify signatures with)."""
        return self.key_pair.public_key.serialize()

    def private_key_bytes(self) -> bytes:
        return self.key_pair.private_key.serialize()

    def sign(self, data: bytes) -> bytes:
        return self.key_pair.private_key.sign(data)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id_str})"


def verify_signature(public_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """Check `signature` over `data` by the key in `public_key_bytes` (libp2p protobuf encoding)."""
    try:
        public = deserialize_public_key(public_key_bytes)
        return bool(public.verify(data, signature))
    except Exception:
        return False


def peer_id_from_public_key(public_key_bytes: bytes) -> ID:
    """The peer id that belongs to `public_key_bytes` (libp2p protobuf encoding)."""
    try:
        return ID.from_pubkey(deserialize_public_key(public_key_bytes))
    except Exception as exc:
        raise ValueError(f"not a libp2p public key: {exc}") from exc


__all__ = ["Identity", "verify_signature", "peer_id_from_public_key"]
