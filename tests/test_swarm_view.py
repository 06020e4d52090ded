"""The swarm state over a real mesh: `SwarmView` (pipeline/_swarm.py) + the node's `Announcer`
(node/_announce.py) on py-libp2p hosts on loopback.

Every test starts its own hosts in-process with `p2p.open_host` (TCP + Noise + yamux, gossipsub),
connected through one bootstrap peer; nothing is mocked. No test sleeps a fixed time: each waits
on a condition (`SwarmView.wait_until`, woken on every change of the replica) under a
`trio.fail_at` deadline derived from the protocol's own timing (heartbeat, lease, gc interval)
plus `SLACK` for a shared 2-core machine. Short heartbeats (0.5 s, lease 2 s) keep the file fast.
"Converged within 2 heartbeats" is measured from the moment the last node began starting (its host
not even open yet).

The DHT is off: the bootstrap peer is then the only link between nodes (a star), the hardest case
for gossip and anti-entropy alike, and hosts start faster.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

import crdt
import p2p
from node._announce import Announcer, signer_for
from pipeline._swarm import (
    SWARM_TOPIC,
    SYNC_PROTOCOL,
    SwarmSync,
    SwarmTiming,
    SwarmView,
    now_ms,
    swarm_topics,
)

HEARTBEAT = 0.5
LEASE = 4 * HEARTBEAT
GC_INTERVAL = HEARTBEAT / 2
# Every bound below is protocol time + SLACK: the scheduling noise of up to seven py-libp2p hosts
# in one process on 2 shared cores. A slower machine can raise it (LAMINA_TEST_SLACK=3 pytest).
SLACK = float(os.environ.get("LAMINA_TEST_SLACK", "1.0"))
FAST = SwarmTiming(anti_entropy_interval=HEARTBEAT, gc_interval=GC_INTERVAL, sync_deadline=2.0)
MODEL = crdt.ModelId.from_config("tiny", {"num_hidden_layers": 10})


@dataclass
class Peer:
    host: p2p.Host
    view: SwarmView
    announcer: Announcer | None
    scope: trio.CancelScope  # cancel it to kill the peer abruptly (no leave; host closed)

    @property
    def pid(self) -> bytes:
        return self.view.peer_id


async def _run_peer(
    index: int,
    bootstrap: list[str],
    timing: SwarmTiming,
    heartbeat: float | None,
    lease: float | None = LEASE,
    topic: str = SWARM_TOPIC,
    *,
    task_status: trio.TaskStatus[Peer] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = p2p.HostConfig(
        identity=p2p.Identity.generate(),
        listen_addrs=["/ip4/127.0.0.1/tcp/0"],
        bootstrap_peers=bootstrap,
        gossip_topics=swarm_topics(topic=topic),
        enable_dht=False,
    )
    with trio.CancelScope() as scope:
        async with p2p.open_host(config) as host, trio.open_nursery() as nursery:
            view = SwarmView(host, timing=timing, topic=topic)
            await nursery.start(view.serve)
            announcer = None
            if heartbeat is not None:
                fields = lambda: dict(model=MODEL, start=index, end=index + 2, throughput=10.0 + index)  # noqa: E731
                announcer = Announcer(view, signer_for(host.identity), fields, heartbeat=heartbeat, lease=lease)
                await nursery.start(announcer.serve)
            task_status.started(Peer(host, view, announcer, scope))
            await trio.sleep_forever()


@asynccontextmanager
async def swarm(
    n: int, *, timing: SwarmTiming = FAST, heartbeat: float = HEARTBEAT, lease: float | None = LEASE
) -> AsyncIterator[tuple[list[Peer], trio.Nursery, float]]:
    """`n` announcing nodes, the first one the bootstrap peer of the others. Yields the peers,
    the nursery (to start more) and the `trio.current_time()` at which the last one began."""
    async with trio.open_nursery() as nursery:
        peers: list[Peer] = []
        for i in range(n):
            last_start = trio.current_time()
            boot = [peers[0].host.addrs()[0]] if peers else []
            peers.append(await nursery.start(_run_peer, i, boot, timing, heartbeat, lease))
        yield peers, nursery, last_start
        nursery.cancel_scope.cancel()


async def all_hold(views: list[SwarmView], predicate) -> None:
    async with trio.open_nursery() as nursery:
        for v in views:
            nursery.start_soon(v.wait_until, predicate)


def holds_all(pids):
    return lambda state: all(p in state for p in pids)


def in_state(pid: bytes, wanted: crdt.ServerState):
    def check(state: crdt.SwarmState) -> bool:
        r = state.get(pid)
        return r is not None and r.record.state is wanted

    return check


async def test_five_nodes_converge_within_two_heartbeats():
    async with swarm(5) as (peers, _, last_start):
        pids = [p.pid for p in peers]
        with trio.fail_at(last_start + 2 * HEARTBEAT + SLACK):
            await all_hold([p.view for p in peers], holds_all(pids))
        took = trio.current_time() - last_start
        print(f"converged {took:.3f}s after the last start")
        for p in peers:
            servers = p.view.servers(MODEL.config_hash)
            assert sorted(r.peer_id for r in servers) == sorted(pids)
            assert [r.start for r in servers] == list(range(5))
            assert all(r.state is crdt.ServerState.ONLINE for r in servers)
            assert p.view.servers(MODEL.config_hash.hex()) == servers
            assert p.view.stats.rejected == 0


@pytest.mark.slow  # waits out a lease and a gc interval (~4 s)
async def test_leave_shows_offline_at_once_and_killed_node_expires_by_lease():
    async with swarm(5) as (peers, _, last_start):
        pids = [p.pid for p in peers]
        with trio.fail_at(last_start + 2 * HEARTBEAT + SLACK):
            await all_hold([p.view for p in peers], holds_all(pids))
        leaver, victim, others = peers[3], peers[4], peers[:3]

        # draining: published at once, visible with its state, before any heartbeat could say it
        await leaver.announcer.set_state(crdt.ServerState.DRAINING)
        with trio.fail_after(SLACK):
            await all_hold([p.view for p in others + [victim]], in_state(leaver.pid, crdt.ServerState.DRAINING))
        rec = next(r for r in others[0].view.servers(MODEL.config_hash) if r.peer_id == leaver.pid)
        assert rec.state is crdt.ServerState.DRAINING and not rec.is_live(now_ms())

        # graceful leave: OFFLINE everywhere well before its lease could end
        await leaver.announcer.leave()
        left_at = trio.current_time()
        with trio.fail_after(SLACK):
            await all_hold([p.view for p in others + [victim]], in_state(leaver.pid, crdt.ServerState.OFFLINE))
        print(f"OFFLINE everywhere {trio.current_time() - left_at:.3f}s after leave() returned")
        assert trio.current_time() - left_at < LEASE / 2
        for p in others:
            assert leaver.pid not in [r.peer_id for r in p.view.servers(MODEL.config_hash)]

        # abrupt death: no OFFLINE record; the entry goes when its lease ends (gc), not before
        held = {id(p): p.view.state.get(victim.pid) for p in others}
        victim.scope.cancel()
        gone_at: dict[int, float] = {}

        async def watch(p: Peer) -> None:
            def gone(state: crdt.SwarmState) -> bool:
                r = state.get(victim.pid)
                if r is not None and r.newer_than(held[id(p)]):
                    held[id(p)] = r  # a heartbeat still in flight when it died
                return r is None

            await p.view.wait_until(gone)
            gone_at[id(p)] = time.time()

        with trio.fail_after(LEASE + GC_INTERVAL + SLACK):
            async with trio.open_nursery() as nursery:
                for p in others:
                    nursery.start_soon(watch, p)
        for p in others:
            expiry = held[id(p)].record.expires_ms / 1000
            assert expiry - 0.01 <= gone_at[id(p)] <= expiry + GC_INTERVAL + SLACK
            assert held[id(p)].record.state is crdt.ServerState.ONLINE  # it never said goodbye
            assert p.view.stats.collected >= 1
        # and it does not come back through anti-entropy among the survivors
        assert all(victim.pid not in p.view.state for p in others)


@asynccontextmanager
async def bare_host(bootstrap: str | None, topics: list[str]) -> AsyncIterator[p2p.Host]:
    """A host with no SwarmView: an attacker, or a static replica."""
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                            bootstrap_peers=[bootstrap] if bootstrap else [], gossip_topics=topics, enable_dht=False)
    async with p2p.open_host(config) as host:
        yield host


@asynccontextmanager
async def static_replica(state: crdt.SwarmState) -> AsyncIterator[p2p.Host]:
    """A host that answers anti-entropy from a fixed state and never starts an exchange."""
    async with bare_host(None, []) as host:

        async def answer(peer, request):
            reply = crdt.sync(crdt.decode_message(request.data), state)
            return SwarmSync(b"" if reply is None else crdt.encode_message(reply))

        host.set_unary_handler(SYNC_PROTOCOL, answer, accepts=SwarmSync)
        yield host


async def test_new_client_gets_full_state_by_anti_entropy():
    # Gossip cannot explain what the clients learn: the nodes' heartbeat and periodic
    # anti-entropy are far beyond the test's length, and the clients' replicas listen on a gossip
    # topic nobody publishes to (gossipsub would otherwise replay recent messages to a newcomer
    # through IHAVE/IWANT). Only anti-entropy with the peers they connect to can fill them.
    slow = SwarmTiming(anti_entropy_interval=600.0, gc_interval=600.0, sync_deadline=2.0)
    isolated = "lamina/swarm/test-isolated"
    async with swarm(5, timing=slow, heartbeat=100.0, lease=None) as (peers, nursery, _):
        pids = [p.pid for p in peers]
        with trio.fail_after(10):  # the bootstrap peer learns everyone from their first announcements
            await peers[0].view.wait_until(holds_all(pids))
        boot = peers[0].host.addrs()[0]

        # a client whose view runs before it connects to a node: the exchange on connection
        late = await nursery.start(_run_peer, 98, [], slow, None, None, isolated)
        assert len(late.view.state) == 0
        connected = trio.current_time()
        await late.host.connect(boot)
        with trio.fail_at(connected + 0.5 + SLACK):
            await late.view.wait_until(holds_all(pids))
        print(f"client full {trio.current_time() - connected:.3f}s after connecting")

        # a client whose host dialled its bootstrap peer before the view started; that peer is a
        # static replica that never starts an exchange: the view must pull when it starts
        async with static_replica(peers[0].view.state) as static:
            joined = trio.current_time()
            early = await nursery.start(_run_peer, 99, [static.addrs()[0]], slow, None, None, isolated)
            with trio.fail_at(joined + 1.0 + SLACK):
                await early.view.wait_until(holds_all(pids))

        for client in (early, late):
            assert client.view.stats.gossip_messages == 0
            assert client.view.stats.sync_records == 5
            assert client.view.state == peers[0].view.state
            assert client.pid not in peers[0].view.state  # a client announces nothing


async def test_restarted_node_supersedes_its_previous_incarnation():
    # A record of ours from a previous run, stamped ahead of our clock (that run's clock was
    # ahead), reaches us through the swarm. With a heartbeat far away, only the announcer's
    # guard can answer: it must re-announce at once, newer, because the view's clock saw it.
    async with swarm(2, heartbeat=100.0, lease=None) as (peers, _, last_start):
        node, other = peers
        with trio.fail_after(2 * HEARTBEAT + SLACK):
            await all_hold([node.view, other.view], holds_all([node.pid, other.pid]))
        signer = signer_for(node.host.identity)
        wall = now_ms()
        previous = signer.sign(crdt.ServerRecord(
            peer_id=node.pid, model=MODEL, start=0, end=2, state=crdt.ServerState.OFFLINE,
            hlc=crdt.Hlc(wall + 3000, 0), expires_ms=wall + 3000 + int(LEASE * 1000), public_name="previous run",
        ))
        await other.view.publish(previous, push=True)

        def current(state: crdt.SwarmState) -> bool:
            r = state.get(node.pid)
            return r is not None and r.hlc > previous.hlc and r.record.state is crdt.ServerState.ONLINE

        with trio.fail_after(SLACK):
            await all_hold([node.view, other.view], current)
        assert node.announcer.last == node.view.state.get(node.pid) == other.view.state.get(node.pid)

        # the announcer refuses what would make its records invalid or not its own
        fields = lambda: dict(model=MODEL, start=0, end=2)  # noqa: E731
        with pytest.raises(ValueError, match="max lease"):
            Announcer(node.view, signer, fields, heartbeat=1.0, lease=10_000.0)
        with pytest.raises(ValueError, match="identity"):
            Announcer(node.view, signer_for(other.host.identity), fields)
        bad = Announcer(node.view, signer, lambda: dict(model=MODEL, start=0, end=2, state=crdt.ServerState.ONLINE))
        with pytest.raises(ValueError, match="owns"):
            bad.make_record()
        wall = now_ms()
        unsigned = crdt.ServerRecord(peer_id=node.pid, model=MODEL, start=0, end=2, state=crdt.ServerState.ONLINE,
                                     hlc=crdt.Hlc(wall + 5000, 0), expires_ms=wall + 6000)
        with pytest.raises(ValueError, match="invalid record"):
            await node.view.publish(crdt.SignedRecord(unsigned, signer.public_key, bytes(64)))
        with pytest.raises(ValueError):
            node.view.servers("not hex")


def test_timing_topics_and_signer():
    with pytest.raises(ValueError):
        SwarmTiming(anti_entropy_interval=0)
    with pytest.raises(ValueError):
        SwarmTiming(gc_interval=float("nan"))
    assert swarm_topics() == [SWARM_TOPIC]
    assert swarm_topics("other", SWARM_TOPIC) == [SWARM_TOPIC, "other"]
    identity = p2p.Identity.generate(b"\x07" * 32)
    assert signer_for(identity).peer_id == identity.peer_id.to_bytes()


# --- forged and lying peers ------------------------------------------------------------------


def forge(victim: crdt.SignedRecord, attacker: crdt.Signer) -> list[bytes]:
    """Wire bytes of records claiming `victim`'s entry (newer than its real one, so they would
    win if admitted), signed by the attacker: with the attacker's own key in the envelope
    (key does not match the peer id), with the victim's key (signature does not verify), and a
    genuine record altered after signing (newer timestamp, so it is not ignored as stale)."""
    wall = now_ms()
    fake = crdt.ServerRecord(
        peer_id=victim.peer_id, model=MODEL, start=0, end=10, state=crdt.ServerState.ONLINE,
        hlc=crdt.Hlc(wall + 1000, 0), expires_ms=wall + 1000 + int(LEASE * 1000), public_name="forged",
    )
    signature = attacker.sign_bytes(crdt.SIGNING_DOMAIN + fake.encode())
    tampered = crdt.SignedRecord(
        crdt.ServerRecord(**{f: getattr(victim.record, f) for f in victim.record.__slots__}
                           | {"public_name": "forged", "hlc": fake.hlc, "expires_ms": fake.expires_ms}),
        victim.public_key,
        victim.signature,
    )
    return [
        crdt.SignedRecord(fake, attacker.public_key, signature).wire,
        crdt.SignedRecord(fake, victim.public_key, signature).wire,
        tampered.wire,
    ]


def own_record(signer: crdt.Signer, name: str) -> crdt.SignedRecord:
    wall = now_ms()
    return signer.sign(crdt.ServerRecord(
        peer_id=signer.peer_id, model=MODEL, start=8, end=10, state=crdt.ServerState.ONLINE,
        hlc=crdt.Hlc(wall, 0), expires_ms=wall + int(LEASE * 1000), public_name=name,
    ))


class Rejections:
    """What one view refused, with a wakeup per refusal (to wait without polling)."""

    def __init__(self, view: SwarmView) -> None:
        self.seen: list[tuple[crdt.Rejection, object]] = []
        self._event = trio.Event()
        view.on_rejected(self._on)

    def _on(self, rejection: crdt.Rejection, source: object) -> None:
        self.seen.append((rejection, source))
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, n: int) -> None:
        while len(self.seen) < n:
            await self._event.wait()


def assert_untouched(view: SwarmView) -> None:
    for signed in view.state:
        assert signed.check() is None
        assert signed.record.public_name != "forged"


async def test_forged_gossip_is_rejected_by_every_replica():
    async with swarm(3) as (peers, _, last_start):
        pids = [p.pid for p in peers]
        views = [p.view for p in peers]
        with trio.fail_at(last_start + 2 * HEARTBEAT + SLACK):
            await all_hold(views, holds_all(pids))
        logs = [Rejections(v) for v in views]
        async with bare_host(peers[0].host.addrs()[0], swarm_topics()) as evil:
            signer = signer_for(evil.identity)
            with trio.fail_after(5):  # gossipsub grafts at its next heartbeat (1 s)
                await evil.gossip.wait_for_mesh(SWARM_TOPIC)
            forged = forge(peers[1].view.state.get(peers[1].pid), signer) + [b"\x93not a record"]
            for data in forged:
                await evil.gossip.publish(SWARM_TOPIC, data)
            control = own_record(signer, "control")  # proves the attacker's gossip reaches everyone
            await evil.gossip.publish(SWARM_TOPIC, control.wire)
            with trio.fail_after(2 * HEARTBEAT + SLACK):
                async with trio.open_nursery() as nursery:
                    for log in logs:
                        nursery.start_soon(log.wait_for, len(forged))
        for view, log in zip(views, logs):
            reasons = sorted(r.reason.value for r, _ in log.seen)
            assert reasons == ["bad_signature", "bad_signature", "malformed", "peer_id_mismatch"]
            assert {source for _, source in log.seen} == {evil.peer_id}
            assert_untouched(view)
            assert view.state.get(peers[1].pid).public_key == peers[1].pid[2:]


async def test_lying_or_stalling_sync_peer_is_refused_and_harmless():
    timing = SwarmTiming(anti_entropy_interval=600.0, gc_interval=600.0, sync_deadline=0.5)
    async with swarm(1, timing=timing) as (peers, _, _):
        honest = peers[0]
        log = Rejections(honest.view)
        async with bare_host(None, []) as evil:
            signer = signer_for(evil.identity)
            genuine = honest.view.state.get(honest.pid)
            forged = forge(genuine, signer)
            delta = crdt.Delta(tuple(crdt.decode_record(w) for w in forged) + (own_record(signer, "forged"),))
            replies = {
                # three records claiming the honest node's entry, and the attacker's own (valid)
                "forged": SwarmSync(crdt.encode_message(delta)),
                "garbage": SwarmSync(b"\x92\x07junk"),
                "digest": SwarmSync(crdt.encode_message(crdt.digest(crdt.SwarmState()))),
                "quiet": SwarmSync(b""),
            }
            mode = "quiet"
            asked = trio.Event()

            async def lie(peer, request):
                asked.set()
                if mode == "stall":
                    await trio.sleep_forever()
                return replies[mode]

            evil.set_unary_handler(SYNC_PROTOCOL, lie, accepts=SwarmSync)
            await evil.connect(honest.host.addrs()[0])
            with trio.fail_after(2):  # the honest view's exchange on connect: let it end quietly
                await asked.wait()
            before = len(log.seen)
            mode = "forged"
            assert await honest.view.sync_with(evil.peer_id) == 1  # only the attacker's own record
            assert len(log.seen) - before == 3
            assert honest.view.state.get(honest.pid).public_key == honest.pid[2:]
            assert honest.view.state.get(honest.pid).record.public_name != "forged"
            mode = "garbage"
            with pytest.raises(p2p.RemoteProtocolError):
                await honest.view.sync_with(evil.peer_id)
            mode = "digest"
            with pytest.raises(p2p.RemoteProtocolError):
                await honest.view.sync_with(evil.peer_id)
            mode = "stall"
            t0 = trio.current_time()
            with pytest.raises(p2p.PeerTimeoutError):
                await honest.view.sync_with(evil.peer_id)
            assert trio.current_time() - t0 < timing.sync_deadline + SLACK

            # the other direction: forged and malformed requests to the honest responder
            with pytest.raises(p2p.RemoteError) as err:
                await evil.request(honest.host.peer_id, SYNC_PROTOCOL, SwarmSync(b"\xc1"))
            assert err.value.code == p2p.ErrorCode.BAD_REQUEST
            before = len(log.seen)
            newer_own = own_record(signer, "pushed")
            push = crdt.Delta(tuple(crdt.decode_record(w) for w in forged) + (newer_own,))
            reply = await evil.request(honest.host.peer_id, SYNC_PROTOCOL, SwarmSync(crdt.encode_message(push)))
            assert isinstance(reply, SwarmSync)
            assert len(log.seen) - before == 3  # the forged ones refused, the valid one admitted
            assert honest.view.state.get(signer.peer_id) == newer_own

            # still serving, still honest: a fresh digest gets the true state back
            reply = await evil.request(
                honest.host.peer_id, SYNC_PROTOCOL, SwarmSync(crdt.encode_message(crdt.digest(crdt.SwarmState())))
            )
            answer = crdt.decode_message(reply.data)
            assert honest.pid in {r.peer_id for r in answer.records}
            assert all(r.check() is None and r.record.public_name != "forged" or r.peer_id == signer.peer_id
                       for r in answer.records)
