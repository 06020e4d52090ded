"""Errors raised by the p2p layer, named by meaning.

Two families, following h11 and trio:

* protocol errors say *who broke the rules*: `LocalProtocolError` (this process tried something
  the protocol forbids: an invalid message, a send after goodbye) versus `RemoteProtocolError`
  (the peer sent bytes that are not a valid frame or message);
* peer errors say *what happened to the peer or the path to it*: `PeerBrokenError` (the stream or
  connection broke: reset, EOF in the middle of a frame, EOF without a goodbye, a failed dial),
  `PeerTimeoutError` (no answer in time) and its special case `PeerFrozenError` (heartbeats
  stopped: the process is stopped, wedged or partitioned away).

`RemoteError` is different from both: the peer is healthy and answered, on purpose, with an
application error code (``"busy"``, ``"bad_request"`` ...). Handlers raise it to send one.
"""

from __future__ import annotations


class LaminaError(Exception):
    """Base of every error lamina raises on purpose, in every package: `except LaminaError`
    catches what the p2p layer, the model engine and the client raise. It lives here, in the
    lowest layer, so that `P2PError` can be one; `pipeline.LaminaError` is this class."""


class P2PError(LaminaError):
    """Base of every error the p2p layer raises on purpose."""


class ProtocolError(P2PError):
    """The framed protocol was violated; see the two subclasses for who did it."""


class LocalProtocolError(ProtocolError, ValueError):
    """This process misused the protocol: an invalid message, a send after goodbye, ..."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that is not a valid frame or message."""


class PeerError(P2PError):
    """Something happened to the peer or to the path to it."""

    def __init__(self, message: str, *, peer_id: object | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class PeerBrokenError(PeerError):
    """The stream or connection broke: reset, EOF mid-frame, EOF without goodbye, dial failure.

    A message that was cut off is never delivered as whole: the receiver raises this instead.
    """


class PeerTimeoutError(PeerError, TimeoutError):
    """The peer did not answer (or accept our bytes) within the deadline."""


class PeerFrozenError(PeerTimeoutError):
    """The peer stopped sending heartbeats: stopped (SIGSTOP), wedged, or partitioned away."""


class UnsupportedProtocolError(PeerError):
    """The peer does not serve the requested protocol id."""


class EndOfSession(P2PError):
    """The peer ended the session cleanly (it sent its goodbye); no more messages will come."""


class ReceiveInterrupted(Exception):
    """`Session.receive` was woken by `Session.interrupt_receive`: nothing happened to the
    session or the peer (so this is not a `P2PError`), the caller is wanted elsewhere."""


class ErrorCode:
    """Well-known `RemoteError` codes. Applications may use their own short codes too."""

    BUSY = "busy"  # out of capacity (per-peer concurrency, KV memory): try another peer
    BAD_REQUEST = "bad_request"  # the request was not a valid message for this protocol
    PROTOCOL_ERROR = "protocol_error"  # the bytes on the stream were not valid frames
    INTERNAL = "internal"  # the handler failed unexpectedly
    UNSUPPORTED = "unsupported"  # the handler does not accept this message type


MAX_ERROR_CODE_LEN = 64
MAX_ERROR_MESSAGE_LEN = 4096


class RemoteError(P2PError):
    """An application error carried in an error frame: a short `code` and a human `message`.

    Raise it from a handler to answer with that code; `Host.request` and `Session.receive` raise
    it when the peer answered with an error frame.
    """

    def __init__(self, code: str, message: str = "", *, peer_id: object | None = None) -> None:
        if not isinstance(code, str) or not code or len(code) > MAX_ERROR_CODE_LEN:
            raise LocalProtocolError(f"error code must be a non-empty str of <= {MAX_ERROR_CODE_LEN} chars")
        if not isinstance(message, str):
            raise LocalProtocolError("error message must be a str")
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message[:MAX_ERROR_MESSAGE_LEN]
        self.peer_id = peer_id


def reraise_single(group: BaseExceptionGroup) -> None:
    """Inside ``except BaseExceptionGroup``: re-raise the group's only leaf exception as itself
    (with its own traceback and context), or the group when it holds several."""
    excs: tuple[BaseException, ...] = group.exceptions
    while len(excs) == 1 and isinstance(excs[0], BaseExceptionGroup):
        excs = excs[0].exceptions
    if len(excs) != 1:
        raise group
    leaf = excs[0]
    context = leaf.__context__
    try:
        raise leaf
    finally:
        leaf.__context__ = context  # not the group we are unwrapping
        del leaf, context
