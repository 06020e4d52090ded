"""The span server: the node side of `pipeline.protocol` (inference, push and info streams).

``/lamina/inference/1`` (one stream per client session)
    OpenSession is checked (model identity, span inside ours, max_length within the node's
    --inference-max-length, by default the model's context length, dtype) and its KV cache
    reserved from the budget and from the peer's share (`_limits`); refusals are error frames:
    BUSY (no memory or session slot, the peer's own limits reached, or not ONLINE yet: route
    around), DRAINING (the node is leaving), BAD_REQUEST. Then Step / Replay /
    SetNextHop / CloseSession, handled one at a time in order. A step that does not fit the
    session gets a `StepFailed` (the codes are the protocol's) and the stream stays usable. A
    session idle for `NodeConfig.session_idle_timeout` (no client message and no pushed step) is
    ended with an IDLE_TIMEOUT error frame.
``/lamina/push/1`` (one stream per session and upstream node)
    PushOpen names a session open here (UNKNOWN_SESSION error frame otherwise); its Steps are
    handled exactly like the client's own (results and StepFailed go to the client's stream).
``/lamina/info/1``
    InfoRequest -> NodeInfo (its state: the lower-case name of the node's `crdt.ServerState`).

A step's way through: the session checks it and gives its compute tensor
(`ServedSession.accept`), the batcher runs it (`_compute`: torch in, torch out), the session
turns the output into its wire tensor (`ServedSession.to_wire`), and `_deliver` pushes it on
and echoes it to the client.

Step ids: a step (client's or pushed) whose id is lower than the last one run in the session is
stale and dropped silently; an equal id is a resend and runs again (idempotent).
"""

from __future__ import annotations

import logging
import math
from time import perf_counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
import trio
from torch import nn

import p2p
from crdt import ServerState
from pipeline import LaminaError, Span
from pipeline._metrics import NodeMetrics
from pipeline.protocol import (BAD_REQUEST, BUSY, DRAINING, IDLE_TIMEOUT, INFERENCE_PROTOCOL, INFO_PROTOCOL,
                               INTERNAL, PUSH_PROTOCOL, UNKNOWN_SESSION, CloseSession, InfoRequest, NodeInfo,
                               OpenSession, PushFailed, PushOpen, Replay, SessionOpened, SetNextHop, Step,
                               StepFailed, StepResult)

from ._announce import learn_addrs
from ._batching import Batcher
from ._config import VERSION
from ._limits import (OPEN_FRAME_LIMIT, PeerLimits, PeerShares, largest_frame_limit, session_frame_limit,
                      session_frame_reason)
from ._sessions import CacheBudget, ServedSession, StepError, cache_tokens_for

logger = logging.getLogger("lamina.node")

OPEN_DEADLINE = 10.0  # a new stream must send its first message (OpenSession, PushOpen) by then
PUSH_QUEUE = 16  # results waiting to be pushed per session before the session slows down
PUSH_FIRST_WAIT = 0.05  # longest a result's copy to the client waits for its push to go out first
# Longest a step waits for its push stream to open (the dial may have started earlier, ahead of
# the first step). Beyond it the push fails and the client relays: a next node that cannot be
# dialled in this long (a NAT or firewall that drops the packets) costs the session this once.
# Longer than a lane set-up that times out and stays on libp2p (a lane port not forwarded):
# that next node is reachable, and must not be relayed around.
PUSH_OPEN_GRACE = p2p.constants.LANE_CONNECT_DEADLINE + 1.0



def sub_span(span: Span, start: int, end: int) -> Span:
    """Blocks [start, end) of `span` sharing its weights (no copy: the layers are the same
    modules)."""
    if (start, end) == (span.start, span.end):
        return span
    with torch.device("meta"):
        sub = Span(span.config, start, end)
    sub.layers = nn.ModuleList(list(span.layers[start - span.start:end - span.start]))
    return sub


@dataclass(frozen=True)
class _PushItem:
    peer: str
    session_id: str
    step: Step | None  # None: open the push stream now, ahead of the first step
    # set once the step was written to the next node (or the push failed): the copy for the
    # client waits for it, so the next node starts computing before we spend time on the echo
    sent: trio.Event = field(default_factory=trio.Event, compare=False)


class SpanServer:
    """Serves one span over the mesh. `install()` registers the handlers on the host."""

    def __init__(self, host: p2p.Host, span: Span, model_hash: str, budget: CacheBudget,
                 batcher: Batcher, *, idle_timeout: float, max_length: int | None = None,
                 peer_addrs: Callable[[str], list[str]] = lambda peer: [],
                 metrics: NodeMetrics | None = None, limits: PeerLimits = PeerLimits()) -> None:
        self.host = host
        self.metrics = metrics if metrics is not None else NodeMetrics()  # sessions, steps, errors
        self.model_hash = model_hash
        self.budget = budget
        self.batcher = batcher
        self.idle_timeout = idle_timeout
        self.max_length = max_length  # longest session taken (--inference-max-length); None: the model's context
        self.shares = PeerShares(limits)  # what each peer holds here, against its per-peer limits
        self._owners: dict[str, tuple[object, int]] = {}  # session id -> (peer, KV tokens)
        self.peer_addrs = peer_addrs  # peer id -> multiaddrs known from the swarm records
        # The node's state (set by `Node.set_state` only, with the record's): OpenSession is
        # taken only ONLINE.
        self.state = ServerState.JOINING
        self._now = trio.lowlevel.current_clock().current_time  # trio's clock, one frame a call
        self.sessions: dict[str, ServedSession] = {}
        self._idle = trio.Event()
        self._idle.set()
        self.set_span(span)

    # -- span and state ----------------------------------------------------------------------
    def set_span(self, span: Span) -> None:
        if self.sessions:
            raise RuntimeError("the span can only change while no session is open")
        self.span = span
        self._sub_spans: dict[tuple[int, int], Span] = {(span.start, span.end): span}

    def _span_for(self, start: int, end: int) -> Span:
        sub = self._sub_spans.get((start, end))
        if sub is None:
            sub = self._sub_spans[(start, end)] = sub_span(self.span, start, end)
        return sub

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    async def wait_idle(self) -> None:
        """Until no session is open."""
        await self._idle.wait()

    def longest_session(self) -> int:
        """The longest session (max_length) taken: --inference-max-length, else the model's
        context length (the client never asks for more)."""
        return self.max_length or self.span.config.max_position_embeddings

    def largest_frame(self) -> int:
        """The largest frame of the largest session one peer may open here."""
        tokens = min(self.budget.total_tokens, self.shares.max_tokens(self.budget, self.longest_session()))
        return largest_frame_limit(tokens, self.span.config.hidden_size)

    def install(self) -> None:
        limit = self.budget.max_sessions + 1
        opens = (self.shares.limits.open_rate, self.shares.open_burst(self.budget))
        self.host.set_session_handler(INFERENCE_PROTOCOL, self._serve_inference, max_concurrent_per_peer=limit,
                                      lane=True, max_frame_size=OPEN_FRAME_LIMIT, open_rate=opens,
                                      frame_limit="what an inference stream may send before its session is open")
        self.host.set_session_handler(PUSH_PROTOCOL, self._serve_push, max_concurrent_per_peer=limit, lane=True,
                                      max_frame_size=self.largest_frame,
                                      frame_limit="the largest frame of the largest session a peer may open here")
        self.host.set_unary_handler(INFO_PROTOCOL, self._serve_info, accepts=InfoRequest, max_frame_size=OPEN_FRAME_LIMIT)

    # -- /lamina/info/1 ----------------------------------------------------------------------
    async def _serve_info(self, peer_id: object, request: p2p.Message) -> NodeInfo:
        return NodeInfo(
            peer_id=self.host.peer_id_str, model=self.model_hash, start=self.span.start,
            end=self.span.end, state=self.state.name.lower(), active_sessions=self.active_sessions,
            free_cache_tokens=self.budget.free_tokens, version=VERSION[:32])

    # -- /lamina/inference/1 -----------------------------------------------------------------
    async def _serve_inference(self, peer_id: object, stream: p2p.Session) -> None:
        try:
            msg = await _first_message(stream, "OpenSession")
            if msg is None:
                return
            if type(msg) is not OpenSession:
                raise p2p.RemoteError(BAD_REQUEST, f"an inference stream starts with OpenSession, "
                                                   f"not {type(msg).TYPE}")
            sess = self._open(msg, stream, peer_id)
        except p2p.RemoteError as exc:  # a refusal: BUSY, DRAINING, BAD_REQUEST, open_timeout
            self.metrics.error(_kind(exc))
            raise
        try:
            _limit_frames(stream, sess)
            try:
                await stream.send(SessionOpened(sess.session_id, sess.start, sess.end, sess.max_length))
            except p2p.P2PError as exc:
                logger.debug("session %s: the client left before it opened: %r", sess.session_id[:8], exc)
                return
            logger.info("session %s opened by %s: blocks %d:%d, batch %d, max_length %d",
                        sess.session_id[:8], peer_id, sess.start, sess.end, sess.batch, sess.max_length)
            ended: Exception | None = None
            async with trio.open_nursery() as nursery:
                sess.pusher = _Pusher(self, sess)
                nursery.start_soon(sess.pusher.serve)
                sess.pusher.connect_ahead()
                idle = trio.CancelScope()
                nursery.start_soon(self._watch_idle, sess, idle)
                try:
                    with idle:
                        await self._session_loop(sess, stream)
                    if idle.cancelled_caught:
                        ended = p2p.RemoteError(IDLE_TIMEOUT, f"session {sess.session_id} was idle "
                                                              f"for {self.idle_timeout}s")
                        self.metrics.error(IDLE_TIMEOUT)
                except Exception as exc:  # re-raised bare below: the host maps RemoteError to its code
                    ended = exc
                    self.metrics.error(_kind(exc))
                nursery.cancel_scope.cancel()
            if ended is not None:
                raise ended
        finally:
            self._close(sess)

    def _open(self, msg: OpenSession, stream: p2p.Session, peer: object) -> ServedSession:
        state = self.state
        if state is ServerState.DRAINING or state is ServerState.OFFLINE:
            raise p2p.RemoteError(DRAINING, "this node is draining and takes no new sessions")
        if state is not ServerState.ONLINE:
            raise p2p.RemoteError(BUSY, "this node is still starting")
        if msg.model != self.model_hash:
            raise p2p.RemoteError(BAD_REQUEST, f"model mismatch: this node serves model {self.model_hash}, "
                                               f"the session asked for {msg.model}")
        if not (self.span.start <= msg.start < msg.end <= self.span.end):
            raise p2p.RemoteError(BAD_REQUEST, f"blocks {msg.start}:{msg.end} are not inside this node's "
                                               f"blocks {self.span.start}:{self.span.end}")
        if msg.session_id in self.sessions:
            raise p2p.RemoteError(BAD_REQUEST, f"session {msg.session_id} is already open")
        if self.max_length is not None and msg.max_length > self.max_length:
            raise p2p.RemoteError(BAD_REQUEST, f"the session asks for max_length {msg.max_length}; this node "
                                               f"takes sessions of at most {self.max_length} tokens "
                                               f"(--inference-max-length)")
        tokens = cache_tokens_for(msg.batch, msg.max_length)
        reservation = self.budget.reserve(tokens)  # BUSY when the node is full
        try:
            self._check_peer(msg, peer, tokens)
            span = self._span_for(msg.start, msg.end)
            cache = span.new_cache(msg.batch, msg.max_length)
        except p2p.RemoteError:
            self.budget.release(reservation)
            raise
        except (LaminaError, RuntimeError) as exc:  # RuntimeError: torch out of memory
            self.budget.release(reservation)
            raise p2p.RemoteError(BUSY, f"cannot allocate the KV cache: {exc}") from None
        sess = ServedSession(msg.session_id, stream, span, cache, msg.dtype, reservation,
                             next_peer=msg.next_peer, next_session=msg.next_session)
        self.sessions[sess.session_id] = sess
        self.shares.add(peer, tokens)
        self._owners[sess.session_id] = (peer, tokens)
        self._idle = trio.Event()
        self.metrics.session_opened()
        return sess

    def _check_peer(self, msg: OpenSession, peer: object, tokens: int) -> None:
        """The checks after the node's budget admitted a session: the default length limit
        (after the budget, whose BUSY says more to a client asking far too much), then the
        peer's own limits (BUSY)."""
        longest = self.longest_session()
        if self.max_length is None and msg.max_length > longest:
            raise p2p.RemoteError(BAD_REQUEST, f"the session asks for max_length {msg.max_length}; this node "
                                               f"takes sessions of at most {longest} tokens (the model's "
                                               f"context length; --inference-max-length sets another limit)")
        self.shares.check(peer, tokens, self.budget, longest)

    def _close(self, sess: ServedSession) -> None:
        sess.close()
        if self.sessions.get(sess.session_id) is sess:
            del self.sessions[sess.session_id]
            self.metrics.session_closed()
            owner = self._owners.pop(sess.session_id, None)
            if owner is not None:
                self.shares.remove(*owner)
        self.budget.release(sess.reservation)
        self.batcher.forget(sess.cache)
        sess.cache = None  # type: ignore[assignment]  # free the memory now, not at the next gc
        if not self.sessions:
            self._idle.set()
        logger.info("session %s closed (%d open, %d cache tokens free)", sess.session_id[:8],
                    len(self.sessions), self.budget.free_tokens)

    async def _watch_idle(self, sess: ServedSession, loop: trio.CancelScope) -> None:
        """Cancel `loop` (the session loop) once neither the client nor an upstream node has
        sent the session anything for `idle_timeout`. A step in progress is activity. (One
        timer per session instead of a deadline on every receive: that costs a cancel scope
        per message.)"""
        while True:
            await trio.sleep_until(sess.last_active + self.idle_timeout)
            if sess.lock.locked():
                await trio.sleep(self.idle_timeout)
            elif self._now() >= sess.last_active + self.idle_timeout:
                loop.cancel()
                return

    async def _session_loop(self, sess: ServedSession, stream: p2p.Session) -> None:
        while True:
            msg = await _next_message(stream, f"session {sess.session_id[:8]}: client stream")
            if msg is None:
                return
            sess.last_active = self._now()
            kind = type(msg)
            if kind is Step:
                await self.run_step(sess, msg)
            elif kind is Replay:
                await self.run_replay(sess, msg)
            elif kind is SetNextHop:
                if msg.session_id != sess.session_id:
                    await self._fail(sess, 0, _not_here(msg.session_id))
                else:
                    sess.next_peer, sess.next_session = msg.next_peer, msg.next_session
                    sess.pusher.rewired()
                    sess.pusher.connect_ahead()
            elif kind is CloseSession:
                if msg.session_id == sess.session_id:
                    return
                await self._fail(sess, 0, _not_here(msg.session_id))
            else:
                await self._fail(sess, 0, StepError(BAD_REQUEST, f"{kind.TYPE} is not valid on an open session"))

    # -- steps -------------------------------------------------------------------------------
    async def run_step(self, sess: ServedSession, step: Step) -> None:
        """Run one step (from the client or pushed from upstream) and deliver its result."""
        await sess.lock.acquire()  # free (the usual case): no scheduler round trip
        try:
            if sess.closed:
                return
            sess.last_active = self._now()
            if sess.last_step_id is not None and step.step_id < sess.last_step_id:
                logger.debug("session %s: dropped stale step %d (last %d)", sess.session_id[:8],
                             step.step_id, sess.last_step_id)
                return
            try:
                x = sess.accept(step)
                began = perf_counter()
                out = sess.to_wire(await self._compute(sess, x, step.position))
            except StepError as exc:
                await self._fail(sess, step.step_id, exc)
                return
            self.metrics.step(perf_counter() - began, x.shape[0] * x.shape[1])
            sess.last_step_id = step.step_id
            await self._deliver(sess, step.step_id, step.position, out, step.push)
        finally:
            sess.lock.release()

    async def run_replay(self, sess: ServedSession, replay: Replay) -> None:
        """Run the replay's chunks one after another as separate steps, echoing each."""
        async with sess.lock:
            if sess.closed:
                return
            sess.last_active = self._now()
            try:
                hidden = sess.accept(replay)
            except StepError as exc:
                await self._fail(sess, replay.step_ids[0], exc)
                return
            position = 0
            for step_id, t in zip(replay.step_ids, replay.chunks):
                try:
                    # a view, with the values the original step carried (the pass reshapes it,
                    # copying when strided, as it does a long prompt's pieces)
                    began = perf_counter()
                    out = sess.to_wire(await self._compute(sess, hidden[:, position:position + t], position))
                except StepError as exc:
                    await self._fail(sess, step_id, exc)
                    return
                self.metrics.step(perf_counter() - began, hidden.shape[0] * t)
                sess.last_step_id = step_id if sess.last_step_id is None else max(sess.last_step_id, step_id)
                await self._deliver(sess, step_id, position, out, replay.push)
                position += t

    async def _compute(self, sess: ServedSession, x: torch.Tensor, position: int) -> torch.Tensor:
        """The session's span over `x` [B, T, D] (checked, in its compute dtype and device) at
        `position`; the output [B, T, D], as the span computes it."""
        try:
            return await self.batcher.run(sess.span, x, position, sess.cache)
        except LaminaError as exc:  # the engine's own checks (should not happen after ours)
            raise StepError(BAD_REQUEST, str(exc)) from None
        except Exception as exc:
            logger.exception("forward pass failed for session %s", sess.session_id[:8])
            raise StepError(INTERNAL, f"forward pass failed: {type(exc).__name__}: {exc}") from None

    async def _deliver(self, sess: ServedSession, step_id: int, position: int, out: p2p.Tensor,
                       push: bool) -> None:
        peer, session_id = sess.next_peer, sess.next_session
        if push and peer is not None and session_id is not None:
            step = Step(session_id, step_id, position, out, push=True)
            if not await sess.pusher.send_now(peer, step):
                item = _PushItem(peer, session_id, step)
                await sess.pusher.enqueue(item)
                with trio.move_on_after(PUSH_FIRST_WAIT):
                    await item.sent.wait()
        await self.to_client(sess, StepResult(sess.session_id, step_id, position, out))
        sess.last_active = self._now()  # a long step is activity, not idleness

    async def _fail(self, sess: ServedSession, step_id: int, exc: StepError) -> None:
        logger.debug("session %s step %d failed: %s", sess.session_id[:8], step_id, exc)
        self.metrics.error(exc.code)
        await self.to_client(sess, StepFailed(sess.session_id, step_id, exc.code, exc.message))

    async def to_client(self, sess: ServedSession, msg: p2p.Message) -> None:
        """Send on the client's stream; a broken stream is the session loop's business."""
        try:
            await sess.client.send(msg)
        except p2p.P2PError as exc:
            logger.debug("session %s: cannot reach the client: %r", sess.session_id[:8], exc)

    # -- /lamina/push/1 ----------------------------------------------------------------------
    async def _serve_push(self, peer_id: object, stream: p2p.Session) -> None:
        msg = await _first_message(stream, "PushOpen")
        if msg is None:
            return
        if type(msg) is not PushOpen:
            raise p2p.RemoteError(BAD_REQUEST, f"a push stream starts with PushOpen, not {type(msg).TYPE}")
        sess = self.sessions.get(msg.session_id)
        if sess is None or sess.closed:
            self.metrics.error(UNKNOWN_SESSION)
            raise p2p.RemoteError(UNKNOWN_SESSION, f"session {msg.session_id} is not open on this node")
        _limit_frames(stream, sess)
        scope = trio.CancelScope()
        sess.cancel_scopes.add(scope)
        try:
            with scope:
                while True:
                    step = await _next_message(stream, f"push stream into session {sess.session_id[:8]}")
                    if step is None:
                        return
                    if type(step) is not Step:
                        raise p2p.RemoteError(BAD_REQUEST, f"push streams carry Steps, not {type(step).TYPE}")
                    if step.session_id != sess.session_id:
                        await self._fail(sess, step.step_id, StepError(
                            UNKNOWN_SESSION,
                            f"step for session {step.session_id} pushed on the stream of {sess.session_id}"))
                        continue
                    await self.run_step(sess, step)
        finally:
            sess.cancel_scopes.discard(scope)
        if scope.cancelled_caught:
            raise p2p.RemoteError(UNKNOWN_SESSION, f"session {sess.session_id} ended")


class _OpenTimeout(p2p.RemoteError):
    """A stream sent no first message in OPEN_DEADLINE (BAD_REQUEST on the wire)."""


def _kind(exc: BaseException) -> str:
    """The metrics label of a refused or failed session: its error code, "open_timeout", or
    "internal" (a bug)."""
    if isinstance(exc, _OpenTimeout):
        return "open_timeout"
    return exc.code if isinstance(exc, p2p.RemoteError) else "internal"


def _limit_frames(stream: p2p.Session, sess: ServedSession) -> None:
    """From now on the stream takes no frame bigger than what `sess` can use."""
    shape = (sess.batch, sess.max_length, sess.hidden_size, sess.dtype)
    stream.limit_incoming(session_frame_limit(*shape), session_frame_reason(*shape))


def _not_here(session_id: str) -> StepError:
    return StepError(UNKNOWN_SESSION, f"session {session_id} is not open on this stream")


async def _next_message(stream: p2p.Session, what: str) -> p2p.Message | None:
    """The stream's next message, or None once the peer has ended it, cleanly or not (or sent
    garbage / an error frame). Ending quietly: raising would only make the host log a "bug"
    (p2p's handler wrapper does not unwrap exception groups from run_session)."""
    try:
        return await stream.receive()
    except (p2p.EndOfSession, p2p.PeerError, p2p.RemoteProtocolError, p2p.RemoteError) as exc:
        logger.debug("%s ended: %r", what, exc)
        return None


async def _first_message(stream: p2p.Session, expected: str) -> p2p.Message | None:
    """The stream's first message (None if the peer left at once), within OPEN_DEADLINE of the
    stream's start (the host's wait for a lane request, and a lane's set-up, count too)."""
    with trio.move_on_at(stream.opened_at + OPEN_DEADLINE):
        return await _next_message(stream, f"a stream before its {expected}")
    raise _OpenTimeout(BAD_REQUEST, f"no {expected} within {OPEN_DEADLINE}s")


class _Pusher:
    """Forwards one session's results to its next hop, in order, over one push stream per
    target; a failure becomes a PushFailed to the client, never the end of the session.

    The pusher's task opens the streams and sends what is queued. While its stream is open and
    nothing is queued, a step goes out from the step's own task instead (`send_now`): that
    saves two task switches per step, with the order unchanged."""

    def __init__(self, server: SpanServer, sess: ServedSession) -> None:
        self.server = server
        self.sess = sess
        self._send, self._receive = trio.open_memory_channel[_PushItem](PUSH_QUEUE)
        self._last_step_id = 0
        self._stepped = False  # a step was taken for the push stream being opened or used
        self._target_peer = ""
        # A target that failed stays failed (its pushes fail at once, without a new dial each)
        # until the client rewires the session with SetNextHop, even to the same target.
        self._failed: tuple[tuple[str, str], str] | None = None
        # set while the pusher waits for work with a stream open: (target, stream)
        self._ready: tuple[tuple[str, str], p2p.Session] | None = None
        self._opening: trio.CancelScope | None = None  # while a push stream opens

    def _step_waits(self) -> None:
        """A step waits for the stream being opened: give the open `PUSH_OPEN_GRACE` more."""
        if self._opening is not None:
            self._opening.deadline = min(self._opening.deadline, self.server._now() + PUSH_OPEN_GRACE)

    async def enqueue(self, item: _PushItem) -> None:
        self._ready = None  # from now on the queue goes first
        self._step_waits()
        await self._send.send(item)

    async def send_now(self, peer: str, step: Step) -> bool:
        """Send `step` on the open stream from the caller's task, if nothing is queued ahead
        of it; False to go through the queue instead (no stream, another target, a failure:
        the pusher then meets the same failure and reports it)."""
        ready = self._ready
        if ready is None or ready[0] != (peer, step.session_id):
            return False
        self._last_step_id = step.step_id
        self._stepped = True
        try:
            await ready[1].send(step)
        except p2p.P2PError:
            self._ready = None
            return False
        return True

    def rewired(self) -> None:
        self._failed = None

    def connect_ahead(self) -> None:
        """Open the push stream to the session's next hop now, so the first step does not
        wait for the dial and the lane set-up."""
        sess = self.sess
        if sess.next_peer is not None and sess.next_session is not None:
            self._ready = None
            try:
                self._send.send_nowait(_PushItem(sess.next_peer, sess.next_session, None))
            except trio.WouldBlock:
                pass  # steps are queued: the stream opens for them anyway

    async def serve(self) -> None:
        item: _PushItem | None = None
        while True:
            if item is None:
                item = await self._receive.receive()
            if self._failed is not None and self._failed[0] == (item.peer, item.session_id):
                if item.step is not None:
                    await self._report(item.step.step_id, item.session_id, self._failed[1])
                item.sent.set()
                item = None
                continue
            self._stepped = False
            try:
                item = await self._stream_to(item)
            except (p2p.P2PError, trio.TooSlowError) as exc:
                if item is not None:
                    item.sent.set()
                logger.info("session %s: push to %s failed: %r", self.sess.session_id[:8], self._target_peer, exc)
                self.server.metrics.error("push_failed")
                reason = f"push to {self._target_peer} failed: {exc!r}"[:1000]
                self._failed = ((self._target_peer, self._target_session), reason)
                # When only the early open failed, no step was taken: the steps queued behind
                # it are reported at once (above) instead of each waiting out a new dial.
                if self._stepped:
                    await self._report(self._last_step_id, self._target_session, reason)
                item = None

    async def _report(self, step_id: int, target: str, reason: str) -> None:
        await self.server.to_client(self.sess, PushFailed(self.sess.session_id, step_id, target, reason))

    async def _stream_to(self, item: _PushItem) -> _PushItem:
        """Push to item's target until an item for another target comes; return that item."""
        target = (item.peer, item.session_id)
        self._target_peer, self._target_session = target
        if item.step is not None:
            self._last_step_id = item.step.step_id
            self._stepped = True
        learn_addrs(self.server.host, item.peer, self.server.peer_addrs(item.peer))
        failure: list[BaseException] = []
        following: _PushItem | None = None
        async with self._open(item) as stream:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    # the next node answers nothing on a push stream except an error frame
                    try:
                        while True:
                            await stream.receive()
                    except p2p.EndOfSession:
                        failure.append(p2p.PeerBrokenError("the next node closed the push stream"))
                    except p2p.P2PError as exc:
                        failure.append(exc)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                try:
                    await stream.send(PushOpen(item.session_id))
                    while True:
                        if item.step is not None:
                            self._last_step_id = item.step.step_id
                            self._stepped = True
                            try:
                                await stream.send(item.step)
                            finally:
                                item.sent.set()
                        self._ready = (target, stream)
                        try:
                            item = await self._receive.receive()
                        finally:
                            self._ready = None
                        if (item.peer, item.session_id) != target:
                            following = item
                            break
                except p2p.P2PError as exc:
                    failure.append(exc)
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[0]
        assert following is not None
        return following

    @asynccontextmanager
    async def _open(self, item: _PushItem) -> AsyncIterator[p2p.Session]:
        """The push stream to item's target. While it opens, a step waiting for it gives the
        open `PUSH_OPEN_GRACE` more (`_step_waits`), beyond which it fails."""
        with trio.CancelScope() as opening:
            self._opening = opening
            if item.step is not None:
                self._step_waits()
            try:
                async with self.server.host.open_session(item.peer, PUSH_PROTOCOL, lane=True) as stream:
                    self._opening, opening.deadline = None, math.inf
                    yield stream
            finally:
                self._opening = None
        if opening.cancelled_caught:
            raise p2p.PeerTimeoutError(f"the push stream to {item.peer} did not open within "
                                       f"{PUSH_OPEN_GRACE}s of a step waiting for it")
