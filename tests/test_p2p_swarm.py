"""Five real hosts on loopback, joined through one bootstrap peer: DHT discovery, providers,
gossip (signed, size-limited)."""

from __future__ import annotations

import multiaddr
import pytest
import trio

import p2p
from _wait import eventually

TOPIC = "lamina/test-swarm"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _config(**kwargs) -> p2p.HostConfig:  # type: ignore[no-untyped-def]
    return p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], gossip_topics=[TOPIC], **kwargs)


@pytest.fixture
async def swarm(nursery) -> list[p2p.Host]:  # type: ignore[no-untyped-def]
    """A bootstrap host and four hosts that know only the bootstrap host's address."""
    boot = await nursery.start(p2p.serve_host, _config())
    hosts = [boot]
    for _ in range(4):
        hosts.append(await nursery.start(p2p.serve_host, _config(bootstrap_peers=[boot.addrs()[0]])))
    return hosts


def _port(addr: str) -> str:
    return multiaddr.Multiaddr(addr).value_for_protocol("tcp")


async def test_hosts_find_each_other_through_one_bootstrap_peer(swarm: list[p2p.Host]) -> None:
    assert all(h.dht is not None and h.dht.mode == "server" for h in swarm)  # loopback swarm => servers
    for host in swarm[1:]:
        assert host.dht is not None and swarm[0].peer_id in host.dht.routing_table_peers()
    with trio.fail_after(20):
        for a in swarm:
            for b in swarm:
                if a is b:
                    continue
                assert a.dht is not None
                found = await a.dht.find_peer(b.peer_id)
                assert _port(b.addrs()[0]) in {_port(x) for x in found}, (a.peer_id, b.peer_id, found)
    # routing tables converge to the whole swarm (seeded from connections, which py-libp2p
    # itself never does)
    await eventually(lambda: all(set(host.dht.routing_table_peers()) == {h.peer_id for h in swarm if h is not host}
                                 for host in swarm), timeout=10, interval=0.05)


async def test_model_providers_are_found_through_the_dht(swarm: list[p2p.Host]) -> None:
    boot, a, b, c, d = swarm
    assert a.dht and b.dht and c.dht and d.dht
    with trio.fail_after(20):
        assert await a.dht.provide(MODEL)
        assert await b.dht.provide(MODEL)
        found = await d.dht.find_providers(MODEL)
        assert {r.peer_id for r in found} == {a.peer_id, b.peer_id}
        by_id = {r.peer_id: r for r in found}
        assert _port(a.addrs()[0]) in {_port(x) for x in by_id[a.peer_id].addrs}
        # a provider looking for others still finds them (py-libp2p alone would return only
        # its own local record)
        assert {r.peer_id for r in await a.dht.find_providers(MODEL)} == {a.peer_id, b.peer_id}
        assert await c.dht.find_providers("some/other-model") == []
        # the record is usable: dial the provider from its advertised address
        assert await d.connect(by_id[b.peer_id].full_addrs()[0]) == b.peer_id


async def _wait_for_meshes(hosts: list[p2p.Host]) -> None:
    with trio.fail_after(15):
        for host in hosts:
            assert host.gossip is not None
            await host.gossip.wait_for_mesh(TOPIC, 1)


async def test_a_gossip_message_reaches_all_five(swarm: list[p2p.Host]) -> None:
    subs = [h.gossip.subscribe(TOPIC) for h in swarm if h.gossip]
    await _wait_for_meshes(swarm)
    publisher = swarm[3]
    assert publisher.gossip is not None
    await publisher.gossip.publish(TOPIC, b"load=0.25")
    with trio.fail_after(10):
        for host, sub in zip(swarm, subs):
            if host is publisher:
                continue
            sender, data = await sub.receive()
            assert (sender, data) == (publisher.peer_id, b"load=0.25")
    with trio.move_on_after(0.3):  # nobody gets it twice, the publisher not at all
        for sub in subs:
            with pytest.raises(trio.WouldBlock):
                sub._receive.receive_nowait()


async def test_gossip_size_limit_is_enforced_on_both_ends(swarm: list[p2p.Host]) -> None:
    boot, a, b = swarm[:3]
    assert a.gossip and b.gossip and boot.gossip
    sub = b.gossip.subscribe(TOPIC)
    await _wait_for_meshes(swarm)
    limit = a.gossip.max_message_size
    with pytest.raises(p2p.LocalProtocolError, match="exceeds"):
        await a.gossip.publish(TOPIC, b"x" * (limit + 1))
    with pytest.raises(p2p.LocalProtocolError, match="not joined"):
        await a.gossip.publish("unknown-topic", b"x")
    # a peer without our checks (validator removed): every receiver drops the big message
    a.gossip.pubsub.remove_topic_validator(TOPIC)
    await a.gossip.pubsub.publish(TOPIC, b"y" * (limit + 1))
    await a.gossip.publish(TOPIC, b"small")
    with trio.fail_after(10):
        assert await sub.receive() == (a.peer_id, b"small")
    await _assert_nothing_more(sub)


async def _assert_nothing_more(sub: p2p.GossipSubscription) -> None:
    with trio.move_on_after(0.5):
        extra = await sub.receive()
        raise AssertionError(f"unexpected gossip {extra!r}")


async def test_unsigned_gossip_is_dropped(swarm: list[p2p.Host]) -> None:
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE, Transport as Noise
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    from libp2p.tools.anyio_service import background_trio_service

    boot, a = swarm[0], swarm[1]
    assert a.gossip is not None
    sub = a.gossip.subscribe(TOPIC)
    kp = create_new_key_pair()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    rogue = new_host(key_pair=kp, listen_addrs=listen, sec_opt={TProtocol(NOISE): Noise(kp, noise_privkey=x25519().private_key)},
                     connection_config=ConnectionConfig(max_connections_per_peer=1))
    router = GossipSub([PROTOCOL_ID_V11], 6, 4, 12, heartbeat_interval=1, spam_protection_enabled=False)
    pubsub = Pubsub(rogue, router, strict_signing=False)
    async with rogue.run(listen), background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        await pubsub.subscribe(TOPIC)
        target = multiaddr.Multiaddr(boot.addrs()[0])
        await rogue.connect(PeerInfo(ID.from_base58(target.value_for_protocol("p2p")), [target]))
        with trio.fail_after(10):
            await router.wait_for_mesh(boot.peer_id, TOPIC, timeout=10)
        await pubsub.publish(TOPIC, b"unsigned")
        await _wait_for_meshes(swarm)
        b = swarm[2]
        assert b.gossip is not None
        await b.gossip.publish(TOPIC, b"signed")
        with trio.fail_after(10):
            assert await sub.receive() == (b.peer_id, b"signed")
        await _assert_nothing_more(sub)
        await rogue.close()


async def test_connections_seed_the_routing_table_and_clients_stay_out(nursery) -> None:  # type: ignore[no-untyped-def]
    """py-libp2p never adds connected peers to the routing table; we do, for DHT servers only."""
    a = await nursery.start(p2p.serve_host, _config())
    b = await nursery.start(p2p.serve_host, _config())
    client = await nursery.start(p2p.serve_host, _config(dht_mode="client"))
    assert client.dht.mode == "client"
    hooks_done: set[object] = set()

    async def hook(peer: object) -> None:  # connection hooks run after the routing-table seeding
        hooks_done.add(peer)

    a.on_peer_connected(hook)
    await b.connect(a.addrs()[0])
    await client.connect(a.addrs()[0])
    # b seeds its own table once it has identified a, which may come after a's hooks have run
    # no DHT query ran: only the connection hooks can have done this
    await eventually(lambda: hooks_done == {b.peer_id, client.peer_id} and client.dht.routing_table_peers() == [a.peer_id]
                     and b.dht.routing_table_peers() == [a.peer_id], timeout=5, interval=0.02)
    assert a.dht.routing_table_peers() == [b.peer_id]  # the client-mode peer stays out


def test_dht_mode_follows_reachability() -> None:
    server, client = p2p.resolve_dht_mode("server", [], [], False), p2p.resolve_dht_mode("client", [], [], False)
    assert (server.name, client.name) == ("SERVER", "CLIENT")
    auto = lambda ours, boots, announced=False: p2p.resolve_dht_mode("auto", ours, boots, announced).name  # noqa: E731
    assert auto(["127.0.0.1"], ["127.0.0.1"]) == "SERVER"  # a local swarm
    assert auto(["192.168.1.5"], ["192.168.1.9"]) == "SERVER"  # a LAN swarm
    assert auto(["192.168.1.5"], []) == "SERVER"  # the first node
    assert auto(["192.168.1.5"], ["8.8.4.4"]) == "CLIENT"  # behind NAT, joining the internet
    assert auto(["192.168.1.5"], ["8.8.4.4"], True) == "SERVER"  # announced (port forwarded)
    assert auto(["1.2.3.4"], ["8.8.4.4"]) == "SERVER"  # a public address
