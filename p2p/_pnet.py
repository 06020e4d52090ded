"""Private swarms: the libp2p pre-shared-key protector ("pnet"), as go-, js- and rust-libp2p do it.

Every peer of a private swarm holds the same 32-byte key, kept in a ``swarm.key`` file::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>

(``/base64/``, ``/base32/`` and ``/bin/`` encodings are read too.) Each raw connection is
wrapped before anything else runs on it (multistream-select, Noise, yamux): each side first
sends a random 24-byte nonce, then everything it writes is XORed with the XSalsa20 keystream
of (key, its own nonce); what it reads is decrypted with the key and the peer's nonce
(https://github.com/libp2p/specs/blob/master/pnet/Private-Networks-PSK-V1.md). A peer without
the key sees noise and can neither talk to the swarm nor learn anything from it.

py-libp2p 0.8.1 has a protector (`new_host(psk=...)`), but it uses Salsa20 with an 8-byte nonce,
which no other implementation speaks, and a wrong key makes its handshake hang rather than fail.
`install()` replaces it with `ProtectedConnection`, which py-libp2p's swarm then builds for
outbound dials, responder dials and inbound connections. Relayed connections it does not wrap:
the relay code calls `protect` itself.

The pnet spec authenticates nothing: a wrong key shows only as garbage. Every libp2p peer's
first bytes on a raw connection are multistream-select's header (``\\x13/multistream/1.0.0\\n``),
so `ProtectedConnection` checks that the peer's first 20 bytes decrypt to it. A peer with another
key fails that check at once, and a peer with no key sends that header in clear where its nonce
should be: both are named (`PnetHandshakeError`) instead of hanging on garbage.

XSalsa20 is HSalsa20 (one Salsa20 core, pure Python, once per connection) deriving a subkey for
pycryptodome's C Salsa20, which does the bulk work.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from Crypto.Cipher import Salsa20
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.protocol_muxer.exceptions import MultiselectClientError, MultiselectCommunicatorError, MultiselectError
from libp2p.transport.exceptions import SecurityUpgradeFailure

from ._constants import PNET_HANDSHAKE_DEADLINE
from ._errors import LaminaError

logger = logging.getLogger("lamina.p2p")

__all__ = ["SwarmKey", "SwarmKeyError", "PnetHandshakeError", "ProtectedConnection", "protect", "install",
           "dial_failure", "hsalsa20", "xsalsa20", "KEY_SIZE", "NONCE_SIZE"]

KEY_SIZE = 32
NONCE_SIZE = 24
HEADER = "/key/swarm/psk/1.0.0/"
# what every libp2p peer sends first on a raw connection (multistream-select 1.0.0's header)
MULTISTREAM_HEADER = b"\x13/multistream/1.0.0\n"
# what a dial raises when the peer's bytes were not what multistream-select expects: a key
# mismatch on one side or the other (or a peer that speaks no libp2p we offer). py-libp2p reads
# a varint length prefix from the noise a keyed peer sends a keyless one and allocates that much:
# a MemoryError or OverflowError (~3% of keyless dials to a keyed peer, measured), or a
# UnicodeDecodeError when the noise ends in a newline.
_NEGOTIATION_ERRORS = (SecurityUpgradeFailure, MultiselectError, MultiselectClientError, MultiselectCommunicatorError,
                       MemoryError, OverflowError, UnicodeDecodeError)
_GENERATE_HINT = "create one with `lamina-swarm-key --out FILE` and copy it to every peer"


class SwarmKeyError(LaminaError, ValueError):
    """A swarm key file is missing, unreadable or not in the swarm.key format."""


@dataclass(frozen=True, eq=False, repr=False)
class SwarmKey:
    """A private swarm's 32-byte pre-shared key. Its repr shows only the fingerprint."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, (bytes, bytearray)) or len(self.key) != KEY_SIZE:
            raise SwarmKeyError(f"a swarm key is {KEY_SIZE} bytes; {_GENERATE_HINT}")
        object.__setattr__(self, "key", bytes(self.key))

    @classmethod
    def generate(cls) -> "SwarmKey":
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def parse(cls, text: bytes | str) -> "SwarmKey":
        """Decode the swarm.key format (go-libp2p, js-libp2p, kubo): the header line, an
        encoding line (/base16/, /base64/, /base32/ or /bin/), then the key."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        header, _, rest = data.partition(b"\n")
        if header.strip() != HEADER.encode():
            raise SwarmKeyError(f"a swarm key's first line must be {HEADER}; {_GENERATE_HINT}")
        encoding, _, body = rest.partition(b"\n")
        encoding = encoding.strip()
        try:
            if encoding == b"/base16/":
                key = bytes.fromhex(body.strip().decode("ascii"))
            elif encoding == b"/base64/":
                key = base64.b64decode(body.strip(), validate=True)
            elif encoding == b"/base32/":
                key = base64.b32decode(body.strip())
            elif encoding == b"/bin/":
                key = body[:KEY_SIZE]  # as go-libp2p: the first 32 bytes after the line
            else:
                raise SwarmKeyError("the second line of a swarm key must be /base16/, /base64/, /base32/ or /bin/")
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            if isinstance(exc, SwarmKeyError):
                raise
            raise SwarmKeyError(f"the key in a {encoding.decode(errors='replace')} swarm key does not decode "
                                f"(a /base16/ key is {2 * KEY_SIZE} hex digits)") from None
        if len(key) != KEY_SIZE:
            raise SwarmKeyError(f"a swarm key holds {KEY_SIZE} bytes ({2 * KEY_SIZE} hex digits), "
                                f"this one {len(key)}; {_GENERATE_HINT}")
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SwarmKey":
        """Read a swarm.key file. Raises `SwarmKeyError` saying what is wrong with it."""
        path = Path(path).expanduser()
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(64 * 1024)
        except FileNotFoundError:
            raise SwarmKeyError(f"swarm key file {path} does not exist; {_GENERATE_HINT}") from None
        except IsADirectoryError:
            raise SwarmKeyError(f"swarm key file {path} is a directory, not a swarm.key file") from None
        except OSError as exc:
            raise SwarmKeyError(f"cannot read swarm key file {path}: {exc.strerror or exc}") from None
        try:
            key = cls.parse(data)
        except SwarmKeyError as exc:
            raise SwarmKeyError(f"{path} is not a valid swarm key: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("swarm key file %s is readable by others (mode %o); use 0600", path, mode & 0o777)
        return key

    def to_text(self) -> str:
        """The swarm.key file's content, in the /base16/ encoding."""
        return f"{HEADER}\n/base16/\n{self.key.hex()}\n"

    @property
    def hex(self) -> str:
        """The key as 64 hex digits (what py-libp2p's `new_host(psk=...)` takes)."""
        return self.key.hex()

    def fingerprint(self) -> str:
        """A short id of the key, safe to log (it tells keys apart and reveals nothing useful of
        a random key): the first 8 hex digits of the key's SHA-256."""
        return hashlib.sha256(self.key).hexdigest()[:8]

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SwarmKey) and hmac.compare_digest(self.key, other.key)

    def __hash__(self) -> int:
        return hash(self.key)


# --- XSalsa20 ---------------------------------------------------------------------------------
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_M32 = 0xFFFFFFFF


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """HSalsa20 (the XSalsa20 paper, section 2): 20 Salsa20 rounds over (key, 16 nonce bytes),
    without the final addition; words 0, 5, 10, 15, 6, 7, 8, 9 are the 32-byte subkey."""
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise ValueError("hsalsa20 takes a 32-byte key and a 16-byte nonce")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [_SIGMA[0], *k[:4], _SIGMA[1], *n, _SIGMA[2], *k[4:], _SIGMA[3]]

    def quarter(a: int, b: int, c: int, d: int) -> None:
        t = (x[a] + x[d]) & _M32
        x[b] ^= ((t << 7) | (t >> 25)) & _M32
        t = (x[b] + x[a]) & _M32
        x[c] ^= ((t << 9) | (t >> 23)) & _M32
        t = (x[c] + x[b]) & _M32
        x[d] ^= ((t << 13) | (t >> 19)) & _M32
        t = (x[d] + x[c]) & _M32
        x[a] ^= ((t << 18) | (t >> 14)) & _M32

    for _ in range(10):  # 10 double rounds: columns, then rows
        quarter(0, 4, 8, 12), quarter(5, 9, 13, 1), quarter(10, 14, 2, 6), quarter(15, 3, 7, 11)
        quarter(0, 1, 2, 3), quarter(5, 6, 7, 4), quarter(10, 11, 8, 9), quarter(15, 12, 13, 14)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


def xsalsa20(key: bytes, nonce: bytes) -> Any:
    """A streaming XSalsa20 cipher (pycryptodome's object: `.encrypt` / `.decrypt` go on from
    where the keystream stands): Salsa20 keyed by HSalsa20(key, nonce[:16]), nonce[16:]."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"xsalsa20 takes a {NONCE_SIZE}-byte nonce")
    return Salsa20.new(key=hsalsa20(key, nonce[:16]), nonce=nonce[16:])


# --- the protected connection ---------------------------------------------------------------
class PnetHandshakeError(RawConnError):
    """The peer's first bytes show it is not in our private swarm. `reason` is ``"mismatch"``
    (it has another key), ``"no_key"`` (it has none), ``"closed"`` (it hung up before sending
    its nonce and header: what a peer that rejected our key does) or ``"timeout"``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProtectedConnection(RawConnection):
    """A raw connection whose bytes are XSalsa20-encrypted with the swarm key (see the module
    docstring). Everything py-libp2p asks of a raw connection is passed to the one inside."""

    def __init__(self, conn: Any, key: bytes) -> None:
        super().__init__(conn, initiator=bool(getattr(conn, "is_initiator", False)))
        self._conn = conn
        self._key = key
        self._nonce = os.urandom(NONCE_SIZE)
        self._encrypt = xsalsa20(key, self._nonce)
        self._nonce_sent = False
        self._decrypt: Any = None
        self._unchecked = MULTISTREAM_HEADER  # what the peer's first plaintext bytes must be
        self._handshake_deadline: float | None = None
        self._write_lock = trio.Lock()  # keystream order == byte order on the wire

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            out = self._encrypt.encrypt(data)
            if not self._nonce_sent:
                self._nonce_sent = True
                out = self._nonce + out
            await self._conn.write(out)

    async def read(self, n: int | None = None) -> bytes:
        if self._unchecked:
            return await self._read_handshake(n)
        data = await self._conn.read(n)
        return self._decrypt.decrypt(data) if data else b""

    async def _read_handshake(self, n: int | None) -> bytes:
        """A read before the peer's nonce and first 20 bytes have all arrived and checked out,
        which they must within `PNET_HANDSHAKE_DEADLINE` of our first read."""
        if self._handshake_deadline is None:
            self._handshake_deadline = trio.current_time() + PNET_HANDSHAKE_DEADLINE
        with trio.move_on_at(self._handshake_deadline):
            if self._decrypt is None:
                self._decrypt = xsalsa20(self._key, await self._read_nonce())
            data = await self._conn.read(n)
            if not data:
                raise PnetHandshakeError("the peer closed the connection during the private-swarm handshake",
                                         "closed")
            plain = self._decrypt.decrypt(data)
            self._check_header(plain)
            return plain
        raise PnetHandshakeError(f"the peer did not complete the private-swarm handshake within "
                                 f"{PNET_HANDSHAKE_DEADLINE:g} s", "timeout")

    async def _read_nonce(self) -> bytes:
        """The peer's nonce; raises `PnetHandshakeError` when the peer sends multistream's
        header in clear instead (it has no swarm key)."""
        nonce = b""
        while len(nonce) < NONCE_SIZE:
            chunk = await self._conn.read(NONCE_SIZE - len(nonce))
            if not chunk:
                raise PnetHandshakeError("the peer closed the connection before sending its private-swarm nonce",
                                         "closed")
            nonce += chunk
            head = nonce[:len(MULTISTREAM_HEADER)]
            if len(head) == len(MULTISTREAM_HEADER) and head == MULTISTREAM_HEADER:
                raise PnetHandshakeError("the peer speaks libp2p in clear: it has no swarm key", "no_key")
        return nonce

    def _check_header(self, plain: bytes) -> None:
        want = self._unchecked[:len(plain)]
        if plain[:len(want)] != want:
            raise PnetHandshakeError("the peer's bytes do not decrypt with our swarm key: it has another one",
                                     "mismatch")
        self._unchecked = self._unchecked[len(want):]

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Any]:
        get = getattr(self._conn, "get_transport_addresses", None)
        return list(get()) if get is not None else []

    def get_connection_type(self) -> Any:
        return self._conn.get_connection_type()


# --- saying why a dial failed ------------------------------------------------------------------
_CHECK_KEYS = "check that every peer uses the same --swarm-key"


def dial_failure(exc: BaseException) -> str:
    """Why a dial failed, for "cannot connect to <peer>: ...": the swarm key's part in it when
    the handshake shows one (py-libp2p buries it in causes and `MultiError`s), else `str(exc)`."""
    found = list(_causes(exc))
    pnet = next((e for e in found if isinstance(e, PnetHandshakeError)), None)
    if pnet is not None and pnet.reason == "mismatch":
        return f"it uses another swarm key; {_CHECK_KEYS}"
    if pnet is not None and pnet.reason == "no_key":
        return f"it has no swarm key, so it is not in this private swarm; {_CHECK_KEYS}"
    if pnet is not None or any(isinstance(e, _NEGOTIATION_ERRORS) for e in found):
        return f"the handshake failed; if this is a private swarm, {_CHECK_KEYS}"
    if any(isinstance(e, ConnectionRefusedError) for e in found):
        return "the connection was refused (nothing listens at that address: is the node running?)"
    system = next((e for e in found if isinstance(e, OSError) and e.errno), None)
    if system is not None:      # no route to host, network unreachable, timed out ...
        return f"{os.strerror(system.errno).lower()} ({system})"
    return str(exc)


def _causes(exc: BaseException | None) -> Any:
    """`exc` and everything behind it: causes, contexts, groups' and `MultiError`s' members."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        members = list(getattr(e, "exceptions", None) or ()) + list(getattr(e, "errors", None) or ())
        todo += [m for m in members if isinstance(m, BaseException)]


def protect(raw_conn: Any, psk_hex: str) -> ProtectedConnection:
    """Wrap a raw connection (before security is negotiated) with the swarm key given as 64 hex
    digits, the signature of py-libp2p's `new_protected_conn`. Relayed dials call it directly."""
    try:
        key = bytes.fromhex(psk_hex)
    except (TypeError, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise SwarmKeyError(f"a swarm key is {2 * KEY_SIZE} hex digits")
    if isinstance(raw_conn, ProtectedConnection):
        # py-libp2p's hole-punch dial (`dial_addr_as_responder`) protects the connection and
        # then hands it to the inbound upgrade, which protects it again: twice would encrypt
        # twice on our side only, and the punched connection would fail its handshake
        return raw_conn
    return ProtectedConnection(raw_conn, key)


def install() -> None:
    """Make py-libp2p's swarm wrap connections with `ProtectedConnection` (idempotent). Only
    swarms built with a `psk` call it: hosts without a swarm key are unaffected."""
    import libp2p.network.swarm as swarm_module

    swarm_module.new_protected_conn = protect  # type: ignore[assignment]
