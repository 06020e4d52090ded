"""Transports: what a `Session` moves its frames through.

A `Session` (framing, heartbeats, watchdog, deadlines, failures) holds one transport and calls
it through the small interface below (`Transport`); it never asks which kind it has, and
neither does its user. Two kinds today:

* `StreamTransport`: a py-libp2p stream (yamux over Noise). A reader task reads the stream,
  feeds the session's protocol and queues decoded messages in a bounded memory channel (a slow
  consumer slows the peer down instead of growing memory). It is never cancelled mid-read:
  py-libp2p can lose bytes there.
* `LaneTransport`: a direct lane (`_lane.LaneStream`). No reader task: `receive` reads the
  socket in the receiving task, one receiver at a time, so a message costs no task switch
  between its read and its consumer (the lane's TCP buffer is the bounded queue). While nobody
  receives, the watchdog's `poll` takes in what arrived. A small frame goes out in one syscall.

A relayed or hole-punched connection is one more class with the same methods. The methods take
the session as an argument rather than holding it (no reference cycle: a session is freed as
soon as its last user lets go). The session binds the per-message ones (`receive`,
`send_nowait`) once, so a transport costs no extra call per message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import trio
from libp2p.io.exceptions import IOException

from ._constants import GOODBYE_LINGER, SESSION_RECEIVE_QUEUE
from ._errors import EndOfSession, LocalProtocolError, ReceiveInterrupted
from ._lane import LaneStream
from ._messages import Message

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["Transport", "StreamTransport", "LaneTransport", "STREAM_ERRORS"]

# what a transport's stream raises when it breaks (py-libp2p, trio, the OS)
STREAM_ERRORS = (IOException, trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError)


class Transport(Protocol):
    """The interface `Session` uses. `stream` is the byte stream underneath, with py-libp2p's
    conventions (``read`` returns ``b""`` at a clean end; ``write``, ``close``, ``reset``)."""

    kind: str  # what `Session.transport` reports: "lane", "libp2p"
    stream: Any

    def start(self, session: Session, nursery: trio.Nursery) -> None:
        """Start the session's background work for this transport (a reader task, or none)."""

    async def receive(self, session: Session) -> Message:
        """The next message when ``session._pending`` is empty. Raises the session's failure,
        `LocalProtocolError` once it is closed, `EndOfSession` after the peer's goodbye, and
        `ReceiveInterrupted` for an `interrupt_receive` no receive has seen yet."""
        ...

    def interrupt_receive(self, session: Session) -> None:
        """Make the receive waiting now, or else the next one that would wait, raise
        `ReceiveInterrupted`; messages that arrive meanwhile wait for later receives."""

    def clear_interrupt(self) -> None:
        """Forget an `interrupt_receive` that no receive has seen yet."""

    def send_nowait(self, buffers: list[bytes | memoryview]) -> bool | None:
        """Write one frame at once if this transport can without waiting (the caller holds no
        write in progress). True: it went out whole. False: it went out in part, the rest waits
        here for `flush`. None: nothing was written (the caller writes it with ``stream.write``)."""
        ...

    def unsent(self) -> bool:
        """Part of a frame `send_nowait` began waits for `flush`."""
        ...

    async def flush(self) -> None:
        """Write what `send_nowait` left, waiting for the peer to take it."""

    def poll(self, session: Session) -> bool:
        """Watchdog tick: take in what arrived while nobody receives, if this transport leaves
        that to the receiver. True when the session counts as waiting for the peer."""
        ...

    def woken(self, session: Session, exc: BaseException) -> bool:
        """A read raised `exc` because `interrupt_receive` woke it (not a failure)."""
        ...

    def fail(self, session: Session) -> None:
        """The session failed (``session._error`` is set): wake the tasks waiting for a message,
        so that they see it (after the messages received before it)."""

    async def close_receive(self, session: Session, linger: bool) -> None:
        """Clean close, after our goodbye: with `linger`, give the peer `GOODBYE_LINGER` to say
        goodbye too (messages that come meanwhile are dropped); then nothing more arrives."""

    async def kill(self) -> None:
        """Close the connection under the stream without a word (a write was cut halfway, or
        the socket is wedged)."""


_WAKE: Any = object()  # put in a libp2p session's queue to wake its receiver (`interrupt_receive`)


class StreamTransport:
    """A py-libp2p stream, read by a background task into a bounded queue."""

    kind = "libp2p"

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._queue_send, self._queue_receive = trio.open_memory_channel[Any](SESSION_RECEIVE_QUEUE)
        self._reader_done = trio.Event()
        self._interrupted = False  # `interrupt_receive` was called and no receive has seen it yet

    def start(self, session: Session, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._reader, session)

    async def receive(self, session: Session) -> Message:
        channel = self._queue_receive
        while True:
            try:
                if self._interrupted:  # what `channel.receive` does, but raise instead of waiting
                    await trio.lowlevel.checkpoint_if_cancelled()
                    msg = channel.receive_nowait()
                    await trio.lowlevel.cancel_shielded_checkpoint()
                else:
                    msg = await channel.receive()
            except trio.WouldBlock:
                self._interrupted = False
                raise ReceiveInterrupted(f"a receive on {session!r} was interrupted") from None
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._raise_ended(session)
            if msg is not _WAKE:
                return msg
            # woken by `interrupt_receive`: look again (the session's end, or a message that came
            # meanwhile, goes first; an interrupt cleared meanwhile leaves us waiting on)

    @staticmethod
    def _raise_ended(session: Session) -> NoReturn:
        """The queue is closed and empty: say why (called while handling its exception)."""
        if session._error is not None:
            raise session._error
        if session._closed:
            raise LocalProtocolError("session is closed") from None
        raise EndOfSession(f"{session.peer_id} ended the session") from None

    def interrupt_receive(self, session: Session) -> None:
        self._interrupted = True
        if self._queue_receive.statistics().tasks_waiting_receive:
            # the queue is empty: the wake-up goes straight to the waiting receiver
            try:
                self._queue_send.send_nowait(_WAKE)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # (closed: the receiver wakes up anyway, to the session's end)

    def clear_interrupt(self) -> None:
        self._interrupted = False

    def send_nowait(self, buffers: list[bytes | memoryview]) -> bool | None:
        return None  # py-libp2p writes only by awaiting

    def unsent(self) -> bool:
        return False

    async def flush(self) -> None:
        pass

    def poll(self, session: Session) -> bool:
        return False  # the reader task takes in whatever arrives

    def woken(self, session: Session, exc: BaseException) -> bool:
        return False  # the reader's reads are never interrupted

    def fail(self, session: Session) -> None:
        self._queue_send.close()  # receivers drain what is queued, then see the error

    async def close_receive(self, session: Session, linger: bool) -> None:
        if linger:
            # From now on the reader drops messages (`session._closing`); draining releases it
            # if it is blocked on a full queue. Then give the peer a moment to say goodbye too.
            self._drain()
            with trio.move_on_after(GOODBYE_LINGER):
                await self._reader_done.wait()
        self._queue_send.close()

    async def kill(self) -> None:
        # (yamux's own close would first try to write a GO_AWAY frame and block)
        secured = getattr(getattr(self.stream, "muxed_conn", None), "secured_conn", None)
        if secured is not None:
            await secured.close()
        else:
            await self.stream.reset()

    def _drain(self) -> None:
        while True:
            try:
                self._queue_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return

    async def _reader(self, session: Session) -> None:
        queue = self._queue_send
        try:
            while not session._rx_ended:
                data = await session._read_chunk()
                if data is None:
                    return
                for msg in session._take_in(data):
                    if session._closing:
                        continue
                    try:
                        queue.send_nowait(msg)  # no yield: we block in read next
                    except trio.WouldBlock:
                        try:
                            await queue.send(msg)  # backpressure: the app is behind
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            return
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                session._after_take_in()
            queue.close()  # the peer is done: receivers drain the queue, then see why
        finally:
            session._reader_waiting = False
            self._reader_done.set()


class LaneTransport:
    """A direct lane, read by the receiving task itself (no reader task)."""

    kind = "lane"

    def __init__(self, stream: LaneStream) -> None:
        self.stream = stream
        # bound once: `Session.send` calls it for every small frame
        self.send_nowait = stream.write_frame_nowait
        self.flush = stream.flush
        self._receiving = False  # a task is in `receive`
        self._receive_done: trio.Event | None = None  # for tasks waiting their turn to read
        self._interrupted = False  # `interrupt_receive` was called and no receive has seen it yet
        self._woke = False  # `interrupt_receive` woke the read under way (`woken` tells it)

    def start(self, session: Session, nursery: trio.Nursery) -> None:
        pass  # no reader task: `receive` reads, and the watchdog polls

    async def receive(self, session: Session) -> Message:
        """Read the lane until a message is complete (one receiver at a time)."""
        pending = session._pending
        while self._receiving:  # another task is reading: wait for it to finish
            if self._receive_done is None:
                self._receive_done = trio.Event()
            await self._receive_done.wait()
            if pending:
                return pending.popleft()
        self._receiving = True
        try:
            while not pending:
                if session._error is not None:
                    raise session._error
                if session._closed:
                    raise LocalProtocolError("session is closed")
                if session._rx_ended:
                    raise EndOfSession(f"{session.peer_id} ended the session")
                if self._interrupted:
                    self._interrupted = False
                    raise ReceiveInterrupted(f"a receive on {session!r} was interrupted")
                data = await session._read_chunk()
                if data is not None:
                    session._take_in_pending(data)
            return pending.popleft()
        finally:
            self._receiving = False
            if self._receive_done is not None:
                self._receive_done.set()
                self._receive_done = None

    def interrupt_receive(self, session: Session) -> None:
        """Wakes a read blocked on the socket (`LaneStream.interrupt_read`), except while a
        write of ours waits on that socket: waking its waiters would break the write. The
        peer's next bytes (a heartbeat comes within `HEARTBEAT_INTERVAL`) wake the read then."""
        self._interrupted = True
        if session._reader_waiting and not session._write_lock.locked() and not self.stream.pending:
            self._woke = True
            self.stream.interrupt_read()

    def clear_interrupt(self) -> None:
        self._interrupted = False

    def unsent(self) -> bool:
        return self.stream.pending

    def poll(self, session: Session) -> bool:
        """While no task receives, take in what the peer sent meanwhile, so its heartbeats keep
        it alive and its end or failure shows at once. Not waiting (False) when the session has
        a full queue of unread messages, like a reader blocked on backpressure."""
        if self._receiving or session._rx_ended or session._error is not None:
            return False
        pending = session._pending
        while len(pending) < SESSION_RECEIVE_QUEUE:
            try:
                data = self.stream.read_nowait()
            except STREAM_ERRORS as exc:
                session._broke("from", exc)
                return False
            if data is None:
                return True
            session._alive_at = session._now()
            session._take_in_pending(data)
            if session._rx_ended:
                return False
        return False

    def woken(self, session: Session, exc: BaseException) -> bool:
        # (not `_interrupted`: a `clear_interrupt` may come before the woken read runs, and
        # the read then goes on waiting)
        woke, self._woke = self._woke, False
        return woke and session._error is None and not session._closed and type(exc) is trio.ClosedResourceError

    def fail(self, session: Session) -> None:
        if session._reader_waiting:
            self.stream.interrupt_read()  # the read wakes and the receiver sees the error

    async def close_receive(self, session: Session, linger: bool) -> None:
        pass  # the lane drains to the peer's end of stream itself when it closes

    async def kill(self) -> None:
        await self.stream.reset()
