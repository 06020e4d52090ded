"""`Session`: the thin trio layer that runs a `SessionProtocol` over one transport.

The transport (`_transport`: a py-libp2p stream, or a direct lane) moves the bytes and decides
who reads them: a reader task that queues decoded messages (libp2p), or the receiving task
itself (a lane). The session does the rest, the same on every transport, with two small tasks:

* a heartbeat sender that writes a `Heartbeat` whenever we have been quiet for
  `HEARTBEAT_INTERVAL`;
* a watchdog that declares the peer frozen (`PeerFrozenError`) when the reader has been waiting
  for bytes for more than `HEARTBEAT_TIMEOUT`, and a write stalled (`PeerTimeoutError`) when
  the peer stopped accepting bytes. It does not blame the peer for our own event-loop stalls.

Every read is bounded by the watchdog, every write by the watchdog and the write-stall deadline.
A failure is stored once and re-raised by every later `send`/`receive`; messages received
completely before a failure are still delivered first. A message cut off by EOF or reset is
never delivered.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from libp2p.peer.id import ID

from ._constants import (
    COALESCE_LIMIT,
    FRAME_GRACE,
    FRAME_MIN_RATE,
    GOODBYE_LINGER,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT,
    MAX_FRAME_SIZE,
    READ_SIZE,
    RESET_DEADLINE,
    WATCHDOG_TICK,
    WRITE_CHUNK,
    WRITE_STALL_DEADLINE,
)
from ._errors import (
    EndOfSession,
    ErrorCode,
    LocalProtocolError,
    P2PError,
    PeerBrokenError,
    PeerFrozenError,
    PeerTimeoutError,
    RemoteError,
    RemoteProtocolError,
    reraise_single,
)
from ._messages import ErrorMessage, Goodbye, Message
from ._protocol import SessionProtocol, State
from ._transport import STREAM_ERRORS, Transport
from ._wire import encode

logger = logging.getLogger("lamina.p2p")


YIELD_EVERY_CHUNKS = 16  # pieces of a big frame (about 1 MB) between two forced yields


def _chunks(buffers: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """The pieces to hand to the libp2p stream: small frames joined into one write, everything
    cut into `WRITE_CHUNK`-byte pieces (one yamux frame = one Noise message each)."""
    total = sum(len(b) for b in buffers)
    if total <= COALESCE_LIMIT and len(buffers) > 1:
        buffers = [b"".join(buffers)]
    out: list[bytes | memoryview] = []
    for b in buffers:
        if len(b) <= WRITE_CHUNK:
            out.append(b)
        else:
            view = memoryview(b)
            out.extend(view[i : i + WRITE_CHUNK] for i in range(0, len(view), WRITE_CHUNK))
    return out


class Session:
    """A bidirectional stream of messages with one peer. Use it inside the `async with` that
    opened it (`Host.open_session` or a session handler); do not keep it beyond.

    `send(msg)` and `receive()` may run concurrently from different tasks. Iterating the session
    yields messages until the peer says goodbye. An `ErrorMessage` from the peer is raised as
    `RemoteError`. The session works the same on every transport (`_transport`).
    """

    def __init__(self, transport: Transport, peer_id: ID, protocol_id: str, *, max_frame_size: int = MAX_FRAME_SIZE):
        self._transport = transport
        self._stream = transport.stream
        # bound once: called per message
        self._next_message = transport.receive
        self._send_nowait = transport.send_nowait
        self.peer_id = peer_id
        self.protocol_id = protocol_id
        self._proto = SessionProtocol(max_frame_size=max_frame_size)
        self._decoder = self._proto._decoder  # the watchdog times the frame in progress
        self._frame_seen = 0  # the decoder's frame count when the watchdog last looked
        self._frame_wait = 0.0  # seconds spent waiting for the bytes of the frame in progress
        self._write_lock = trio.Lock()
        self._error: BaseException | None = None
        self._cancel_on_fail: set[trio.CancelScope] = set()
        self._background = trio.CancelScope()
        self._closing = False
        self._closed = False
        # trio's clock, bound once: `trio.current_time()` costs three Python frames per call,
        # and a step reads the clock several times
        self._now = trio.lowlevel.current_clock().current_time
        now = self._now()
        self.opened_at = now  # when the stream began (a handler's first-message deadline counts from it)
        self._last_tx = now
        self._alive_at = now  # last time the peer showed signs of life (or we started waiting)
        self._reader_waiting = False
        self._write_progress_at: float | None = None  # set while a write is in progress
        self._in_flight: trio.CancelScope | None = None  # the shielded libp2p write under way
        self._connection_corrupt = False
        self._tx_whole = True  # every frame we started writing went out complete
        self._error_frame: ErrorMessage | None = None  # to send the peer when we release the stream
        # decoded messages not received yet, returned before any other: a lane's reads put
        # them here (a libp2p stream's messages wait in its reader's queue); `_unreceive` puts
        # one back
        self._pending: deque[Message] = deque()
        self._rx_ended = False  # the peer's goodbye (or the end of its bytes) was read

    def __repr__(self) -> str:
        return f"<Session {self.protocol_id} with {self.peer_id}>"

    # -- public API ----------------------------------------------------------------------------
    @property
    def transport(self) -> str:
        """"lane" when the session runs on a direct lane (see `p2p._lane`), else "libp2p". For
        logs and tests: a session behaves the same on each."""
        return self._transport.kind

    @property
    def failed(self) -> BaseException | None:
        """The error that ended the session, if it failed."""
        return self._error

    async def send(self, msg: Message) -> None:
        """Send one message. Raises `LocalProtocolError` (invalid use), `PeerBrokenError`,
        `PeerFrozenError`/`PeerTimeoutError`, or the error that already ended the session."""
        self._raise_if_unusable()
        buffers = self._proto.send(msg)
        if not self._write_lock.locked():
            # a transport that can (a lane: one syscall) takes a small frame at once: no lock,
            # no shield, no task switch (nothing else can write meanwhile: no await until it is out)
            try:
                sent = self._send_nowait(buffers)
            except STREAM_ERRORS as exc:
                raise self._broke("to", exc) from exc
            if sent:
                self._last_tx = self._now()
                return
            if sent is False:  # the rest of the frame waits in the transport: flush it
                self._tx_whole = False
                buffers = []
        await self._write(buffers)

    async def receive(self) -> Message:
        """The next message. Raises `EndOfSession` after the peer's goodbye, `RemoteError` for an
        error frame, `PeerBrokenError`/`PeerFrozenError`/`RemoteProtocolError` on failure."""
        pending = self._pending
        msg = pending.popleft() if pending else await self._next_message(self)
        if type(msg) is ErrorMessage:
            raise RemoteError(msg.code, msg.message, peer_id=self.peer_id)
        return msg

    def interrupt_receive(self) -> None:
        """Make the `receive` waiting now (or else the next one that would wait) raise
        `ReceiveInterrupted` at once. The session goes on as it was: messages that arrive are
        returned by later receives. For a task that reads one session but must turn to something
        else as soon as another task asks (a timer, news from another session); it costs that
        task nothing while no one asks, unlike a cancel scope around every receive.

        On a lane, while a write of ours waits on a full socket, the waiting receive is woken
        by the peer's next bytes instead (a heartbeat comes within `HEARTBEAT_INTERVAL`):
        waking the socket's waiters would break that write."""
        self._transport.interrupt_receive(self)

    def clear_interrupt(self) -> None:
        """Forget an `interrupt_receive` that no receive has seen yet."""
        self._transport.clear_interrupt()

    def limit_incoming(self, max_frame_size: int, reason: str = "") -> None:
        """From now on refuse frames from the peer bigger than `max_frame_size` (what this
        session can use: a handler knows it once the session's first message says what it is
        for; never more than the session's `max_frame_size`), at their length prefix, before any of their bytes are buffered; `reason` names the
        limit in the error (`RemoteProtocolError` here, a PROTOCOL_ERROR frame to the peer).
        A frame already under way is not affected; what we send is not limited by it."""
        if max_frame_size < 1:
            raise LocalProtocolError("max_frame_size must be >= 1")
        if max_frame_size >= self._proto.max_frame_size:  # never above the host's own limit
            max_frame_size, reason = self._proto.max_frame_size, ""
        self._decoder.max_frame_size = max_frame_size
        self._decoder.limit_reason = reason

    def _unreceive(self, msg: Message) -> None:
        """Put one message back: the next `receive` returns it (the host peeks at a first
        message to see whether the client asks for a lane)."""
        self._pending.appendleft(msg)

    def __aiter__(self) -> "Session":
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except EndOfSession:
            raise StopAsyncIteration from None

    async def send_goodbye(self) -> None:
        """Half-close: we will send nothing more (the peer's receive ends with EndOfSession)."""
        self._raise_if_unusable()
        if self._proto.our_state is State.OPEN:
            await self._write(self._proto.goodbye())

    # -- internals: lifecycle ------------------------------------------------------------------
    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transport's reader (if it has one), the heartbeat sender and the watchdog
        until the session ends."""
        with self._background:
            async with trio.open_nursery() as nursery:
                self._transport.start(self, nursery)
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._watchdog)
                task_status.started()

    def _fail(self, exc: BaseException, *, abort_write: bool = False) -> None:
        """Record the first failure, wake every waiter, stop background work. `abort_write`
        also aborts a libp2p write in flight (the peer is not taking bytes)."""
        if self._error is None:
            self._error = exc
            logger.debug("session %r failed: %r", self, exc)
        self._transport.fail(self)  # receivers get what came before, then the error
        for scope in list(self._cancel_on_fail):
            scope.cancel()
        if abort_write and self._in_flight is not None:
            self._in_flight.cancel()
        self._background.cancel()

    def _broke(self, direction: str, exc: BaseException) -> BaseException:
        """Fail the session because the stream raised `exc` reading ("from") or writing ("to");
        the session's error (the first failure, if one came before)."""
        self._fail(PeerBrokenError(f"stream {direction} {self.peer_id} broke: {exc!r}", peer_id=self.peer_id))
        assert self._error is not None
        return self._error

    def _raise_if_unusable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed or self._closing:
            raise LocalProtocolError("session is closed")

    async def _close(self) -> None:
        """Clean close: goodbye, wait briefly for the peer's, then close (or reset) the stream."""
        if self._closed:
            return
        self._closing = True
        if self._error is None and self._proto.our_state is State.OPEN:
            try:
                with trio.fail_after(RESET_DEADLINE + GOODBYE_LINGER):
                    await self._write(self._proto.goodbye())
            except (P2PError, trio.TooSlowError):
                pass
        linger = self._error is None and self._proto.their_state is State.OPEN
        await self._transport.close_receive(self, linger)
        self._closed = True  # (no checkpoint since the receivers were woken: they see it)
        self._background.cancel()
        await self._release_stream()

    async def _abort(self, reason: BaseException | None = None) -> None:
        """Failure close: reset the stream without ceremony."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            self._error = reason or LocalProtocolError("session aborted")
        self._fail(self._error)
        await self._release_stream()

    async def _release_stream(self) -> None:
        """Close our side with a FIN when every frame we started went out whole (the peer
        reads what we sent, then EOF: after our goodbye that is a clean end, before it the peer
        sees `PeerBrokenError`). Reset when a frame of ours is cut or still being written: a
        yamux reset also discards whatever the peer has not read yet, an error frame included.
        Neither needs the write lock: yamux interleaves them with a write in flight at frame
        boundaries, and that write then fails."""
        if self._connection_corrupt:
            await self._kill_connection()
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(RESET_DEADLINE) as scope:
                try:
                    if self._error_frame is not None:
                        async with self._write_lock:  # after a frame in flight, never inside it
                            if self._tx_whole:
                                await self._stream.write(b"".join(encode(self._error_frame) + encode(Goodbye())))
                    if self._tx_whole:
                        await self._stream.close()
                    else:
                        await self._stream.reset()
                except Exception:  # the stream is being thrown away; nothing useful to do
                    pass
        if scope.cancelled_caught:  # could not even write a few bytes: wedged, or cut mid-write
            await self._kill_connection()

    async def _kill_connection(self) -> None:
        """Close the TCP connection under the stream. Needed when a write was aborted halfway
        (the yamux byte stream is corrupt for every stream on it) or the socket is wedged;
        yamux's own close would first try to write a GO_AWAY frame and block."""
        logger.debug("closing the connection to %s (%s)", self.peer_id, self._error)
        with trio.CancelScope(shield=True), trio.move_on_after(RESET_DEADLINE):
            try:
                await self._transport.kill()
            except Exception:
                pass

    # -- internals: I/O ------------------------------------------------------------------------
    async def _write(self, buffers: list[bytes | memoryview]) -> None:
        try:
            self._write_lock.acquire_nowait()  # uncontended: skip a scheduler round trip
        except trio.WouldBlock:
            await self._write_lock.acquire()
        try:
            if self._error is not None:
                raise self._error
            await self._write_locked(buffers)
        finally:
            self._write_lock.release()

    async def _write_locked(self, buffers: list[bytes | memoryview]) -> None:
        """Write one frame. Each libp2p write is shielded: cancelling py-libp2p in the middle
        of a write leaves half a yamux or Noise frame on the TCP stream and corrupts the whole
        connection. A caller's deadline therefore takes effect between chunks (the session is
        then unusable, the connection is fine); only the watchdog aborts a chunk in flight,
        and then closes the connection."""
        completed = False
        self._tx_whole = False
        try:
            self._write_progress_at = self._now()
            if self._transport.unsent():  # the rest of a frame `send` began
                with trio.CancelScope(shield=True) as flight:
                    self._in_flight = flight
                    await self._transport.flush()
                self._in_flight = None
                if flight.cancelled_caught:
                    self._connection_corrupt = True
                    raise self._error or PeerTimeoutError("write aborted", peer_id=self.peer_id)
            for i, chunk in enumerate(_chunks(buffers)):
                if i % YIELD_EVERY_CHUNKS == 0 and i:
                    # a fast peer can take a big frame without our socket ever filling (a
                    # lane's writes then never wait): let the other tasks run now and then
                    await trio.lowlevel.checkpoint()
                elif i:
                    await trio.lowlevel.checkpoint_if_cancelled()
                with trio.CancelScope(shield=True) as flight:
                    self._in_flight = flight
                    await self._stream.write(chunk)
                self._in_flight = None
                if flight.cancelled_caught:
                    self._connection_corrupt = True
                    raise self._error or PeerTimeoutError("write aborted", peer_id=self.peer_id)
                self._write_progress_at = self._last_tx = self._now()
            completed = self._tx_whole = True
        except STREAM_ERRORS as exc:
            raise self._broke("to", exc) from exc
        finally:
            self._in_flight = None
            self._write_progress_at = None
            if not completed and self._error is None:
                # a caller's deadline cut our frame between two chunks: this session's byte
                # stream is unusable (the peer sees a reset), the connection is intact
                self._fail(LocalProtocolError("a send was cancelled mid-frame; the session is unusable"))
        self._last_tx = self._now()

    async def _read_chunk(self) -> bytes | None:
        """One read of the stream (b"" at its end), watched by the watchdog; None when it
        failed (the failure is recorded)."""
        self._alive_at = self._now()
        self._reader_waiting = True
        try:
            data = await self._stream.read(READ_SIZE)
        except EOFError:  # libp2p's StreamEOF: clean FIN or connection gone alike
            data = b""
        except STREAM_ERRORS as exc:
            if not self._transport.woken(self, exc):  # (woken: by `interrupt_receive`)
                self._broke("from", exc)
            return None
        finally:
            self._reader_waiting = False
        self._alive_at = self._now()
        return data

    def _take_in(self, data: bytes) -> list[Message]:
        """The messages `data` completes, up to the peer's goodbye. Sets `_rx_ended` when the
        peer is done sending (goodbye, end of stream, invalid bytes). A failure with no message
        before it fails the session here; invalid bytes after messages fail it in
        `_after_take_in`, which the caller runs once those messages are queued."""
        if not data:
            self._rx_ended = True
            try:
                self._proto.receive_eof()
            except PeerBrokenError as exc:
                exc.peer_id = self.peer_id
                # a crashed peer will not read this; a half-closing one learns why
                self._report_protocol_error(exc)
            return []
        try:
            messages = self._proto.receive_data(data)
        except RemoteProtocolError as exc:
            self._rx_ended = True
            self._report_protocol_error(exc)
            return []
        if self._proto.error is not None:  # invalid bytes after these messages: they go first
            self._rx_ended = True
        if self._proto.their_state is State.DONE:
            self._rx_ended = True
            if messages and type(messages[-1]) is Goodbye:
                messages.pop()
        return messages

    def _after_take_in(self) -> None:
        if self._proto.error is not None and self._error is None:
            self._report_protocol_error(self._proto.error)

    def _take_in_pending(self, data: bytes) -> None:
        """`data`'s messages join the pending ones, then any error after them (a transport
        that reads in the receiving task)."""
        self._pending.extend(self._take_in(data))
        self._after_take_in()

    def _report_protocol_error(self, exc: P2PError) -> None:
        """Fail, and have the peer told what was wrong with its bytes when the stream is
        released (`_release_stream` writes the error frame, in order after any frame in flight)."""
        logger.debug("protocol error from %s on %s: %s", self.peer_id, self.protocol_id, exc)
        if self._error is None and self._proto.our_state is State.OPEN:
            self._error_frame = ErrorMessage(ErrorCode.PROTOCOL_ERROR, str(exc)[:1000])
        self._fail(exc)

    async def _heartbeats(self) -> None:
        while self._proto.our_state is State.OPEN and self._error is None:
            due = self._last_tx + HEARTBEAT_INTERVAL
            if self._now() < due:
                await trio.sleep_until(due)
                continue
            if self._write_lock.locked():  # a frame is being written (its pieces count as traffic)
                await trio.sleep(HEARTBEAT_INTERVAL / 2)
                continue
            if self._proto.our_state is not State.OPEN or self._closing:
                return
            try:
                await self._write(self._proto.heartbeat())
            except P2PError:
                return

    async def _watchdog(self) -> None:
        last_tick = self._now()
        while True:
            await trio.sleep(WATCHDOG_TICK)
            now = self._now()
            elapsed = now - last_tick
            stalled = elapsed > 2 * HEARTBEAT_INTERVAL
            last_tick = now
            if stalled:
                # our own event loop was blocked; bytes may be waiting unread. Judge next tick.
                self._alive_at = max(self._alive_at, now)
                if self._write_progress_at is not None:
                    self._write_progress_at = max(self._write_progress_at, now)
                continue
            waiting = self._reader_waiting or self._transport.poll(self)
            if waiting and now - self._alive_at > HEARTBEAT_TIMEOUT:
                silent = now - self._alive_at
                self._fail(PeerFrozenError(f"{self.peer_id} sent nothing for {silent:.1f}s (no heartbeats)", peer_id=self.peer_id), abort_write=True)
                return
            if self._frame_too_slow(waiting, elapsed):
                return
            progress = self._write_progress_at
            if progress is not None and now - progress > WRITE_STALL_DEADLINE:
                self._fail(PeerTimeoutError(f"{self.peer_id} accepted no bytes for {now - progress:.1f}s", peer_id=self.peer_id), abort_write=True)
                return


    def _frame_too_slow(self, waiting: bool, elapsed: float) -> bool:
        """Watchdog tick: fail the session (and tell the peer why) when the frame arriving has
        had `FRAME_GRACE` s and then less than `FRAME_MIN_RATE` bytes per second of waiting
        (a slow loris: heartbeats never come while a frame is cut off halfway, but each of its
        bytes keeps the peer looking alive). Only time spent waiting for the peer's bytes
        counts, not time we left them unread."""
        decoder = self._decoder
        if not decoder.in_frame or decoder.frames != self._frame_seen:
            self._frame_seen = decoder.frames
            self._frame_wait = 0.0
            if not decoder.in_frame:
                return False
        if waiting:
            self._frame_wait += elapsed
        over = self._frame_wait - FRAME_GRACE
        got, expected = decoder.pending
        if over <= 0 or got >= FRAME_MIN_RATE * over:
            return False
        message = (f"{self.peer_id} sent {got} of the {expected} bytes of a frame in {self._frame_wait:.1f} s: "
                   f"too slow (after {FRAME_GRACE:g} s a frame must arrive at {FRAME_MIN_RATE} bytes/s or more)")
        if self._error is None and self._proto.our_state is State.OPEN:
            self._error_frame = ErrorMessage(ErrorCode.PROTOCOL_ERROR, message)
        self._fail(PeerTimeoutError(message, peer_id=self.peer_id))
        return True


@asynccontextmanager
async def run_session(transport: Transport, peer_id: ID, protocol_id: str, *, max_frame_size: int = MAX_FRAME_SIZE,
                      max_incoming: int | None = None, incoming_reason: str = "",
                      opened_at: float | None = None) -> AsyncIterator[Session]:
    """Run a `Session` over `transport` for the duration of the block.

    A normal exit says goodbye and closes the stream cleanly; an exception resets it.
    `max_incoming`: a lower limit for the frames the peer sends (`Session.limit_incoming`),
    in force from the first byte. `opened_at`: when the stream this session continues began
    (a session moved to a lane), for `Session.opened_at`.
    """
    session = Session(transport, peer_id, protocol_id, max_frame_size=max_frame_size)
    if opened_at is not None:
        session.opened_at = opened_at
    if max_incoming is not None and max_incoming < max_frame_size:
        session.limit_incoming(max_incoming, incoming_reason)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._serve)
            try:
                yield session
            except BaseException as exc:
                await session._abort(exc if isinstance(exc, Exception) else None)
                raise
            else:
                await session._close()
            finally:
                session._background.cancel()
    except BaseExceptionGroup as group:
        # The background tasks never raise, so this is the body's own exception wrapped by
        # the nursery: hand it on unwrapped (callers write `except p2p.PeerBrokenError`).
        reraise_single(group)
