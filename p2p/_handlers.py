"""Handlers as the host keeps them: `Handler` (a registered protocol with its per-peer limits),
and what runs a unary handler and answers for it. Every failure becomes an error frame to the
peer, never an exception into py-libp2p (where it would tear the whole host down)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from ._constants import RESET_DEADLINE
from ._errors import ErrorCode, P2PError, RemoteError
from ._limits import RateLimiter
from ._messages import REGISTRY, ErrorMessage, Message
from ._session import Session

logger = logging.getLogger("lamina.p2p")

__all__ = ["Handler", "rate_limiter", "describe", "call_handler", "send_error"]


@dataclass
class Handler:
    """A registered protocol: its function and its per-peer limits."""

    protocol_id: str
    kind: str  # "unary" | "session"
    fn: Callable[..., Awaitable[Any]]
    max_concurrent_per_peer: int
    accepts: tuple[type[Message], ...] | None
    lane: bool = False
    # the largest frame a peer may send on it (an int, or a callable read at each new stream;
    # None: the host's max_message_size), and why, for the error
    max_frame_size: int | Callable[[], int] | None = None
    frame_limit: str = ""
    opens: RateLimiter | None = None  # new streams per peer and second
    active: dict[ID, int] = field(default_factory=dict)

    def refusal(self, peer_id: ID) -> ErrorMessage | None:
        """The BUSY answer for a new stream from `peer_id` over this handler's per-peer limits
        (None: it is admitted), naming the limit."""
        if self.active.get(peer_id, 0) >= self.max_concurrent_per_peer:
            return ErrorMessage(ErrorCode.BUSY, f"this peer already has {self.max_concurrent_per_peer} "
                                                f"{self.protocol_id} streams open here, the most one peer may "
                                                f"have at once (the per-peer concurrency limit)")
        if self.opens is not None and not self.opens.allow(peer_id):
            return ErrorMessage(ErrorCode.BUSY, f"this peer opens {self.protocol_id} streams too fast: the per-peer "
                                                f"limit is {self.opens.describe()}")
        return None

    def incoming_limit(self) -> int | None:
        size = self.max_frame_size
        return size() if callable(size) else size


def rate_limiter(open_rate: tuple[float, int] | None) -> RateLimiter | None:
    return RateLimiter(*open_rate) if open_rate is not None else None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


async def call_handler(handler: Handler, peer_id: ID, request: Message) -> Message:
    """Run a unary handler; turn whatever it raises or returns wrongly into an error frame."""
    try:
        reply = await handler.fn(peer_id, request)
    except RemoteError as exc:
        return ErrorMessage(exc.code, exc.message)
    except Exception as exc:
        logger.warning("%s handler failed for %s", handler.protocol_id, peer_id, exc_info=True)
        return ErrorMessage(ErrorCode.INTERNAL, describe(exc))
    if not isinstance(reply, Message) or REGISTRY.get(type(reply).TYPE) is not type(reply):
        logger.warning("%s handler returned %r, not a registered message", handler.protocol_id, type(reply))
        return ErrorMessage(ErrorCode.INTERNAL, "handler returned an invalid response")
    return reply


async def send_error(session: Session, error: ErrorMessage) -> None:
    if session.failed is not None:
        return
    with trio.move_on_after(RESET_DEADLINE):
        try:
            await session.send(error)
        except P2PError:
            pass
