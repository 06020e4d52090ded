"""Forged and stale swarm state, and servers that lie about themselves.

Records signed by the wrong key and forged signatures are refused by every replica over real
gossip and anti-entropy (tests/test_swarm_view.py, tests/test_crdt_state.py); here: a genuine
but old record replayed over gossip and anti-entropy, clocks far ahead (refused, or outlived and
superseded), a server announcing blocks it does not serve (refuses the session: the client routes
around it and, with the `_chain.py` hook, avoids it afterwards), and a server claiming a speed it
does not have (its claim is bounded by the swarm's, and a measured speed replaces it).
"""

from __future__ import annotations

import pytest
import torch
import trio

import crdt
import p2p
from _wait import eventually
from conftest import assert_decisive
from pipeline import AsyncDistributedModelForCausalLM, LocalModelForCausalLM
from pipeline._routing import (DISTRUST_TTL, LIE_FACTOR, MAX_CLAIMED_ADVANTAGE, MEASURE_TTL_MS, RouteOptions,
                               block_costs, choose_route)
from pipeline._swarm import SWARM_TOPIC, SYNC_PROTOCOL, SwarmSync, SwarmView, now_ms, swarm_topics
from pipeline.launch import LocalSwarm
from pipeline.protocol import BAD_REQUEST, BUSY, INFERENCE_PROTOCOL, OpenSession
from test_swarm_view import HEARTBEAT, SLACK, bare_host, own_record, signer_for, swarm

NOW = 1_800_000_000_000
CONFIG = crdt.SwarmConfig(max_skew_ms=10_000, max_lease_ms=600_000)
MODEL = crdt.ModelId("m", b"\x05" * 32)
SIGNERS = [crdt.Signer(bytes([40 + i]) * 32) for i in range(6)]


def signed(i: int, *, dt: int = 0, span=(0, 8), rps: float = 100.0, lease: int = 60_000,
           state=crdt.ServerState.ONLINE) -> crdt.SignedRecord:
    """A record of SIGNERS[i] as a replica receives it: signed, on the wire, decoded."""
    r = crdt.ServerRecord(peer_id=SIGNERS[i].peer_id, model=MODEL, start=span[0], end=span[1], state=state,
                          hlc=crdt.Hlc(NOW + dt, 0), expires_ms=NOW + dt + lease, inference_rps=rps,
                          load=crdt.Load(0, 1 << 20))
    return crdt.decode_record(SIGNERS[i].sign(r).wire)


def pid(i: int) -> str:
    return crdt.peer_id_to_str(SIGNERS[i].peer_id)


def route(state: crdt.SwarmState, opts: RouteOptions = RouteOptions(), now: int = NOW) -> list[tuple[str, int, int]]:
    return [(h.peer_id, h.start, h.end) for h in choose_route(state.live(now, MODEL), 0, 8, now_ms=now, options=opts)]


# --- replayed and far-future records ---------------------------------------------------------------
async def test_a_replayed_older_record_never_overrides_a_newer_one():
    """An attacker replays a node's genuine but superseded record, by gossip and pushed by
    anti-entropy: every replica keeps the newer one (an older record loses LWW unchecked)."""
    async with swarm(2) as (peers, _, _):
        honest, other = peers
        first = await honest.view.wait_until(lambda s: s.get(honest.pid) is not None)
        old = first.get(honest.pid)
        newer_hlc = lambda s: s.get(honest.pid) is not None and s.get(honest.pid).hlc > old.hlc  # noqa: E731
        with trio.fail_after(2 * HEARTBEAT + SLACK):  # the next heartbeat's record, everywhere
            for p in peers:
                await p.view.wait_until(newer_hlc)
        async with bare_host(honest.host.addrs()[0], swarm_topics()) as evil:
            with trio.fail_after(5):
                await evil.gossip.wait_for_mesh(SWARM_TOPIC)
            await evil.gossip.publish(SWARM_TOPIC, old.wire)
            reply = await evil.request(honest.host.peer_id, SYNC_PROTOCOL,
                                       SwarmSync(crdt.encode_message(crdt.Delta((old,)))))
            assert isinstance(reply, SwarmSync)
            control = own_record(signer_for(evil.identity), "control")  # gossip from evil has arrived
            await evil.gossip.publish(SWARM_TOPIC, control.wire)
            with trio.fail_after(2 * HEARTBEAT + SLACK):
                for p in peers:
                    await p.view.wait_until(lambda s: control.peer_id in s)
            for p in peers:
                assert p.view.state.get(honest.pid).hlc > old.hlc


def test_a_far_future_record_is_refused_and_cannot_drag_the_clock():
    ahead = signed(0, dt=3_600_000)
    result = crdt.SwarmState(CONFIG).merge([ahead], now_ms=NOW)
    assert [r.reason for r in result.rejected] == [crdt.RejectReason.FUTURE] and len(result.state) == 0
    clock = crdt.HybridClock(CONFIG.max_skew_ms, crdt.Hlc(NOW, 0))
    with pytest.raises(crdt.ClockSkewError):
        clock.update(ahead.hlc, NOW)
    assert clock.last == crdt.Hlc(NOW, 0)  # unchanged: the next record is dated by our own time


def test_a_record_just_inside_the_skew_pins_nothing_for_long():
    """A record dated as far ahead as admitted (a node whose clock ran ahead, then was fixed)
    beats its honest successors until its own signer observes it (then the next one is newer),
    or its lease ends (then gc drops it): never for longer than skew + max lease."""
    ahead = signed(0, dt=CONFIG.max_skew_ms, lease=CONFIG.max_lease_ms)
    state = crdt.SwarmState(CONFIG).merge([ahead], now_ms=NOW).state
    honest_now = signed(0, dt=1, span=(0, 4))
    assert state.merge([honest_now], now_ms=NOW + 1).state.get(SIGNERS[0].peer_id) == ahead  # loses LWW
    clock = crdt.HybridClock(CONFIG.max_skew_ms)
    clock.update(ahead.hlc, NOW + 1)  # what the Announcer's view does with every admitted record
    successor = SIGNERS[0].sign(crdt.ServerRecord(
        peer_id=SIGNERS[0].peer_id, model=MODEL, start=0, end=4, state=crdt.ServerState.ONLINE,
        hlc=clock.now(NOW + 1), expires_ms=NOW + 60_000))
    assert state.merge([successor], now_ms=NOW + 1).state.get(SIGNERS[0].peer_id) == successor
    end = ahead.record.expires_ms
    assert end - NOW <= CONFIG.max_skew_ms + CONFIG.max_lease_ms
    assert SIGNERS[0].peer_id not in state.gc(end)


# --- a server announcing blocks it does not serve ---------------------------------------------------
async def test_a_server_refusing_what_it_announces_is_avoided_until_its_distrust_expires(autojump_clock):
    state = crdt.SwarmState.of([signed(0, rps=1000.0), signed(1, rps=100.0)], now_ms=NOW, config=CONFIG)
    opts = RouteOptions()
    assert route(state, opts) == [(pid(0), 0, 8)]  # the liar's record is the fastest
    assert not opts.distrust_refusal(pid(0), p2p.RemoteError(BUSY, "no memory now"))  # honest, passing
    assert route(state, opts) == [(pid(0), 0, 8)]
    assert opts.distrust_refusal(pid(0), p2p.RemoteError(BAD_REQUEST, "blocks 0:8 are not inside 0:1"))
    assert route(state, opts) == [(pid(1), 0, 8)]
    await trio.sleep(DISTRUST_TTL + 1)
    assert route(state, opts) == [(pid(0), 0, 8)]  # a node may have been fixed: asked again


# --- a server claiming a speed it does not have ------------------------------------------------------
def test_an_inflated_throughput_claim_is_bounded_then_replaced_by_what_was_measured():
    records = [signed(0, rps=1e12), signed(1, rps=100.0), signed(2, rps=90.0)]
    state = crdt.SwarmState.of(records, now_ms=NOW, config=CONFIG)
    servers = sorted(state.live(NOW, MODEL), key=lambda r: r.inference_rps)
    opts = RouteOptions()
    costs = block_costs(servers, opts, NOW)
    median = 10.0  # ms per block claimed by the middle server (100 rps)
    assert costs[-1] == pytest.approx(median / MAX_CLAIMED_ADVANTAGE)  # not 1e-9 ms
    assert route(state, opts) == [(pid(0), 0, 8)]  # unmeasured, its (bounded) claim still wins
    for _ in range(3):  # what the client's steps through it showed: 20 ms per block
        opts.observe_hop(pid(0), 8, 8 * 20.0, NOW)
    assert route(state, opts) == [(pid(1), 0, 8)]
    # an honest server measured near its claim keeps its claim (hops add to what is measured)
    opts.observe_hop(pid(1), 8, 8 * 10.0 * (LIE_FACTOR - 1), NOW)
    assert block_costs(servers, opts, NOW)[1] == pytest.approx(10.0)
    # measurements age out: servers change, and a liar may have become honest
    aged = RouteOptions()
    aged.observe_hop(pid(0), 8, 8 * 20.0, NOW - MEASURE_TTL_MS)
    assert route(state, aged) == [(pid(0), 0, 8)]


# --- the liar in a real swarm ---------------------------------------------------------------------
async def serve_liar(node_addr: str, model_hash: str, opens: list[str], *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A host that announces, signed with its own key, blocks 0:8 of the model at an absurd rate,
    and refuses every session for them as a real node refuses blocks it does not hold."""
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"],
                            bootstrap_peers=[node_addr], gossip_topics=swarm_topics(), enable_dht=False)
    async with p2p.open_host(config) as host, trio.open_nursery() as nursery:
        view = SwarmView(host)
        await nursery.start(view.serve)

        async def refuse(peer: object, session: p2p.Session) -> None:
            msg = await session.receive()
            assert isinstance(msg, OpenSession)
            opens.append(msg.session_id)
            raise p2p.RemoteError(BAD_REQUEST, f"blocks {msg.start}:{msg.end} are not inside this node's blocks 0:1")

        host.set_session_handler(INFERENCE_PROTOCOL, refuse, lane=True)
        signer, wall = signer_for(host.identity), now_ms()
        await view.publish(signer.sign(crdt.ServerRecord(
            peer_id=signer.peer_id, model=crdt.ModelId("liar", bytes.fromhex(model_hash)), start=0, end=8,
            state=crdt.ServerState.ONLINE, hlc=view.clock.now(wall), expires_ms=wall + 300_000,
            throughput=1e9, inference_rps=1e10, load=crdt.Load(0, 1 << 30), addrs=tuple(host.addrs()))), push=True)
        task_status.started(host.peer_id_str)
        await trio.sleep_forever()


@pytest.mark.slow
async def test_the_client_routes_around_a_server_announcing_blocks_it_does_not_serve(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("A liar joined the swarm")])
    expected = assert_decisive(local, local.generate(prompt, max_new_tokens=8, eos_token_id=[]), 8)
    with LocalSwarm(tiny_model, [(0, 8)]) as swarm_:
        addr = swarm_.nodes[0].addr
        async with trio.open_nursery() as nursery:
            opens: list[str] = []
            liar = await nursery.start(serve_liar, addr, local.checkpoint.model_hash, opens)
            async with AsyncDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=[addr]) as model:
                liar_bytes = crdt.peer_id_from_str(liar)
                await eventually(lambda: liar_bytes in model.view.state, timeout=10)
                for run in range(2):  # two sessions, one after the other
                    out = await model.generate(prompt, max_new_tokens=8, eos_token_id=[])
                    assert torch.equal(out, expected)
                    assert liar in model.options.chain.route_options.distrusted
                assert len(opens) == 1, f"the liar was asked {len(opens)} times"  # the first session only
            nursery.cancel_scope.cancel()
