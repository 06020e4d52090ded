"""The swarm state over the mesh: a `crdt.SwarmState` replica kept fresh by gossip and anti-entropy.

`crdt/` holds the pure values (records, merge, digest, the `sync` step); `p2p/` the host. This
module is the thin trio layer between them, used by both sides of lamina:

* `SwarmView` (nodes and clients): one replica. It merges every record gossiped on the swarm
  topic, answers and starts anti-entropy exchanges on ``/lamina/swarm-sync/1`` (with one random
  connected peer every `SwarmTiming.anti_entropy_interval`, and at once with every new
  connection), and drops expired leases every `SwarmTiming.gc_interval`.
* writing is `SwarmView.publish(signed)`: a node's `Announcer` (`node/_announce.py`) signs its
  record with its libp2p key and publishes it every heartbeat, and at once on a state change.

How a record travels::

    Announcer --sign--> SwarmView.publish --merge--> local state
                                          --gossip (lamina/swarm/1)--> every SwarmView: merge
                                          --anti-entropy push--> a few connected peers (urgent ones)
    SwarmView <--digest / delta / delta--> SwarmView   (periodic, on connect; repairs lost gossip)

Gossip is fast but lossy (a fresh node's gossipsub mesh forms only at the next gossipsub
heartbeat, full queues drop); anti-entropy is the repair path and what a newly joined peer
(a client that announces nothing) uses to get the whole state at once. Every record is validated
by `SwarmState.merge` (signature, key binding, lease, clock skew) whichever way it came: a forged
record is counted, reported to `on_rejected` callbacks, and never enters the replica.

Anti-entropy over unary requests (initiator A, responder B, one `SwarmSync` message each way;
see `crdt/_sync.py` for the messages themselves)::

    A: request  SwarmSync(digest(A))            B: reply SwarmSync(sync(digest, B))   (r1 or b"")
    A: merge r1; request SwarmSync(sync(r1, A)) B: merge r2; reply SwarmSync(sync(r2, B))  (r3)
    A: merge r3; sync(r3, A) is None -> done

B keeps no state between requests. An exchange stops when either side has nothing to say, or
after `MAX_SYNC_REQUESTS` requests (a delta is capped at `SYNC_BUDGET` bytes of records; what is
left still differs and goes in the next exchange). Every request runs under
`SwarmTiming.sync_deadline`; a peer that fails, stalls or lies costs one exchange and a debug
line, never the service.

Wall time is `time.time()`; a `crdt.HybridClock` observes every admitted record, so this node's
own records are timestamped after anything it has seen (also its previous incarnation's).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

import crdt
import p2p

logger = logging.getLogger("lamina.swarm")

__all__ = [
    "SWARM_TOPIC",
    "SYNC_PROTOCOL",
    "SYNC_BUDGET",
    "MAX_SYNC_REQUESTS",
    "PUSH_FANOUT",
    "SwarmSync",
    "SwarmTiming",
    "SwarmStats",
    "SwarmView",
    "swarm_topics",
    "now_ms",
]

SWARM_TOPIC = "lamina/swarm/1"  # gossip topic of signed server records (one `SignedRecord.wire` each)
SYNC_PROTOCOL = "/lamina/swarm-sync/1"  # unary: SwarmSync -> SwarmSync
SYNC_BUDGET = 1 << 20  # bytes of records per delta we build (crdt's default is 8 MiB)
MAX_SYNC_MESSAGE = crdt.MAX_DELTA_BYTES  # largest anti-entropy message accepted (16 MiB)
MAX_SYNC_REQUESTS = 4  # requests per exchange; the protocol needs 2, the rest carry leftovers
MAX_SYNC_PER_PEER = 4  # concurrent requests one peer may run against us (connect + periodic + push overlap)
PUSH_FANOUT = 8  # connected peers an urgent record (first, DRAINING, OFFLINE) is pushed to
PUBLISH_DEADLINE = 5.0  # gossip publish writes to every mesh peer: never wait on a stuck one


def now_ms() -> int:
    """Local wall time in milliseconds, as every record and merge uses it."""
    return int(time.time() * 1000)


def swarm_topics(*extra: str, topic: str = SWARM_TOPIC) -> list[str]:
    """The gossip topics to open a host with: the swarm topic first, then `extra` (deduplicated).

    ``p2p.HostConfig(identity, gossip_topics=swarm_topics())``
    """
    return list(dict.fromkeys((topic, *extra)))


@p2p.message("lamina.swarm.sync")
@dataclass(frozen=True)
class SwarmSync(p2p.Message):
    """One anti-entropy message: `crdt.encode_message` bytes, or ``b""`` for "nothing to say"."""

    data: bytes = p2p.field(max_len=MAX_SYNC_MESSAGE)


@dataclass(frozen=True)
class SwarmTiming:
    """How often a `SwarmView` repairs and cleans its replica (seconds).

    anti_entropy_interval: one exchange with a random connected peer this often (plus one with
        every new connection at once). Lost gossip is repaired within about this long.
    gc_interval: expired leases are dropped this often, so a dead node's record lingers at most
        its lease plus this.
    sync_deadline: bound on one request of an exchange, dial and stream open included.
    """

    anti_entropy_interval: float = 5.0
    gc_interval: float = 1.0
    sync_deadline: float = 10.0

    def __post_init__(self) -> None:
        for name in ("anti_entropy_interval", "gc_interval", "sync_deadline"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"SwarmTiming.{name} must be a positive number of seconds, got {value!r}")


@dataclass
class SwarmStats:
    """Counters of one `SwarmView` (monotonic; for logs, metrics and tests)."""

    gossip_messages: int = 0  # gossip messages received on the swarm topic
    gossip_records: int = 0  # records admitted from gossip (new or newer)
    sync_records: int = 0  # records admitted from anti-entropy (either side of an exchange)
    rejected: int = 0  # records or messages refused (forged, expired, malformed, ...)
    exchanges: int = 0  # anti-entropy exchanges we started that completed
    exchange_failures: int = 0  # ... that failed (peer broken, timed out, lied, unsupported)
    served: int = 0  # anti-entropy requests we answered
    collected: int = 0  # records dropped by gc (lease ended)


RejectionCallback = Callable[[crdt.Rejection, ID | None], None]


class SwarmView:
    """A replica of the swarm state, kept fresh over the mesh. Run `serve` in a nursery.

    `host` must have been opened with the swarm topic in `HostConfig.gossip_topics`
    (`swarm_topics()`). The view is usable before `serve` (it is just an empty replica), but
    only `serve` connects it to the swarm.

    Reading: `state` (the current immutable `crdt.SwarmState`), `servers(model_hash)`,
    `generation` (bumped on every change), `wait_until(predicate)`, `wait_changed()`.
    Writing: `publish(signed)` (what `node._announce.Announcer` does). Observing refusals: `on_rejected(cb)`.
    """

    def __init__(
        self,
        host: p2p.Host,
        config: crdt.SwarmConfig | None = None,
        *,
        topic: str = SWARM_TOPIC,
        timing: SwarmTiming = SwarmTiming(),
    ) -> None:
        if host.gossip is None or topic not in host.config.gossip_topics:
            raise ValueError(
                f"the host must run gossip on {topic!r}: open it with HostConfig(gossip_topics=swarm_topics(...))"
            )
        self.host = host
        self.topic = topic
        self.timing = timing
        self.config = config if config is not None else crdt.SwarmConfig()
        self.clock = crdt.HybridClock(self.config.max_skew_ms)
        self.stats = SwarmStats()
        self._state = crdt.SwarmState(self.config)
        self._generation = 0
        self._changed = trio.Event()
        self._rejection_callbacks: list[RejectionCallback] = []
        self._nursery: trio.Nursery | None = None
        self._started = False

    # -- reading -----------------------------------------------------------------------------
    @property
    def state(self) -> crdt.SwarmState:
        """The current replica (an immutable value: hold it as long as you like)."""
        return self._state

    @property
    def generation(self) -> int:
        """Bumped by one on every change of `state` (merge that admitted something, or gc)."""
        return self._generation

    @property
    def peer_id(self) -> bytes:
        """This host's peer id as crdt bytes."""
        return self.host.peer_id.to_bytes()

    def servers(self, model_hash: bytes | str) -> list[crdt.ServerRecord]:
        """Records of servers of one model whose lease has not ended, OFFLINE ones excluded.

        `model_hash` is `ModelId.config_hash`: 32 bytes or their hex (what
        `pipeline.model_hash` returns). JOINING and DRAINING servers are included with their
        `state`, so the router can skip them (`record.is_live(now)` is the routable test).
        Ordered by span start, then fastest first, then peer id.
        """
        if isinstance(model_hash, str):
            try:
                model_hash = bytes.fromhex(model_hash)
            except ValueError:
                raise ValueError(f"model hash must be hex: {model_hash!r}") from None
        if not isinstance(model_hash, bytes) or len(model_hash) != 32:
            raise ValueError("model hash must be 32 bytes (or 64 hex characters)")
        now = now_ms()
        found = [
            r
            for r in self._state.records()
            if r.model.config_hash == model_hash and r.expires_ms > now and r.state is not crdt.ServerState.OFFLINE
        ]
        found.sort(key=lambda r: (r.start, -r.throughput, r.peer_id))
        return found

    async def wait_until(self, predicate: Callable[[crdt.SwarmState], bool]) -> crdt.SwarmState:
        """Block until `predicate(state)` is true; return that state. Bound it with `trio.fail_after`.

        Checked now and after every change (no polling): a predicate that depends on the wall
        clock alone (e.g. "this lease has ended") only becomes true at the next change, which gc
        provides within `gc_interval` of the lease end.
        """
        while True:
            state = self._state
            if predicate(state):
                return state
            await self._changed.wait()

    async def wait_changed(self, generation: int | None = None) -> int:
        """Block until `self.generation` differs from `generation` (default: the current one,
        i.e. wait for the next change); return the new generation.

        To see every change: ``g = view.generation; while True: g = await view.wait_changed(g)``
        (nothing is missed between two calls, even if several changes happened meanwhile).
        """
        if generation is None:
            generation = self._generation
        while self._generation == generation:
            await self._changed.wait()
        return self._generation

    def on_rejected(self, callback: RejectionCallback) -> None:
        """Call `callback(rejection, source_peer)` for every refused record or message.

        `source_peer` is the gossip sender or the anti-entropy partner (None for local input).
        The callback runs synchronously inside the merge: keep it short and make it not raise.
        """
        self._rejection_callbacks.append(callback)

    # -- writing -----------------------------------------------------------------------------
    async def publish(self, signed: crdt.SignedRecord, *, push: bool = False) -> bool:
        """Merge `signed` locally, then gossip it. Returns whether it was admitted (False when
        the replica already holds this record or a newer one of that peer).

        Raises `ValueError` if the record would win but is invalid (forged, expired, lease too
        long...): that is a local bug. (Like every merge, a record older than the one held is
        ignored without being checked.)

        With `push`, also run anti-entropy with up to `PUSH_FANOUT` connected peers (at once,
        each request bounded by `sync_deadline`, failures ignored) and return when they are done:
        for records that must not wait for gossip to heal (a node's first record, DRAINING,
        OFFLINE). Gossip publishing is bounded by `PUBLISH_DEADLINE`.
        """
        result = self._merge([signed], source=None, via="local")
        if result.rejected:
            bad = result.rejected[0]
            raise ValueError(f"cannot publish an invalid record ({bad.reason.value}: {bad.detail})")
        if signed.peer_id not in result.changed:
            return False
        assert self.host.gossip is not None
        with trio.move_on_after(PUBLISH_DEADLINE) as scope:
            try:
                await self.host.gossip.publish(self.topic, signed.wire)
            except p2p.LocalProtocolError:
                raise
            except Exception as exc:  # py-libp2p raises assorted errors when a peer goes away
                logger.debug("gossip publish failed: %r", exc)
        if scope.cancelled_caught:
            logger.debug("gossip publish took more than %ss", PUBLISH_DEADLINE)
        if push:
            await self.push()
        return True

    async def push(self) -> None:
        """One anti-entropy exchange with each of up to `PUSH_FANOUT` connected peers, at once."""
        peers = self._sync_candidates()
        random.shuffle(peers)
        async with trio.open_nursery() as nursery:
            for peer in peers[:PUSH_FANOUT]:
                nursery.start_soon(self._exchange_quietly, peer, "push")

    # -- anti-entropy ------------------------------------------------------------------------
    async def sync_with(self, peer: ID | str) -> int:
        """Run one anti-entropy exchange with `peer`; return how many records we admitted.

        Raises `p2p.PeerError` (broken, timed out, unsupported), `p2p.RemoteError`, or
        `p2p.RemoteProtocolError` (the peer's answer was not a valid sync message). Records the
        peer sent before failing stay merged (each was validated on its own).
        """
        admitted = 0
        message: crdt.Digest | crdt.Delta = crdt.digest(self._state)
        for _ in range(MAX_SYNC_REQUESTS):
            request = SwarmSync(crdt.encode_message(message))
            try:
                with trio.fail_after(self.timing.sync_deadline):
                    reply = await self.host.request(peer, SYNC_PROTOCOL, request)
            except trio.TooSlowError:
                raise p2p.PeerTimeoutError(
                    f"anti-entropy request to {peer} took more than {self.timing.sync_deadline}s", peer_id=peer
                ) from None
            if not isinstance(reply, SwarmSync):
                raise p2p.RemoteProtocolError(f"{peer} answered {SYNC_PROTOCOL} with {type(reply).TYPE}")
            if not reply.data:
                break
            try:
                answer = crdt.decode_message(reply.data)
            except crdt.ValidationError as exc:
                self._report(exc.rejection(), _as_id(peer))
                raise p2p.RemoteProtocolError(f"{peer} sent an invalid sync message: {exc}") from None
            if not isinstance(answer, crdt.Delta):
                raise p2p.RemoteProtocolError(f"{peer} answered with a digest")
            admitted += len(self._merge(answer, source=_as_id(peer), via="sync").changed)
            following = crdt.sync(answer, self._state, max_bytes=SYNC_BUDGET)
            if following is None:
                break
            message = following
        self.stats.exchanges += 1
        return admitted

    async def _handle_sync(self, peer: ID, request: p2p.Message) -> SwarmSync:
        """Responder side of one request: merge the records it carries, answer with `sync`."""
        assert isinstance(request, SwarmSync)
        self.stats.served += 1
        try:
            message = crdt.decode_message(request.data)
        except crdt.ValidationError as exc:
            self._report(exc.rejection(), peer)
            raise p2p.RemoteError(p2p.ErrorCode.BAD_REQUEST, str(exc)) from None
        if isinstance(message, crdt.Delta):
            self._merge(message, source=peer, via="sync")
        reply = crdt.sync(message, self._state, max_bytes=SYNC_BUDGET)
        return SwarmSync(b"" if reply is None else crdt.encode_message(reply))

    async def _exchange_quietly(self, peer: ID, why: str) -> None:
        try:
            admitted = await self.sync_with(peer)
        except (p2p.P2PError, crdt.ValidationError) as exc:
            self.stats.exchange_failures += 1
            logger.debug("anti-entropy (%s) with %s failed: %r", why, peer, exc)
        except Exception:
            # py-libp2p can raise its own errors past p2p's wrapping; a peer must never kill us
            self.stats.exchange_failures += 1
            logger.warning("anti-entropy (%s) with %s failed unexpectedly", why, peer, exc_info=True)
        else:
            logger.debug("anti-entropy (%s) with %s: %d records", why, peer, admitted)

    def _sync_candidates(self) -> list[ID]:
        """Connected peers, those known to be on the swarm topic first (others may not run a
        SwarmView; they are tried only when no topic peer is connected)."""
        connected = self.host.connected_peers()
        assert self.host.gossip is not None
        on_topic = set(self.host.gossip.topic_peers(self.topic))
        preferred = [p for p in connected if p in on_topic]
        return preferred or connected

    async def _on_peer_connected(self, peer: ID) -> None:
        nursery = self._nursery
        if nursery is not None:  # the host keeps our callback after serve() ends
            nursery.start_soon(self._exchange_quietly, peer, "connect")

    # -- the service -------------------------------------------------------------------------
    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this replica fresh until cancelled: merge gossip, serve and start anti-entropy,
        gc expired leases. Ready (``nursery.start`` returns) once subscribed and serving; an
        exchange with every already-connected peer (the bootstrap peers) has been started then.
        """
        if self._started:
            raise RuntimeError("SwarmView.serve can run only once")
        self._started = True
        assert self.host.gossip is not None
        subscription = self.host.gossip.subscribe(self.topic)
        self.host.set_unary_handler(
            SYNC_PROTOCOL, self._handle_sync, accepts=SwarmSync, max_concurrent_per_peer=MAX_SYNC_PER_PEER
        )
        self.host.on_peer_connected(self._on_peer_connected)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._gossip_loop, subscription)
                nursery.start_soon(self._anti_entropy_loop)
                nursery.start_soon(self._gc_loop)
                for peer in self.host.connected_peers():  # connected before we could listen
                    nursery.start_soon(self._exchange_quietly, peer, "start")
                task_status.started()
        finally:
            self._nursery = None
            subscription.close()
            try:
                self.host.remove_handler(SYNC_PROTOCOL)
            except Exception:  # the host may already be closing
                logger.debug("could not remove the %s handler", SYNC_PROTOCOL, exc_info=True)

    async def _gossip_loop(self, subscription: p2p.GossipSubscription) -> None:
        async for message in subscription:
            self.stats.gossip_messages += 1
            try:
                signed = crdt.decode_record(message.data)
            except crdt.ValidationError as exc:
                self._report(exc.rejection(), message.sender)
                continue
            self._merge([signed], source=message.sender, via="gossip")

    async def _anti_entropy_loop(self) -> None:
        while True:
            await trio.sleep(self.timing.anti_entropy_interval)
            peers = self._sync_candidates()
            if peers:
                await self._exchange_quietly(random.choice(peers), "periodic")

    async def _gc_loop(self) -> None:
        while True:
            await trio.sleep(self.timing.gc_interval)
            self.collect()

    def collect(self) -> int:
        """Drop records whose lease has ended now; return how many (gc runs this periodically)."""
        before = self._state
        after = before.gc(now_ms())
        if after is before:
            return 0
        dropped = len(before) - len(after)
        self.stats.collected += dropped
        self._set_state(after)
        return dropped

    # -- internals ---------------------------------------------------------------------------
    def _merge(
        self, incoming: crdt.Delta | Iterable[crdt.SignedRecord], *, source: ID | None, via: str
    ) -> crdt.MergeResult:
        now = now_ms()
        result = self._state.merge(incoming, now_ms=now)
        for rejection in result.rejected:
            self._report(rejection, source)
        if result.changed:
            for peer_id in result.changed:
                signed = result.state.get(peer_id)
                assert signed is not None
                try:
                    self.clock.update(signed.hlc, now)
                except crdt.ClockSkewError:  # merge refuses records this far ahead; belt and braces
                    pass
            if via == "gossip":
                self.stats.gossip_records += len(result.changed)
            elif via == "sync":
                self.stats.sync_records += len(result.changed)
            self._set_state(result.state)
        return result

    def _set_state(self, state: crdt.SwarmState) -> None:
        self._state = state
        self._generation += 1
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _report(self, rejection: crdt.Rejection, source: ID | None) -> None:
        self.stats.rejected += 1
        logger.debug(
            "refused a record from %s: %s (%s)", source, rejection.reason.value, rejection.detail
        )
        for callback in list(self._rejection_callbacks):
            try:
                callback(rejection, source)
            except Exception:
                logger.exception("on_rejected callback %r failed", callback)


def _as_id(peer: ID | str) -> ID | None:
    if isinstance(peer, ID):
        return peer
    try:
        return ID.from_base58(peer)
    except Exception:
        return None
