"""Real nodes on loopback, in this process (trio): sessions, KV budget, batching, bad input,
push chains, replay. Every result is checked against the local engine (`load_span`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
import trio

import p2p
from _wait import eventually
from node import NodeConfig, serve_node
from pipeline import load_span, model_hash
from pipeline.protocol import (INFERENCE_PROTOCOL, INFO_PROTOCOL, CloseSession, InfoRequest, NodeInfo,
                               OpenSession, PushFailed, Replay, SessionOpened, SetNextHop, Step,
                               StepFailed, StepResult, new_session_id)

D = 64  # the micro model's hidden size
LOCAL = "/ip4/127.0.0.1/tcp/0"
DEADLINE = 30  # any single wait in these tests; a hang fails instead of stalling CI


# -- fixtures and a tiny client ------------------------------------------------------------------
@asynccontextmanager
async def running_node(model, tmp_path, **overrides) -> AsyncIterator:
    peers = overrides.pop("initial_peers", [])
    config = NodeConfig(model=str(model), blocks=overrides.pop("blocks", (0, 4)), new_swarm=not peers,
                        initial_peers=peers, listen=[LOCAL], cache_dir=tmp_path / "cache", **overrides)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            node = await nursery.start(serve_node, config)
        yield node
        node.request_drain()


@asynccontextmanager
async def client_host(*nodes) -> AsyncIterator[p2p.Host]:
    config = p2p.HostConfig(identity=p2p.Identity.generate(), listen_addrs=[LOCAL], enable_dht=False,
                            enable_gossip=False)
    async with p2p.open_host(config) as host:
        for node in nodes:
            await host.connect(node.addrs[0])
        yield host


class Remote:
    """One inference session on one node, driven by hand."""

    def __init__(self, stream: p2p.Session, session_id: str) -> None:
        self.stream = stream
        self.session_id = session_id
        self.step_id = 0

    async def send_step(self, hidden: torch.Tensor, position: int, *, step_id: int | None = None,
                        session_id: str | None = None, push: bool = True) -> int:
        if step_id is None:
            self.step_id += 1
            step_id = self.step_id
        await self.stream.send(Step(session_id or self.session_id, step_id, position,
                                    p2p.Tensor.from_torch(hidden.contiguous()), push=push))
        return step_id

    async def receive(self) -> p2p.Message:
        with trio.fail_after(DEADLINE):
            return await self.stream.receive()

    async def step(self, hidden: torch.Tensor, position: int, **kwargs) -> torch.Tensor:
        step_id = await self.send_step(hidden, position, **kwargs)
        reply = await self.receive()
        assert type(reply) is StepResult, reply
        assert reply.step_id == step_id and reply.position == position
        return reply.hidden.to_torch()

    async def fails(self, hidden: torch.Tensor, position: int, **kwargs) -> StepFailed:
        step_id = await self.send_step(hidden, position, **kwargs)
        reply = await self.receive()
        assert type(reply) is StepFailed, reply
        assert reply.step_id == step_id
        return reply


@asynccontextmanager
async def remote_session(host: p2p.Host, node, *, start: int = 0, end: int = 4, max_length: int = 64,
                         batch: int = 1, dtype: str = "float32", model: str | None = None,
                         next_peer: str | None = None, next_session: str | None = None,
                         session_id: str | None = None) -> AsyncIterator[Remote]:
    session_id = session_id or new_session_id()
    try:
        async with host.open_session(node.peer_id, INFERENCE_PROTOCOL) as stream:
            await stream.send(OpenSession(session_id, model or node.checkpoint.model_hash, start, end, max_length,
                                          batch, dtype, next_peer, next_session))
            with trio.fail_after(DEADLINE):
                opened = await stream.receive()
            assert opened == SessionOpened(session_id, start, end, max_length)
            remote = Remote(stream, session_id)
            yield remote
            await stream.send(CloseSession(session_id))
    except BaseExceptionGroup as group:  # the session's nursery wraps what the block raised
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from None


def hidden(seed: int, t: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, t, D, generator=torch.Generator().manual_seed(seed))


class Local:
    """The same session run by the local engine: the reference."""

    def __init__(self, model, start: int = 0, end: int = 4, batch: int = 1, max_length: int = 64) -> None:
        self.span = load_span(model, start, end)
        self.cache = self.span.new_cache(batch, max_length)

    def __call__(self, h: torch.Tensor, position: int) -> torch.Tensor:
        return self.span(h, position, self.cache)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- sessions ----------------------------------------------------------------------------------
async def test_session_equals_local_span_and_sub_span(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path) as node, client_host(node) as host:
        async with remote_session(host, node) as full, remote_session(host, node, start=1, end=3) as sub:
            for remote, local in ((full, Local(micro_model)), (sub, Local(micro_model, 1, 3))):
                close(await remote.step(hidden(0, 7), 0), local(hidden(0, 7), 0))
                for pos in range(7, 10):
                    close(await remote.step(hidden(pos, 1), pos), local(hidden(pos, 1), pos))
                # a rollback: recompute position 8 with another token, then continue
                close(await remote.step(hidden(99, 2), 8), local(hidden(99, 2), 8))
        info = await host.request(node.peer_id, INFO_PROTOCOL, InfoRequest())
        assert type(info) is NodeInfo
        assert (info.start, info.end, info.model, info.state) == (0, 4, model_hash(micro_model), "online")


async def test_open_refusals(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path, cache_tokens=1000) as node, client_host(node) as host:
        cases = [
            (dict(model="ab" * 32), "bad_request", "model mismatch"),
            (dict(start=2, end=6), "bad_request", "not inside this node's blocks 0:4"),
            (dict(batch=64, max_length=4096), "busy", "not enough KV cache"),
        ]
        for kwargs, code, message in cases:
            with pytest.raises(p2p.RemoteError) as info:
                async with remote_session(host, node, **kwargs):
                    pass
            assert info.value.code == code and message in info.value.message
        assert node.server.active_sessions == 0 and node.server.budget.free_tokens == 1000


async def test_inference_max_length_refuses_longer_sessions(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path, inference_max_length=32, cache_tokens=1000) as node, \
            client_host(node) as host:
        with pytest.raises(p2p.RemoteError) as info:
            async with remote_session(host, node, max_length=33):
                pass
        assert info.value.code == "bad_request"
        assert info.value.message == ("the session asks for max_length 33; this node takes sessions of at most "
                                      "32 tokens (--inference-max-length)")
        assert node.server.active_sessions == 0 and node.server.budget.free_tokens == 1000
        async with remote_session(host, node, max_length=32) as remote:   # at the limit: served
            close(await remote.step(hidden(0, 3), 0), Local(micro_model, max_length=32)(hidden(0, 3), 0))


async def test_budget_busy_then_freed_by_close_break_and_idle(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path, cache_tokens=100, session_idle_timeout=0.5) as node, \
            client_host(node) as host:
        budget = node.server.budget
        # closed
        async with remote_session(host, node, max_length=60) as first:
            await first.step(hidden(0, 3), 0)
            with pytest.raises(p2p.RemoteError) as info:
                async with remote_session(host, node, max_length=60):
                    pass
            assert info.value.code == "busy"
        await eventually(lambda: budget.free_tokens == 100)
        # broken: the client's stream is reset mid-session
        with pytest.raises(RuntimeError, match="client crashed"):
            async with remote_session(host, node, max_length=100) as second:
                await second.step(hidden(0, 3), 0)
                assert budget.free_tokens == 0
                raise RuntimeError("client crashed")
        await eventually(lambda: budget.free_tokens == 100 and budget.sessions == 0)
        # idle: no step for session_idle_timeout
        with pytest.raises(p2p.RemoteError) as info:
            async with remote_session(host, node, max_length=100) as third:
                await third.step(hidden(0, 3), 0)
                await third.receive()
        assert info.value.code == "idle_timeout"
        await eventually(lambda: budget.free_tokens == 100 and budget.sessions == 0)
    async with running_node(micro_model, tmp_path, max_sessions=1) as node, client_host(node) as host:
        async with remote_session(host, node):
            with pytest.raises(p2p.RemoteError, match="maximum of 1 sessions") as info:
                async with remote_session(host, node):
                    pass
            assert info.value.code == "busy"


async def test_bad_inputs_get_clear_errors_while_a_parallel_session_goes_on(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path) as node, client_host(node) as host:
        async with remote_session(host, node, max_length=16) as bad, remote_session(host, node) as good:
            local = Local(micro_model)
            done = trio.Event()

            async def decode_meanwhile() -> None:
                close(await good.step(hidden(0, 5), 0), local(hidden(0, 5), 0))
                pos = 5
                while not done.is_set() or pos < 10:
                    close(await good.step(hidden(pos, 1), pos), local(hidden(pos, 1), pos))
                    pos += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(decode_meanwhile)
                await bad.step(hidden(0, 4), 0)
                cases = [
                    (dict(hidden=torch.randn(1, 1, 32), position=4), "bad_request", "hidden size is 32"),
                    (dict(hidden=hidden(1, 3), position=15), "bad_request", "session holds 4 positions"),
                    (dict(hidden=hidden(1, 13), position=4), "bad_request", "past the session's max_length 16"),
                    (dict(hidden=hidden(1, 1, batch=64), position=4), "bad_request", "batch 64"),
                    (dict(hidden=hidden(1, 1).to(torch.bfloat16), position=4), "bad_request", "bfloat16"),
                    (dict(hidden=hidden(1, 1), position=4, session_id="f" * 32), "unknown_session", "f" * 32),
                ]
                for kwargs, code, message in cases:
                    failed = await bad.fails(kwargs.pop("hidden"), kwargs.pop("position"), **kwargs)
                    assert failed.code == code and message in failed.message, failed
                # the bad session is still fine after all that
                reference = Local(micro_model, max_length=16)
                reference(hidden(0, 4), 0)
                close(await bad.step(hidden(4, 1), 4), reference(hidden(4, 1), 4))
                # an unexpected message type on an open session is a StepFailed too
                await bad.stream.send(InfoRequest())
                reply = await bad.receive()
                assert type(reply) is StepFailed and reply.code == "bad_request"
                done.set()


async def test_stale_step_ids_are_dropped_and_resends_rerun(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path) as node, client_host(node) as host:
        async with remote_session(host, node) as remote:
            local = Local(micro_model)
            close(await remote.step(hidden(0, 3), 0, step_id=5), local(hidden(0, 3), 0))
            await remote.send_step(hidden(7, 1), 3, step_id=4)  # stale: no answer at all
            close(await remote.step(hidden(0, 3), 0, step_id=5), local(hidden(0, 3), 0))  # resend
            close(await remote.step(hidden(3, 1), 3, step_id=6), local(hidden(3, 1), 3))


# -- batching ----------------------------------------------------------------------------------
async def test_eight_concurrent_sessions_are_batched_and_equal_alone(micro_model, tmp_path) -> None:
    n, steps = 8, 6
    prompts = [hidden(100 + i, 2 + i) for i in range(n)]
    tokens = [[hidden(1000 * i + s, 1) for s in range(steps)] for i in range(n)]
    alone = []
    for i in range(n):
        local = Local(micro_model)
        outs = [local(prompts[i], 0)]
        for s in range(steps):
            outs.append(local(tokens[i][s], prompts[i].shape[1] + s))
        alone.append(outs)
    async with running_node(micro_model, tmp_path) as node, client_host(node) as host:
        got: list[list[torch.Tensor]] = [[] for _ in range(n)]

        async def run(i: int) -> None:
            async with remote_session(host, node) as remote:
                got[i].append(await remote.step(prompts[i], 0))
                for s in range(steps):
                    got[i].append(await remote.step(tokens[i][s], prompts[i].shape[1] + s))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(run, i)
        stats = node.batcher.stats
    for i in range(n):
        for a, b in zip(got[i], alone[i], strict=True):
            close(a, b)
    assert stats.batched_passes > 0 and stats.max_segments > 1, stats
    assert stats.passes < n * (steps + 1), stats  # fewer passes than steps: they were shared


async def test_max_batch_size_1_runs_every_step_alone(micro_model, tmp_path) -> None:
    """`--max-batch-size 1`: concurrent sessions are served, each step in a pass of its own."""
    n, steps = 4, 4
    async with running_node(micro_model, tmp_path, max_batch_size=1) as node, client_host(node) as host:
        assert node.batcher.max_segments == 1
        got: list[list[torch.Tensor]] = [[] for _ in range(n)]
        ready = trio.Event()

        async def run(i: int) -> None:
            async with remote_session(host, node) as remote:
                await ready.wait()   # every session open: their steps arrive together
                got[i].append(await remote.step(hidden(100 + i, 3), 0))
                for s in range(steps):
                    got[i].append(await remote.step(hidden(1000 * i + s, 1), 3 + s))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(run, i)
            await eventually(lambda: node.server.active_sessions == n)
            ready.set()
        stats = node.batcher.stats
    for i in range(n):
        local = Local(micro_model)
        want = [local(hidden(100 + i, 3), 0)] + [local(hidden(1000 * i + s, 1), 3 + s) for s in range(steps)]
        for a, b in zip(got[i], want, strict=True):
            close(a, b)
    assert stats.max_segments == 1 and stats.batched_passes == 0, stats
    assert stats.passes == n * (steps + 1), stats


async def test_long_prompt_is_chunked_and_decodes_interleave(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path) as node, client_host(node) as host:
        async with remote_session(host, node, max_length=600) as long, remote_session(host, node) as short:
            long_local, short_local = Local(micro_model, max_length=600), Local(micro_model)
            close(await short.step(hidden(0, 2), 0), short_local(hidden(0, 2), 0))
            before = node.batcher.stats.passes
            prompt = hidden(5, 520)
            await long.send_step(prompt, 0)
            pos, decoded = 2, []
            # decode steps keep running while the prompt is prefilled chunk by chunk
            while True:
                close(await short.step(hidden(pos, 1), pos), short_local(hidden(pos, 1), pos))
                decoded.append(node.batcher.stats.passes)
                pos += 1
                if pos > 6:
                    break
            reply = await long.receive()
            assert type(reply) is StepResult
            close(reply.hidden.to_torch(), long_local(prompt, 0))
            assert node.batcher.stats.passes - before >= 520 // 128 + 1


# -- push chains and replay --------------------------------------------------------------------
async def test_two_node_chain_pushes_and_replays(micro_model, tmp_path) -> None:
    async with running_node(micro_model, tmp_path, blocks=(0, 2)) as a, \
            running_node(micro_model, tmp_path, blocks=(2, 4), initial_peers=a.addrs) as b, \
            client_host(a, b) as host:
        full, first = Local(micro_model), Local(micro_model, 0, 2)
        inputs = [(hidden(0, 5), 0), (hidden(5, 1), 5), (hidden(6, 1), 6)]
        finals, echoes = [], []
        async with remote_session(host, b, start=2, end=4) as down:
            async with remote_session(host, a, start=0, end=2, next_peer=b.peer_id,
                                      next_session=down.session_id) as up:
                for h, pos in inputs:
                    echo = await up.step(h, pos)  # A's copy on the client's stream
                    close(echo, first(h, pos))
                    result = await down.receive()  # B's result of the pushed step
                    assert type(result) is StepResult and result.step_id == up.step_id
                    close(result.hidden.to_torch(), full(h, pos))
                    echoes.append(echo)
                    finals.append(result.hidden.to_torch())
        # failover drill: fresh sessions replay the original steps (same chunk shapes)
        async with remote_session(host, b, start=2, end=4) as down2:
            async with remote_session(host, a, start=0, end=2) as up2:
                await up2.stream.send(SetNextHop(up2.session_id, b.peer_id, down2.session_id))
                replay = torch.cat([h for h, _ in inputs], dim=1)
                await up2.stream.send(Replay(up2.session_id, (1, 2, 3), (5, 1, 1), p2p.Tensor.from_torch(replay),
                                             push=True))
                for k in range(3):
                    echo, result = await up2.receive(), await down2.receive()
                    assert type(echo) is StepResult and echo.step_id == k + 1
                    assert type(result) is StepResult and result.step_id == k + 1
                    assert torch.equal(echo.hidden.to_torch(), echoes[k])
                    assert torch.equal(result.hidden.to_torch(), finals[k])
                # and the chain goes on from the rebuilt caches (step ids go on after the replayed ones)
                up2.step_id = 3
                h = hidden(7, 1)
                close(await up2.step(h, 7), first(h, 7))
                result = await down2.receive()
                close(result.hidden.to_torch(), full(h, 7))


async def test_push_failure_reports_and_keeps_the_session(micro_model, tmp_path) -> None:
    nowhere = p2p.Identity.generate().peer_id_str
    async with running_node(micro_model, tmp_path, blocks=(0, 2)) as a, \
            running_node(micro_model, tmp_path, blocks=(2, 4), initial_peers=a.addrs) as b, \
            client_host(a, b) as host:
        local = Local(micro_model, 0, 2)
        async with remote_session(host, a, start=0, end=2, next_peer=nowhere, next_session="0" * 32) as up:
            await up.send_step(hidden(0, 3), 0)
            got = [await up.receive(), await up.receive()]
            kinds = sorted(type(m).__name__ for m in got)
            assert kinds == ["PushFailed", "StepResult"], got
            failed = next(m for m in got if type(m) is PushFailed)
            assert failed.step_id == 1 and failed.target == "0" * 32 and nowhere in failed.message
            close(next(m for m in got if type(m) is StepResult).hidden.to_torch(), local(hidden(0, 3), 0))
            # a push into a session B does not have: B refuses, A reports, the session lives on
            await up.stream.send(SetNextHop(up.session_id, b.peer_id, "1" * 32))
            await up.send_step(hidden(3, 1), 3)
            got = [await up.receive(), await up.receive()]
            assert sorted(type(m).__name__ for m in got) == ["PushFailed", "StepResult"], got
            assert next(m for m in got if type(m) is PushFailed).target == "1" * 32
            close(next(m for m in got if type(m) is StepResult).hidden.to_torch(), local(hidden(3, 1), 3))
            # the failed target stays failed until the next SetNextHop: reported at once, no new dial
            await up.send_step(hidden(4, 1), 4)
            got = [await up.receive(), await up.receive()]
            assert sorted(type(m).__name__ for m in got) == ["PushFailed", "StepResult"], got
            assert all(m.step_id == up.step_id for m in got)
            close(next(m for m in got if type(m) is StepResult).hidden.to_torch(), local(hidden(4, 1), 4))
            close(await up.step(hidden(5, 1), 5, push=False), local(hidden(5, 1), 5))


# -- announcing --------------------------------------------------------------------------------
async def test_records_announce_span_load_rtts_and_drain(micro_model, tmp_path) -> None:
    import crdt

    async with running_node(micro_model, tmp_path, blocks=(2, 4), heartbeat=0.3) as b:
        async with running_node(micro_model, tmp_path, blocks=(0, 2), heartbeat=0.3, initial_peers=b.addrs) as a, \
                client_host(a) as host:
            a_id, b_id = crdt.peer_id_from_str(a.peer_id), crdt.peer_id_from_str(b.peer_id)

            def record_of(peer: bytes):
                signed = b.view.state.get(peer)
                return signed.record if signed is not None else None

            async def until(predicate) -> None:
                with trio.fail_after(DEADLINE):
                    await b.view.wait_until(lambda state: predicate(record_of(a_id)))

            # A's record as B sees it: span, model, throughput, its RTT to B (the next blocks)
            await until(lambda r: r is not None and r.state is crdt.ServerState.ONLINE and r.rtt_to(b_id) is not None)
            r = record_of(a_id)
            assert (r.start, r.end, r.model.config_hash.hex()) == (0, 2, model_hash(micro_model))
            assert r.throughput > 0 and r.inference_rps == pytest.approx(2 * r.throughput)
            assert r.load.active_sessions == 0 and r.load.free_cache_tokens == a.server.budget.total_tokens
            assert any(addr.endswith(a.peer_id) for addr in r.addrs)
            async with remote_session(host, a, start=0, end=2, max_length=10) as remote:
                await until(lambda r: r.load.active_sessions == 1)
                assert record_of(a_id).load.free_cache_tokens == a.server.budget.total_tokens - 10
                a.request_drain()
                await until(lambda r: r.state is crdt.ServerState.DRAINING)
                await remote.step(hidden(0, 2), 0)  # still served while draining
            await until(lambda r: r.state is crdt.ServerState.OFFLINE)


async def test_rebalance_moves_a_redundant_node_to_the_gap(micro_model, tmp_path) -> None:
    import crdt

    config = NodeConfig(model=str(micro_model), num_blocks=2, new_swarm=True, listen=[LOCAL],
                        cache_dir=tmp_path / "cache", heartbeat=0.3, rebalance_interval=0.3)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            b = await nursery.start(serve_node, config)
        assert b.blocks == (0, 2)  # alone: the lowest window
        async with running_node(micro_model, tmp_path, blocks=(0, 2), heartbeat=0.3, initial_peers=b.addrs) as a, \
                client_host(b) as host:
            b_id = crdt.peer_id_from_str(b.peer_id)
            with trio.fail_after(DEADLINE):
                state = await a.view.wait_until(lambda s: (r := s.get(b_id)) is not None
                                                and (r.record.start, r.record.state) == (2, crdt.ServerState.ONLINE))
            assert b.blocks == (2, 4) and b.server.span.start == 2
            async with remote_session(host, b, start=2, end=4) as remote:  # and it serves them
                close(await remote.step(hidden(0, 3), 0), Local(micro_model, 2, 4)(hidden(0, 3), 0))
            assert state.get(crdt.peer_id_from_str(a.peer_id)).record.start == 0
        b.request_drain()
