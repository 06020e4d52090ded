"""The session state machine, sans-IO: messages in, buffers out; bytes in, messages out.

One stream carries one session. Each direction is OPEN until its sender sends `Goodbye`, then
DONE. The whole state machine is this table::

    direction state   event          next state   otherwise
    OPEN              message        OPEN
    OPEN              Goodbye        DONE
    OPEN              EOF            -            PeerBrokenError (cut off, maybe mid-frame)
    DONE              message        -            Local/RemoteProtocolError (after goodbye)
    DONE              Goodbye        -            Local/RemoteProtocolError (twice)
    DONE              EOF            DONE         (the normal end)

`Heartbeat` frames are consumed here and never returned: liveness is the I/O layer's business
(any byte counts). `ErrorMessage` frames are returned like any other message.
"""

from __future__ import annotations

import enum

from ._constants import MAX_FRAME_SIZE
from ._errors import LocalProtocolError, PeerBrokenError, RemoteProtocolError
from ._messages import Goodbye, Heartbeat, Message
from ._wire import FrameDecoder, encode


class State(enum.Enum):
    OPEN = "open"
    DONE = "done"


_GOODBYE = Goodbye()
_HEARTBEAT = Heartbeat()

# (state, event) -> next state; a missing entry is a protocol violation
_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.OPEN, "message"): State.OPEN,
    (State.OPEN, "goodbye"): State.DONE,
}


def _event(msg: Message) -> str:
    return "goodbye" if type(msg) is Goodbye else "message"


class SessionProtocol:
    """Both directions of one session. Raises `LocalProtocolError` for our misuse,
    `RemoteProtocolError` for the peer's, `PeerBrokenError` for an EOF before its goodbye."""

    def __init__(self, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self.our_state = State.OPEN
        self.their_state = State.OPEN
        self.max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._error: RemoteProtocolError | None = None

    # -- outgoing ------------------------------------------------------------------------------
    def send(self, msg: Message) -> list[bytes | memoryview]:
        """Buffers to write for `msg` (a `Goodbye` closes our direction)."""
        if not isinstance(msg, Message):
            raise LocalProtocolError(f"can only send p2p.Message instances, not {type(msg).__name__}")
        if type(msg) is Heartbeat:
            return self.heartbeat()
        if self.our_state is State.OPEN and type(msg) is not Goodbye:  # the usual case, no lookup
            return encode(msg, max_frame_size=self.max_frame_size)
        nxt = _TRANSITIONS.get((self.our_state, _event(msg)))
        if nxt is None:
            raise LocalProtocolError(f"cannot send {type(msg).__name__}: we already said goodbye")
        buffers = encode(msg, max_frame_size=self.max_frame_size)
        self.our_state = nxt
        return buffers

    def goodbye(self) -> list[bytes | memoryview]:
        return self.send(_GOODBYE)

    def heartbeat(self) -> list[bytes | memoryview]:
        if self.our_state is not State.OPEN:
            raise LocalProtocolError("cannot send a heartbeat: we already said goodbye")
        return encode(_HEARTBEAT)

    # -- incoming ------------------------------------------------------------------------------
    @property
    def error(self) -> RemoteProtocolError | None:
        """A protocol error found after the messages last returned (raised by the next call)."""
        return self._error

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Messages completed by `data` (heartbeats dropped, `Goodbye` included).

        Messages before an invalid frame are returned, with the error kept in `error`; with
        none before it, the error is raised at once.
        """
        if self._error is not None:
            raise self._error
        out: list[Message] = []
        try:
            for msg in self._decoder.feed(data):
                if type(msg) is Heartbeat:
                    if self.their_state is not State.OPEN:
                        raise RemoteProtocolError("peer sent a heartbeat after its goodbye")
                    continue
                if self.their_state is not State.OPEN or type(msg) is Goodbye:
                    nxt = _TRANSITIONS.get((self.their_state, _event(msg)))
                    if nxt is None:
                        raise RemoteProtocolError(f"peer sent {type(msg).__name__} after its goodbye")
                    self.their_state = nxt
                out.append(msg)
            if self._decoder.error is not None:
                raise self._decoder.error
        except RemoteProtocolError as exc:
            self._error = exc
            if not out:
                raise
        return out

    def receive_eof(self) -> None:
        """The stream ended. Fine after the peer's goodbye; otherwise the peer broke."""
        if self._error is not None:
            raise self._error
        try:
            self._decoder.feed_eof()
        except RemoteProtocolError as exc:
            raise PeerBrokenError(f"peer broke off mid-frame: {exc}") from exc
        if self.their_state is State.OPEN:
            raise PeerBrokenError("stream ended without a goodbye (peer crashed or reset)")

    @property
    def in_frame(self) -> bool:
        return self._decoder.in_frame
