"""A real `run-node` under fuzz: raw libp2p streams on every protocol it speaks, semantic attacks
on its inference and push sessions, garbage on its lane port, while an honest client generates.

What must hold: every bad stream gets an error frame or is closed within a deadline; the node
process stays up, its memory stays bounded (VmRSS from /proc); an honest client generating
throughout gets exactly the local model's greedy tokens; the node still answers afterwards.
The decoders themselves get thousands of in-process examples in tests/test_adversarial_fuzz.py.
"""

from __future__ import annotations

import random
import struct

import pytest
import torch
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

import p2p
from _wait import eventually
from conftest import assert_decisive
from p2p._lane import LANE_MAGIC, LaneHello, LaneInvite
from p2p._reach import DIALBACK_PROTOCOL
from pipeline import AsyncDistributedModelForCausalLM, LocalModelForCausalLM
from pipeline._swarm import SYNC_PROTOCOL, SwarmSync
from pipeline.launch import LocalSwarm
from pipeline.protocol import (BAD_REQUEST, BUSY, INFERENCE_PROTOCOL, INFO_PROTOCOL, PUSH_PROTOCOL,
                               UNKNOWN_SESSION, CloseSession, InfoRequest, NodeInfo, OpenSession, PushOpen,
                               Replay, SessionOpened, Step, StepFailed, StepResult, new_session_id)
from test_p2p_fuzz import GARBAGE, _throw

pytestmark = pytest.mark.slow  # a run-node process

ANSWER_DEADLINE = 10.0  # every bad stream is answered or closed by then (the watchdog takes ~2.2 s)
RSS_GROWTH_LIMIT_KB = 96 * 1024
OURS = (INFERENCE_PROTOCOL, PUSH_PROTOCOL, INFO_PROTOCOL, SYNC_PROTOCOL, DIALBACK_PROTOCOL)


@pytest.fixture(scope="module")
def reference(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("The fuzzer knocked, and the node")])
    return prompt, assert_decisive(local, local.generate(prompt, max_new_tokens=12, eos_token_id=[]), 12)


@pytest.fixture
def node(tiny_model):
    with LocalSwarm(tiny_model, [(0, 8)], extra_args=["--max-sessions", "8"]) as swarm:
        yield swarm.nodes[0]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def honest_client(tiny_model, addr: str, reference, stop: trio.Event, runs: list[int]) -> None:
    """Generate again and again, and once more after `stop`; every run must give the
    reference tokens."""
    prompt, expected = reference
    async with AsyncDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=[addr]) as model:
        while True:
            final = stop.is_set()
            out = await model.generate(prompt, max_new_tokens=12, eos_token_id=[])
            assert torch.equal(out, expected), "the honest client got other tokens under fuzz"
            runs.append(len(runs))
            if final:
                return


def _clear(answer: list[p2p.Message], protocol: str, name: str) -> None:
    """A refused stream's answer: an error frame (then a goodbye), or nothing: closed (a stream
    that stays silent, waiting for the rest of a frame, is closed by the node's watchdog)."""
    answer = [m for m in answer if not isinstance(m, p2p.Heartbeat)]
    errors = [m for m in answer if isinstance(m, p2p.ErrorMessage)]
    if answer:
        assert errors, f"{protocol} {name}: no error frame in {answer!r}"
        assert errors[-1].code in (p2p.ErrorCode.PROTOCOL_ERROR, p2p.ErrorCode.BAD_REQUEST, BUSY), (protocol, name)


async def raw_garbage(fuzzer: p2p.Host, peer: ID, protocols: list[str]) -> int:
    """Every garbage case of test_p2p_fuzz plus random frames, on every protocol, concurrently
    per protocol; ours must answer with an error frame or close, py-libp2p's only survive."""
    rng = random.Random(21)
    cases = dict(GARBAGE)
    for i in range(24):
        body = rng.randbytes(rng.randint(0, 200))
        declared = rng.choice([len(body), len(body) + 1, rng.randint(0, 2**32 - 1)])
        cases[f"framed-random-{i}"] = (struct.pack("<I", declared) + body, rng.random() < 0.5)
    sent = 0
    for protocol in protocols:
        ours = protocol in OURS
        async with trio.open_nursery() as nursery:
            for name, (data, half_close) in cases.items():
                async def one(name=name, data=data, half_close=half_close) -> None:
                    if ours:  # answered or closed within the deadline, or _throw fails the test
                        _clear(await _throw(fuzzer, _Peer(peer), protocol, data, half_close, wait=ANSWER_DEADLINE),
                               protocol, name)
                        return
                    try:  # py-libp2p's handlers do not answer garbage, and may reset: do not wait
                        await _throw(fuzzer, _Peer(peer), protocol, data, half_close, wait=0.2)
                    except Exception:
                        pass
                nursery.start_soon(one)
                sent += 1
    return sent


class _Peer:
    """What `_throw` needs of a server: its peer id."""

    def __init__(self, peer_id: ID) -> None:
        self.peer_id = peer_id


def _hidden(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> p2p.Tensor:
    return p2p.Tensor.from_torch(torch.randn(shape).to(dtype))


async def inference_attacks(fuzzer: p2p.Host, peer: ID, model_hash: str, hidden_size: int) -> None:
    """Semantically wrong sessions: each refusal is the protocol's own code."""
    async def refused_open(msg: p2p.Message, code: str) -> None:
        async with fuzzer.open_session(peer, INFERENCE_PROTOCOL) as s:
            await s.send(msg)
            with trio.fail_after(ANSWER_DEADLINE), pytest.raises(p2p.RemoteError) as info:
                await s.receive()
            assert info.value.code == code, (msg, info.value)

    sid = new_session_id()
    await refused_open(Step(sid, 0, 0, _hidden((1, 1, hidden_size))), BAD_REQUEST)  # no OpenSession
    await refused_open(OpenSession(sid, model_hash, 5, 12, 16, 1, "float32"), BAD_REQUEST)  # not its blocks
    await refused_open(OpenSession(sid, "f" * 64, 0, 8, 16, 1, "float32"), BAD_REQUEST)  # another model
    await refused_open(OpenSession(sid, model_hash, 0, 8, 1 << 20, 64, "float32"), BUSY)  # 64M tokens
    async with fuzzer.open_session(peer, INFERENCE_PROTOCOL) as s:
        await s.send(OpenSession(sid, model_hash, 0, 8, 16, 1, "float32"))
        with trio.fail_after(ANSWER_DEADLINE):
            assert isinstance(await s.receive(), SessionOpened)
        bad = [
            (Step(new_session_id(), 1, 0, _hidden((1, 1, hidden_size))), UNKNOWN_SESSION),  # another's id
            (Step(sid, 1, 14, _hidden((1, 4, hidden_size))), BAD_REQUEST),  # beyond max_length
            (Step(sid, 1, 3, _hidden((1, 1, hidden_size))), BAD_REQUEST),  # a gap before its position
            (Step(sid, 1, 0, _hidden((1, 1, hidden_size + 1))), BAD_REQUEST),  # wrong width
            (Step(sid, 1, 0, _hidden((2, 1, hidden_size))), BAD_REQUEST),  # wrong batch
            (Step(sid, 1, 0, _hidden((1, 1, hidden_size), torch.bfloat16)), BAD_REQUEST),  # wrong dtype
            (Step(sid, 1, 0, _hidden((1, 0, hidden_size))), BAD_REQUEST),  # no tokens
            (Replay(sid, (1, 2), (1, 1), _hidden((1, 2, hidden_size + 1))), BAD_REQUEST),
            (OpenSession(sid, model_hash, 0, 8, 16, 1, "float32"), BAD_REQUEST),  # twice
        ]
        for msg, code in bad:
            await s.send(msg)
            with trio.fail_after(ANSWER_DEADLINE):
                reply = await s.receive()
            assert isinstance(reply, StepFailed) and reply.code == code, (msg, reply)
        # reordered steps: a later id first, then an earlier one (stale: dropped), then the next
        await s.send(Step(sid, 5, 0, _hidden((1, 2, hidden_size))))
        await s.send(Step(sid, 3, 0, _hidden((1, 2, hidden_size))))
        await s.send(Step(sid, 6, 2, _hidden((1, 1, hidden_size))))
        with trio.fail_after(ANSWER_DEADLINE):
            got = [await s.receive(), await s.receive()]
        assert [(type(m), m.step_id, m.position) for m in got] == [(StepResult, 5, 0), (StepResult, 6, 2)]
        await s.send(CloseSession(sid))
    async with fuzzer.open_session(peer, PUSH_PROTOCOL) as s:  # pushing into a session not open
        await s.send(PushOpen(new_session_id()))
        with trio.fail_after(ANSWER_DEADLINE), pytest.raises(p2p.RemoteError) as info:
            await s.receive()
        assert info.value.code == UNKNOWN_SESSION
    for protocol, msg in ((INFO_PROTOCOL, Step(sid, 0, 0, _hidden((1, 1, 4)))), (SYNC_PROTOCOL, SwarmSync(b"\xc1"))):
        with trio.fail_after(ANSWER_DEADLINE), pytest.raises(p2p.RemoteError) as info:
            await fuzzer.request(peer, protocol, msg)
        assert info.value.code == BAD_REQUEST


async def lane_attacks(fuzzer: p2p.Host, peer: ID) -> None:
    """The lane port: strangers, a wrong ticket, and a right ticket followed by a record that
    cannot be opened are all closed without a word."""
    stream = await fuzzer.libp2p.new_stream(peer, [TProtocol(INFERENCE_PROTOCOL)])
    decoder = p2p.FrameDecoder()
    try:
        with trio.fail_after(ANSWER_DEADLINE):
            await stream.write(p2p.encode_bytes(LaneHello()))
            invites: list[p2p.Message] = []
            while not invites:
                invites = [m for m in decoder.feed(await stream.read(65536)) if isinstance(m, LaneInvite)]
        invite = invites[0]
        for opening in (b"\x00" * 64, LANE_MAGIC + bytes(16), LANE_MAGIC + invite.ticket + b"\xff\xff\xff\xff" * 8):
            sock = await trio.open_tcp_stream("127.0.0.1", invite.port)
            with trio.fail_after(ANSWER_DEADLINE):
                await sock.send_all(opening)
                try:
                    while await sock.receive_some(4096):  # the ACK record, at most, then the end
                        pass
                except trio.BrokenResourceError:
                    pass  # reset: closed too
            await sock.aclose()
    finally:
        with trio.CancelScope(shield=True):
            await stream.reset()


async def fuzz_everything(fuzzer: p2p.Host, peer: ID, model_hash: str, tiny_model) -> int:
    protocols = sorted({str(p) for p in fuzzer.libp2p.get_peerstore().get_protocols(peer)})
    print("fuzzed protocols:", protocols)
    assert set(OURS) <= set(protocols) and any("meshsub" in p for p in protocols)
    sent = await raw_garbage(fuzzer, peer, protocols)
    hidden = LocalModelForCausalLM.from_pretrained(tiny_model).config.hidden_size
    await inference_attacks(fuzzer, peer, model_hash, hidden)
    await lane_attacks(fuzzer, peer)
    return sent


async def test_a_fuzzed_node_stays_up_bounded_and_serves_the_honest_client(tiny_model, node, reference):
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=["/ip4/127.0.0.1/tcp/0"], enable_dht=False)
    stop, runs = trio.Event(), []
    async with p2p.open_host(config) as fuzzer:
        peer = await fuzzer.connect(node.addr)
        info = await fuzzer.request(peer, INFO_PROTOCOL, InfoRequest())
        assert isinstance(info, NodeInfo)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(honest_client, tiny_model, node.addr, reference, stop, runs)
            await eventually(lambda: runs, timeout=60)  # warmed up: model, caches, the client's chain
            before = rss_kb(node.proc.pid)
            sent = await fuzz_everything(fuzzer, peer, info.model, tiny_model)
            stop.set()  # the honest client runs once more, after all of it
        after = rss_kb(node.proc.pid)
        print(f"{sent} raw streams, {len(runs)} honest generations, node RSS {before} -> {after} kB")
        assert node.proc.poll() is None, "the node died under fuzz"
        assert after - before < RSS_GROWTH_LIMIT_KB
        again = await fuzzer.request(peer, INFO_PROTOCOL, InfoRequest())
        assert isinstance(again, NodeInfo) and again.state == "online"
