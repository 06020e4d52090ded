"""What a node says about itself in the swarm: its signed record, kept fresh by the `Announcer`.

The `Announcer` signs the node's record with its libp2p key (`signer_for`) every heartbeat, with
a lease of a few heartbeats, and publishes it through the node's `pipeline._swarm.SwarmView`
(merge locally, gossip). The first record, `set_state` (JOINING, ONLINE, DRAINING) and `leave`
(a newer OFFLINE record) are also pushed by anti-entropy, because gossip is lossy. The record's
fields come from `record_fields` over the node's live values (span, load, the throughput and RTTs
of `_measure`). `learn_addrs` puts the addresses other nodes announce into the peerstore, so the
node can dial them by peer id.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import trio

import crdt
import p2p
from pipeline._swarm import SwarmView, now_ms

logger = logging.getLogger("lamina.node")

MAX_ANNOUNCED_ADDRS = 8  # crdt's per-record limit (MAX_ADDRS in crdt/_record.py, not exported)

RecordFields = Callable[[], Mapping[str, Any]]
_ANNOUNCER_OWNED = frozenset({"peer_id", "hlc", "expires_ms", "state"})


def signer_for(identity: p2p.Identity) -> crdt.Signer:
    """A `crdt.Signer` for this host's libp2p identity (same key, so the same peer id).

    `Identity.private_key_bytes()` is the protobuf key-file form; the signer wants the raw
    Ed25519 seed, which py-libp2p's key object gives with `to_bytes()`.
    """
    signer = crdt.Signer(identity.key_pair.private_key.to_bytes())
    if signer.peer_id != identity.peer_id.to_bytes():
        raise ValueError("identity key does not give its own peer id (not an Ed25519 identity?)")
    return signer


def record_fields(*, model: crdt.ModelId, span: Callable[[], tuple[int, int]], throughput: Callable[[], float],
                  load: Callable[[], crdt.Load], rtts: Callable[[], Mapping[bytes, float]], version: str,
                  public_name: str, reachability: Callable[[], crdt.Reachability] = lambda: crdt.Reachability.DIRECT,
                  ) -> Callable[[], dict[str, Any]]:
    """The `Announcer`'s fields function over the node's live values."""

    def fields() -> dict[str, Any]:
        start, end = span()
        tps = throughput()
        return dict(
            model=model, start=start, end=end, throughput=tps,
            inference_rps=tps * (end - start),  # block-steps per second: 1 / (time per block)
            load=load(), next_rtts=dict(rtts()), version=version, public_name=public_name,
            reachability=reachability(),
        )

    return fields


def learn_addrs(host: p2p.Host, peer: str, addrs: list[str]) -> None:
    """Put a peer's announced addresses in the peerstore, so `host` can dial it by id."""
    if not addrs:
        return
    try:
        if host.is_connected(peer):
            return
        host.add_addrs(peer, list(addrs))   # direct ones, and circuit addresses through relays
    except Exception as exc:  # a bad address in someone's record: the dial will report it
        logger.debug("cannot learn the addresses of %s: %r", peer, exc)


class Announcer:
    """Keeps this node's signed record fresh in the swarm. Run `serve` in a nursery.

    `fields()` returns the node's current `crdt.ServerRecord` keyword arguments: at least
    `model`, `start`, `end`; optionally `throughput`, `inference_rps`, `load`, `addrs`,
    `reachability`, `next_rtts`, `version`, `public_name`. It is called for every record, so
    load and throughput are as fresh as the heartbeat. Without `addrs`, the host's own
    addresses are announced. `peer_id`, `hlc`, `expires_ms` and `state` belong to the announcer
    (`state` starts as `state=` and changes with `set_state` / `leave`).

    Every `heartbeat` seconds a new record is signed with a lease of `lease` seconds (default
    `LEASE_HEARTBEATS` heartbeats, so a few lost announcements do not expire a live node) and
    published. The first record and every state change are also pushed by anti-entropy, since
    they must not wait for gossip. If the swarm holds a newer record of ours (our previous
    incarnation, with a clock that was ahead), we re-announce at once with a newer timestamp.
    """

    LEASE_HEARTBEATS = 4

    def __init__(
        self,
        view: SwarmView,
        signer: crdt.Signer,
        fields: RecordFields,
        *,
        heartbeat: float = 10.0,
        lease: float | None = None,
        state: crdt.ServerState = crdt.ServerState.ONLINE,
    ) -> None:
        if signer.peer_id != view.peer_id:
            raise ValueError("the signer's key must be the host's identity (records are keyed by peer id)")
        if not (math.isfinite(heartbeat) and heartbeat > 0):
            raise ValueError("heartbeat must be a positive number of seconds")
        lease = self.LEASE_HEARTBEATS * heartbeat if lease is None else lease
        if not (math.isfinite(lease) and lease > heartbeat):
            raise ValueError("lease must be longer than the heartbeat")
        if lease * 1000 > view.config.max_lease_ms:
            raise ValueError(f"lease of {lease}s exceeds the swarm's max lease ({view.config.max_lease_ms} ms)")
        self.view = view
        self.signer = signer
        self.fields = fields
        self.heartbeat = heartbeat
        self.lease = lease
        self._state = crdt.ServerState(state)
        self._last: crdt.SignedRecord | None = None
        self._lock = trio.Lock()
        self._left = False
        self._loop_scope: trio.CancelScope | None = None

    @property
    def state(self) -> crdt.ServerState:
        return self._state

    @property
    def last(self) -> crdt.SignedRecord | None:
        """The last record we published."""
        return self._last

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce now (ready when the first record is in the local replica and gossiped), then
        every heartbeat, until cancelled or until `leave()`. Exceptions from `fields()` or an
        invalid record propagate: they are bugs of this node, not of the network.
        """
        if self._left:
            raise RuntimeError("this announcer has left")
        async with trio.open_nursery() as nursery:
            await self._announce(push=False)
            nursery.start_soon(self.view.push)  # the first record must not wait for the gossip mesh
            nursery.start_soon(self._guard_own_entry)
            task_status.started()
            with trio.CancelScope() as self._loop_scope:
                if not self._left:
                    while True:
                        await trio.sleep(self.heartbeat)
                        await self._announce(push=False)
            nursery.cancel_scope.cancel()  # left: stop guarding our entry too

    async def refresh(self) -> None:
        """Announce at once, pushed (our addresses or reachability changed)."""
        await self._announce(push=True)

    async def set_state(self, state: crdt.ServerState) -> None:
        """Switch state (e.g. DRAINING: no new sessions) and announce it at once, pushed by
        anti-entropy as well as gossip. Returns once published and pushed."""
        state = crdt.ServerState(state)
        if state is crdt.ServerState.OFFLINE:
            return await self.leave()  # idempotent, like leave()
        if self._left:
            raise RuntimeError("this announcer has left")
        self._state = state
        await self._announce(push=True)

    async def leave(self) -> None:
        """Graceful leave: publish (and push) a newer OFFLINE record, then stop announcing.

        The OFFLINE record keeps its lease, so replicas show the node as gone at once and gc
        drops the entry when the lease ends.
        """
        if self._left:
            return
        self._state = crdt.ServerState.OFFLINE
        self._left = True
        if self._loop_scope is not None:
            self._loop_scope.cancel()
        await self._announce(push=True, force=True)

    def make_record(self) -> crdt.SignedRecord:
        """Sign a fresh record from `fields()` and the current state, timestamped now."""
        fields = dict(self.fields())
        owned = _ANNOUNCER_OWNED & fields.keys()
        if owned:
            raise ValueError(f"fields() must not set {sorted(owned)}: the announcer owns them")
        if "addrs" not in fields:
            fields["addrs"] = tuple(self.view.host.addrs()[:MAX_ANNOUNCED_ADDRS])
        wall = now_ms()
        hlc = self.view.clock.now(wall)
        record = crdt.ServerRecord(
            peer_id=self.signer.peer_id,
            state=self._state,
            hlc=hlc,
            expires_ms=hlc.wall_ms + int(self.lease * 1000),
            **fields,
        )
        return self.signer.sign(record)

    async def _announce(self, *, push: bool, force: bool = False) -> None:
        async with self._lock:
            if self._left and not force:
                return
            for _ in range(2):
                signed = self.make_record()
                # Set before publishing: our own merge must not look like "a newer record of ours"
                # to `_guard_own_entry` while the push is still running.
                self._last = signed
                # Not admitted only if the replica holds a newer record of ours; the view's clock
                # has observed it, so a second record, made now, is newer.
                if await self.view.publish(signed, push=push):
                    return
            raise RuntimeError("our own record was not admitted twice in a row (clock bug?)")

    async def _guard_own_entry(self) -> None:
        """Re-announce at once if the swarm brings a newer record of ours than our last one."""
        me = self.signer.peer_id

        def superseded(state: crdt.SwarmState) -> bool:
            held = state.get(me)
            return held is not None and self._last is not None and held.newer_than(self._last)

        while True:
            await self.view.wait_until(superseded)
            logger.info("the swarm holds a newer record of ours; re-announcing")
            await self._announce(push=False)
