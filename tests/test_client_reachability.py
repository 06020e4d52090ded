"""The client where not everything is reachable: `run-node` processes in their own network
namespaces (see `netlab`), the client in the test's namespace.

* Two nodes that cannot reach each other (a NAT or firewall between them drops their packets)
  while the client reaches both: the first node's push fails, the client relays between them,
  and the tokens are exactly the local ones. The client remembers the pair: its next session
  relays from the first step, with no failed push to wait for. When the relayed node dies, its
  replacement (which the first node reaches) gets direct pushes again, with the same tokens.
* A node whose lane port is not reachable (a NAT forwards only its libp2p port): sessions stay
  on libp2p with the same tokens, and only the first one waits for the lane to time out.
"""

from __future__ import annotations

import logging
import signal
import time

import pytest
import torch
import trio

import netlab
from conftest import assert_decisive
from crdt import peer_id_to_str
from node._server import PUSH_OPEN_GRACE
from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM
from pipeline.launch import LocalSwarm, start_node

pytestmark = [pytest.mark.slow,  # network namespaces and run-node processes
              pytest.mark.skipif(netlab.available() is not None,
                                 reason=f"no network-namespace lab here: {netlab.available()}")]


@pytest.fixture(scope="module")
def local(tiny_model):
    return LocalModelForCausalLM.from_pretrained(tiny_model)


def _args(host: netlab.LabHost, blocks: str, join: list[str] | None) -> list[str]:
    return ["--blocks", blocks, "--listen", f"/ip4/{host.ip}/tcp/0", "--num-threads", "1",
            *(["--initial-peers", *join] if join else ["--new-swarm"])]


def test_nodes_that_cannot_reach_each_other_are_relayed_by_the_client(tiny_model, local, tmp_path, caplog):
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    expected = assert_decisive(local, local.generate(prompt, max_new_tokens=16, eos_token_id=[]), 16)
    with netlab.NetLab() as lab:
        hub_host, a_host, b_host = lab.add_host(), lab.add_host(), lab.add_host()
        lab.cut(a_host, b_host)
        swarm = LocalSwarm(tiny_model, [], log_dir=tmp_path)   # holds the nodes, for its stop()
        nodes = swarm.nodes
        try:
            # the hub (all blocks, but kept off the route) joins a and b into one swarm
            nodes.append(start_node(tiny_model, _args(hub_host, "0:8", None), tmp_path / "hub.log",
                                    prefix=hub_host.wrap([])))
            hub = nodes[0]
            for name, host, blocks in (("a", a_host, "0:4"), ("b", b_host, "4:8")):
                nodes.append(start_node(tiny_model, _args(host, blocks, [hub.addr]), tmp_path / f"{name}.log",
                                        prefix=host.wrap([])))
            a, b = nodes[1], nodes[2]
            caplog.set_level(logging.WARNING, logger="lamina.client")
            with DistributedModelForCausalLM.from_pretrained(
                    tiny_model, initial_peers=[hub.addr], blocked_servers=[hub.peer_id]) as model:
                with model.inference_session(max_length=64) as session:
                    started = time.monotonic()
                    out = model.generate(prompt, max_new_tokens=16, eos_token_id=[], session=session)
                    took = time.monotonic() - started
                    assert [hop.peer_id for hop in session.route] == [a.peer_id, b.peer_id]
                    assert session.chain.links[0].relay and session.chain.failovers == 0
                    # a second call goes on relayed, without another failed push
                    more = model.generate(None, max_new_tokens=4, eos_token_id=[], session=session)
                # a new session relays from its first step: the client remembers the pair
                with model.inference_session(max_length=64) as session:
                    again = model.generate(prompt, max_new_tokens=16, eos_token_id=[], session=session)
                    assert session.chain.links[0].relay
        finally:
            swarm.stop()
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert torch.equal(torch.cat([out, more], dim=1),
                       assert_decisive(local, local.generate(prompt, max_new_tokens=20, eos_token_id=[]), 20))
    relayed = [r for r in caplog.records if "the client relays between them" in r.getMessage()]
    assert len(relayed) == 1, [r.getMessage() for r in caplog.records]
    # the first step waits PUSH_OPEN_GRACE for the push stream (not the 10 s dial deadline),
    # and no later step waits at all
    assert took < PUSH_OPEN_GRACE + 6, took


async def _sees(view, model_hash: str, peer_id: str) -> None:
    with trio.fail_after(60):
        while not any(peer_id_to_str(r.peer_id) == peer_id for r in view.servers(model_hash)):
            await view.wait_changed()


def test_a_relayed_node_that_dies_is_replaced_and_pushed_to_directly(tiny_model, local, tmp_path):
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    expected = assert_decisive(local, local.generate(prompt, max_new_tokens=24, eos_token_id=[]), 24)
    with netlab.NetLab() as lab:
        hub_host, a_host, b_host, c_host = (lab.add_host() for _ in range(4))
        lab.cut(a_host, b_host)
        swarm = LocalSwarm(tiny_model, [], log_dir=tmp_path)   # holds the nodes, for its stop()
        try:
            hub = start_node(tiny_model, _args(hub_host, "0:8", None), tmp_path / "hub.log", prefix=hub_host.wrap([]))
            swarm.nodes.append(hub)
            a = start_node(tiny_model, _args(a_host, "0:4", [hub.addr]), tmp_path / "a.log", prefix=a_host.wrap([]))
            b = start_node(tiny_model, _args(b_host, "4:8", [hub.addr]), tmp_path / "b.log", prefix=b_host.wrap([]))
            swarm.nodes += [a, b]
            with DistributedModelForCausalLM.from_pretrained(
                    tiny_model, initial_peers=[hub.addr], blocked_servers=[hub.peer_id]) as model:
                with model.inference_session(max_length=64) as session:
                    first = model.generate(prompt, max_new_tokens=8, eos_token_id=[], session=session)
                    assert [hop.peer_id for hop in session.route] == [a.peer_id, b.peer_id]
                    assert session.chain.links[0].relay
                    # a replica of b's span that a can reach comes online; then b dies
                    c = start_node(tiny_model, _args(c_host, "4:8", [hub.addr]), tmp_path / "c.log",
                                   prefix=c_host.wrap([]))
                    swarm.nodes.append(c)
                    model._runner.run(lambda: _sees(model._model.view, model._model.model_hash, c.peer_id))
                    b.signal(signal.SIGKILL)
                    more = model.generate(None, max_new_tokens=16, eos_token_id=[], session=session)
                    assert [hop.peer_id for hop in session.route] == [a.peer_id, c.peer_id]
                    assert session.chain.failovers == 1 and not session.chain.links[0].relay
        finally:
            swarm.stop()
    assert torch.equal(torch.cat([first, more], dim=1), expected)


def test_an_unreachable_lane_port_falls_back_to_libp2p_once(tiny_model, local, tmp_path, caplog):
    """b's lane port drops packets: the client's session with b and a's push to b stay on
    libp2p (a does not give up on b: the lane's time-out is shorter than the push grace)."""
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time")])
    expected = assert_decisive(local, local.generate(prompt, max_new_tokens=8, eos_token_id=[]), 8)
    lane_port = 7101
    with netlab.NetLab() as lab:
        a_host, b_host = lab.add_host(), lab.add_host()
        lab.drop_inbound(b_host, lane_port)
        swarm = LocalSwarm(tiny_model, [], log_dir=tmp_path)   # holds the nodes, for its stop()
        try:
            swarm.nodes.append(start_node(tiny_model, _args(a_host, "0:4", None), tmp_path / "a.log",
                                          prefix=a_host.wrap([])))
            swarm.nodes.append(start_node(
                tiny_model, [*_args(b_host, "4:8", [swarm.nodes[0].addr]), "--lane-port", str(lane_port)],
                tmp_path / "b.log", prefix=b_host.wrap([])))
            caplog.set_level(logging.INFO, logger="lamina.p2p")
            with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=[swarm.nodes[0].addr]) as model:
                outs, transports, relays = [], [], []
                for _ in range(2):
                    with model.inference_session(max_length=64) as session:
                        outs.append(model.generate(prompt, max_new_tokens=8, eos_token_id=[], session=session))
                        transports.append([link.session.transport for link in session.chain.links])
                        relays.append(session.chain.links[0].relay)
        finally:
            swarm.stop()
    assert transports == [["lane", "libp2p"], ["lane", "libp2p"]]
    assert relays == [False, False]
    assert all(torch.equal(out, expected) for out in outs)
    unreachable = [r for r in caplog.records if "cannot reach the lane" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
