"""Direct lanes: a session's bytes on a dedicated TCP connection instead of a py-libp2p stream.

py-libp2p's Python yamux and Noise cost about 650 us of CPU per small message (measured: a 1 KB
round trip on an open stream takes 1.3 ms of CPU, two dozen trio task switches per message).
A pipeline step crosses three such messages, so for latency-bound traffic (one hidden-state
vector per token) that cost is larger than the compute. A lane carries the same session (same
frames, heartbeats, deadlines, `Session` object) on its own TCP connection with a thin AEAD
record layer: one socket read, one decryption and one task switch per message.

How a lane is set up (the libp2p stream stays the control channel, and the fallback):

1. The client opens the libp2p stream as usual and sends `LaneHello`.
2. The server (a session handler registered with ``lane=True``, on a host whose lane listener
   is up) answers `LaneInvite(port, ticket, key)`: a fresh random 16-byte ticket and 32-byte
   key. The invite travels inside the Noise-encrypted libp2p stream, so only the authenticated
   peer learns them. Otherwise it answers `LaneUnavailable` and the session stays on libp2p.
3. The client connects to (the libp2p connection's remote IP, port), sends ``LANE_MAGIC +
   ticket`` and waits for the server's first record (an encrypted ``b"ok"``, which proves the
   server holds the key). Then both sides close the libp2p stream and run the session on the
   lane. If the connection or the acknowledgement fails within `LANE_CONNECT_DEADLINE`, the
   client sends `LaneDecline` and the session carries on over libp2p (NAT, firewall, relay).

Records: ``length:u32 BE || ChaCha20-Poly1305(plaintext)`` (length counts the 16-byte tag; a
plaintext is at most `RECORD_MAX` bytes). Each direction has its own key, derived with
HKDF-SHA256 from the invite key (salt: the ticket; in a private swarm, the swarm key is appended
to the invite key, so a lane cannot be used without it either), and a 64-bit counter nonce starting at 0:
TCP keeps records in order, so any dropped, replayed, reordered or altered record fails
authentication, and the lane is then broken (`trio.BrokenResourceError`). Tickets are single
use and expire after `LANE_TICKET_TTL`; a connection that does not present a live ticket within
`LANE_HELLO_DEADLINE` is closed without a word, and at most `LANE_MAX_HANDSHAKES` connections
may be waiting to present one (more are closed at once: a flood of idle connections delays
lanes, whose clients then stay on libp2p, and nothing else). At most `LANE_MAX_OPEN` lanes are
open (or invited) at once: beyond, sessions are told `LaneUnavailable` and stay on libp2p, so
lanes never take more descriptors than that.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._constants import (COALESCE_LIMIT, LANE_CONNECT_DEADLINE, LANE_HELLO_DEADLINE, LANE_MAX_HANDSHAKES,
                         LANE_MAX_OPEN, LANE_MAX_PENDING, LANE_TICKET_TTL)
from ._messages import field, message, Message

logger = logging.getLogger("lamina.p2p")

LANE_MAGIC = b"lamina-lane/1\n"
TICKET_SIZE = 16
KEY_SIZE = 32
TAG_SIZE = 16
RECORD_MAX = 256 * 1024  # plaintext bytes per record
ACK = b"ok"
_LENGTH = struct.Struct(">I")
_RECV_SIZE = 256 * 1024


@message("p2p.lane.hello", _reserved=True)
class LaneHello(Message):
    """Client -> server, first message on a lane-capable stream: may we move to a lane?"""


@message("p2p.lane.invite", _reserved=True)
class LaneInvite(Message):
    port: int = field(min_value=1, max_value=65535)
    ticket: bytes = field(min_len=TICKET_SIZE, max_len=TICKET_SIZE)
    key: bytes = field(min_len=KEY_SIZE, max_len=KEY_SIZE)


@message("p2p.lane.unavailable", _reserved=True)
class LaneUnavailable(Message):
    """Server -> client: no lane; the session stays on this stream."""

    reason: str = field(default="", max_len=200)


@message("p2p.lane.decline", _reserved=True)
class LaneDecline(Message):
    """Client -> server: the lane could not be reached; the session stays on this stream."""

    reason: str = field(default="", max_len=200)


def _keys(key: bytes, ticket: bytes, swarm_key: bytes | None = None) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key). In a private swarm the swarm key follows
    the invite's key in the input keying material: a lane needs both."""
    ikm = key if swarm_key is None else key + swarm_key
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_SIZE, salt=ticket, info=b"lamina lane v1").derive(ikm)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


class LaneStream:
    """A byte stream over one TCP connection with AEAD records; the stream interface `Session`
    uses (``read``/``write``/``close``/``reset``), with py-libp2p's EOF convention: ``read``
    returns ``b""`` at a clean end and raises `trio.BrokenResourceError` otherwise."""

    def __init__(self, sock: trio.SocketStream, send_key: bytes, recv_key: bytes,
                 on_close: Callable[[], None] | None = None) -> None:
        self._sock = sock
        self._on_close = on_close  # called once, when the lane is closed or reset
        self._fd = sock.socket.fileno()
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_nonce = 0
        self._recv_nonce = 0
        self._raw = bytearray()  # received ciphertext not yet decrypted
        self._tail: bytes | memoryview = b""  # sealed bytes the socket has not taken yet
        self._drained = False  # the last read emptied the socket (and left no whole record)
        self._eof = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<LaneStream {self.remote_address}>"

    @property
    def remote_address(self) -> tuple[str, int] | None:
        try:
            return self._sock.socket.getpeername()[:2]
        except OSError:
            return None

    @staticmethod
    def _nonce(counter: int) -> bytes:
        """4 zero bytes, then the 64-bit counter little-endian (``counter << 32`` as 12
        little-endian bytes is exactly that)."""
        return (counter << 32).to_bytes(12, "little")

    def seal(self, data: bytes | memoryview) -> bytes:
        """The records carrying `data` (split at RECORD_MAX), ready to send."""
        if len(data) <= RECORD_MAX:  # the usual case: one record
            sealed = self._send.encrypt(self._nonce(self._send_nonce), data, None)
            self._send_nonce += 1
            return _LENGTH.pack(len(sealed)) + sealed
        out = []
        view = memoryview(data)
        for i in range(0, len(view), RECORD_MAX):
            sealed = self._send.encrypt(self._nonce(self._send_nonce), view[i:i + RECORD_MAX], None)
            self._send_nonce += 1
            out.append(_LENGTH.pack(len(sealed)))
            out.append(sealed)
        return b"".join(out)

    def write_nowait(self, data: bytes | memoryview) -> bool:
        """Seal `data` and write what the socket takes at once (one syscall, no scheduler trip);
        True when all of it went out, else the rest waits here for `flush`. Call it only when
        nothing is pending."""
        if self._closed:
            raise trio.ClosedResourceError("lane is closed")
        assert not self._tail, "flush the pending bytes first"
        payload = self.seal(data)
        try:
            sent = os.write(self._fd, payload)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone
            raise trio.BrokenResourceError(f"lane write failed: {exc!r}") from exc
        if sent < len(payload):
            self._tail = memoryview(payload)[sent:]
            return False
        return True

    def write_frame_nowait(self, buffers: list[bytes | memoryview]) -> bool | None:
        """`write_nowait` for one frame given in pieces (a session's fast path: no lock, no
        shield, no task switch). None, and nothing written, while bytes of an earlier frame
        wait for `flush` or when the frame is over `COALESCE_LIMIT`; else True when the
        socket took it whole, False when the rest waits for `flush`."""
        if self._tail:
            return None
        size = 0
        for b in buffers:
            size += len(b)
        if size > COALESCE_LIMIT:
            return None
        return self.write_nowait(b"".join(buffers) if len(buffers) > 1 else buffers[0])

    @property
    def pending(self) -> bool:
        """Bytes of a record are waiting for `flush` (the socket was full)."""
        return bool(self._tail)

    async def flush(self) -> None:
        """Send the pending bytes, waiting for the socket to drain."""
        if self._tail:
            await self._sock.send_all(self._tail)
            self._tail = b""

    async def write(self, data: bytes | memoryview) -> None:
        """Send `data`. When the socket takes it all at once (the usual case for a step's few
        KB) this costs one syscall and no trip through the scheduler; otherwise the rest goes
        through trio, which waits for the socket to drain."""
        if self._closed:
            raise trio.ClosedResourceError("lane is closed")
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.flush()
        if not self.write_nowait(data):
            await self.flush()

    def interrupt_read(self) -> None:
        """Wake a task blocked in `read` with `trio.ClosedResourceError` (the session failed
        and is about to release the lane)."""
        trio.lowlevel.notify_closing(self._sock.socket)

    def _take_record(self) -> bytes | None:
        """Decrypt and remove the first complete record in the buffer (None if there is none)."""
        raw = self._raw
        if len(raw) < 4:
            return None
        (size,) = _LENGTH.unpack_from(raw, 0)
        if not TAG_SIZE <= size <= RECORD_MAX + TAG_SIZE:
            raise trio.BrokenResourceError(f"lane record length {size} is out of range")
        if len(raw) - 4 < size:
            return None
        try:
            plain = self._recv.decrypt(self._nonce(self._recv_nonce), memoryview(raw)[4:4 + size], None)
        except InvalidTag:
            raise trio.BrokenResourceError("lane record failed authentication") from None
        self._recv_nonce += 1
        del raw[:4 + size]
        return plain

    def _open_records(self) -> bytes:
        """Decrypt every complete record in the buffer (b"" if none is complete yet)."""
        first = self._take_record() if self._raw else None
        if first is None:
            return b""
        if not self._raw:  # the usual case: one record
            return first
        plain = [first]
        while (record := self._take_record()) is not None:
            plain.append(record)
        return b"".join(plain)

    async def read(self, n: int | None = None) -> bytes:
        """At least one byte of plaintext (everything decrypted so far, up to the records that
        are complete), or b"" at a clean end. `n` is ignored beyond being a hint: callers here
        parse their own frames."""
        if not self._drained:  # (after a read that emptied the socket, go straight to the wait)
            await trio.lowlevel.checkpoint_if_cancelled()  # (the wait below is a checkpoint itself)
            plain = self.read_nowait()
            if plain is not None:
                # it was there already: let other tasks run (a reader of a fast peer must not
                # hold the event loop for a whole transfer)
                await trio.lowlevel.cancel_shielded_checkpoint()
                return plain
        while True:
            await trio.lowlevel.wait_readable(self._fd)  # the wait is the checkpoint
            plain = self.read_nowait()
            if plain is not None:
                return plain

    def read_nowait(self) -> bytes | None:
        """`read` without waiting: None when no complete record is there yet."""
        if self._closed:
            raise trio.ClosedResourceError("lane is closed")
        while True:
            plain = self._open_records()
            if plain:
                return plain
            if self._eof:
                if self._raw:
                    raise trio.BrokenResourceError("lane ended in the middle of a record")
                return b""
            try:
                data = os.read(self._fd, _RECV_SIZE)
            except BlockingIOError:
                self._drained = True
                return None
            except OSError as exc:  # ECONNRESET: the peer is gone
                raise trio.BrokenResourceError(f"lane read failed: {exc!r}") from exc
            self._drained = len(data) < _RECV_SIZE  # the socket had no more
            if not data:
                self._eof = True
            else:
                self._raw += data

    async def receive_record(self) -> bytes:
        """Exactly one record's plaintext (the acknowledgement during set-up)."""
        while (record := self._take_record()) is None:
            data = await self._sock.receive_some(_RECV_SIZE)
            if not data:
                raise trio.BrokenResourceError("lane closed before its first record")
            self._raw += data
        return record

    async def close(self) -> None:
        """Send FIN, give the peer a moment to finish (so our last bytes are read, not
        discarded by an RST for unread data), then close the socket."""
        if self._closed:
            return
        self._closed = True
        self._closing()
        try:
            with trio.move_on_after(1.0):
                await self._sock.send_eof()
                while not self._eof:
                    if not await self._sock.receive_some(_RECV_SIZE):
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
            pass  # (busy: a reader is still unwinding; then no drain, just close)
        finally:
            await trio.aclose_forcefully(self._sock)

    async def reset(self) -> None:
        """Abort: the peer sees a reset (or EOF mid-frame), never a clean end."""
        if self._closed:
            return
        self._closed = True
        self._closing()
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        await trio.aclose_forcefully(self._sock)


    def _closing(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


@dataclass
class _Ticket:
    key: bytes
    expires: float
    arrived: trio.Event
    stream: LaneStream | None = None


class LaneListener:
    """Accepts lane connections and hands each one to the handler holding its ticket."""

    def __init__(self, bind_host: str, port: int = 0, swarm_key: bytes | None = None) -> None:
        self.bind_host = bind_host
        self.requested_port = port
        self._swarm_key = swarm_key  # a private swarm's key, mixed into every lane's keys
        self.port: int | None = None
        self._tickets: dict[bytes, _Ticket] = {}
        self.handshakes = 0  # connections still to present their ticket
        self.refused = 0  # connections closed because LANE_MAX_HANDSHAKES were pending
        self.open_lanes = 0  # lanes handed to a handler and not closed yet

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.requested_port, host=self.bind_host)
        self.port = listeners[0].socket.getsockname()[1]
        logger.debug("lanes listening on %s:%d", self.bind_host, self.port)
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()
        finally:
            self.port = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # not trio.serve_listeners: it closes each stream when its handler returns, and a
        # lane lives on after `_accept` hands it over
        while True:
            try:
                sock = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                logger.warning("lane listener: accept failed: %r", exc)
                await trio.sleep(0.1)
                continue
            if self.handshakes >= LANE_MAX_HANDSHAKES:
                self.refused += 1
                await trio.aclose_forcefully(sock)
                continue
            self.handshakes += 1
            nursery.start_soon(self._accept, sock)

    def invite(self) -> tuple[LaneInvite, _Ticket] | None:
        """A fresh ticket (None when lanes are not up or too many tickets are pending)."""
        if self.port is None:
            return None
        now = trio.current_time()
        for stale in [t for t, v in self._tickets.items() if v.expires < now]:
            del self._tickets[stale]
        if len(self._tickets) >= LANE_MAX_PENDING or self.open_lanes + len(self._tickets) >= LANE_MAX_OPEN:
            return None
        ticket, key = os.urandom(TICKET_SIZE), os.urandom(KEY_SIZE)
        entry = _Ticket(key, now + LANE_TICKET_TTL, trio.Event())
        self._tickets[ticket] = entry
        return LaneInvite(self.port, ticket, key), entry

    def withdraw(self, ticket: bytes) -> None:
        self._tickets.pop(ticket, None)

    def _lane_closed(self) -> None:
        self.open_lanes -= 1

    async def _accept(self, sock: trio.SocketStream) -> None:
        try:
            try:
                with trio.fail_after(LANE_HELLO_DEADLINE):
                    hello = bytearray()
                    want = len(LANE_MAGIC) + TICKET_SIZE
                    while len(hello) < want:
                        data = await sock.receive_some(want - len(hello))
                        if not data:
                            raise trio.BrokenResourceError("closed before the hello")
                        hello += data
            finally:
                self.handshakes -= 1
            if not hello.startswith(LANE_MAGIC):
                raise trio.BrokenResourceError("not a lane hello")
            ticket = bytes(hello[len(LANE_MAGIC):])
            entry = self._tickets.pop(ticket, None)
            if entry is None or entry.expires < trio.current_time():
                raise trio.BrokenResourceError("unknown or expired ticket")
            client_key, server_key = _keys(entry.key, ticket, self._swarm_key)
            self.open_lanes += 1
            lane = LaneStream(sock, send_key=server_key, recv_key=client_key, on_close=self._lane_closed)
            entry.stream = lane
            entry.arrived.set()  # the waiting handler owns the lane from here on
            with trio.move_on_after(LANE_CONNECT_DEADLINE):
                await lane.write(ACK)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.debug("lane connection refused: %r", exc)
            await trio.aclose_forcefully(sock)


async def connect_lane(ip: str, invite: LaneInvite, swarm_key: bytes | None = None) -> LaneStream:
    """Client side: connect, present the ticket, wait for the acknowledgement. Raises OSError,
    trio errors or TooSlowError (the caller falls back to libp2p). `swarm_key`: the private
    swarm's key, which the server mixes into the lane's keys too."""
    with trio.fail_after(LANE_CONNECT_DEADLINE):
        sock = await trio.open_tcp_stream(ip, invite.port)
        try:
            client_key, server_key = _keys(invite.key, invite.ticket, swarm_key)
            lane = LaneStream(sock, send_key=client_key, recv_key=server_key)
            await sock.send_all(LANE_MAGIC + invite.ticket)
            if await lane.receive_record() != ACK:
                raise trio.BrokenResourceError("unexpected lane acknowledgement")
            return lane
        except BaseException:
            await trio.aclose_forcefully(sock)
            raise


def lane_ip(stream: object) -> str | None:
    """The IP to dial a lane at: the remote IP of the direct TCP connection under a libp2p
    stream (None when it cannot be told, e.g. a relayed connection)."""
    muxed = getattr(stream, "muxed_conn", None)
    if muxed is None:
        return None
    try:
        for addr in muxed.get_transport_addresses():
            if "p2p-circuit" in str(addr):
                return None
    except Exception:
        pass
    try:
        remote = muxed.get_remote_address()
    except Exception:
        return None
    return remote[0] if remote else None
