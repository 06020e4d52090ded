"""Node pieces without a network: block choice, rebalancing, the KV budget, the config, the
batcher's equivalence with unbatched passes, the CLI's flag errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import trio

import crdt
import p2p
from node import (MIN_SERVER_THROUGHPUT, PREFILL_CHUNK, Batcher, CacheBudget, NodeConfig, choose_blocks,
                  coverage, should_rebalance, sub_span)
from pipeline import load_span

MODEL = crdt.ModelId("m", bytes(range(32)))
OTHER = crdt.ModelId("other", bytes(32))
NOW = 1_700_000_000_000


def record(seed: int, start: int, end: int, *, throughput: float = 10.0, state=crdt.ServerState.ONLINE,
           model: crdt.ModelId = MODEL, expires_ms: int = NOW + 60_000) -> crdt.ServerRecord:
    signer = crdt.Signer(bytes([seed]) * 32)
    return crdt.ServerRecord(peer_id=signer.peer_id, model=model, start=start, end=end, state=state,
                             hlc=crdt.Hlc(NOW - 1000), expires_ms=expires_ms, throughput=throughput)


# -- block choice ------------------------------------------------------------------------------
def test_choose_blocks_fills_the_uncovered_span() -> None:
    records = [record(1, 0, 2)]
    assert choose_blocks(records, MODEL.config_hash, 4, 2, NOW) == (2, 4)


def test_choose_blocks_empty_swarm_starts_at_zero_and_ties_go_low() -> None:
    assert choose_blocks([], MODEL.config_hash, 8, 3, NOW) == (0, 3)
    # blocks 0..1 and 4..5 are equally covered: the lowest start wins
    records = [record(1, 2, 4, throughput=5), record(2, 6, 8, throughput=5)]
    assert choose_blocks(records, MODEL.config_hash, 8, 2, NOW) == (0, 2)


def test_choose_blocks_prefers_the_weakest_throughput() -> None:
    records = [record(1, 0, 4, throughput=100), record(2, 4, 8, throughput=3)]
    assert choose_blocks(records, MODEL.config_hash, 8, 4, NOW) == (4, 8)
    # a window holding a gap beats one that is merely slow
    records = [record(1, 0, 6, throughput=100), record(2, 6, 7, throughput=100)]
    assert choose_blocks(records, MODEL.config_hash, 8, 2, NOW) == (6, 8)


def test_coverage_ignores_other_models_offline_draining_and_expired() -> None:
    records = [
        record(1, 0, 4, model=OTHER),
        record(2, 0, 4, state=crdt.ServerState.OFFLINE),
        record(3, 0, 4, state=crdt.ServerState.DRAINING),
        record(4, 0, 4, expires_ms=NOW),
        record(5, 1, 2, throughput=0.0, state=crdt.ServerState.JOINING),
    ]
    assert coverage(records, MODEL.config_hash, 4, NOW) == [0.0, MIN_SERVER_THROUGHPUT, 0.0, 0.0]
    assert coverage(records, MODEL.config_hash, 4, NOW, exclude=records[4].peer_id) == [0.0] * 4


def test_choose_blocks_is_deterministic_whatever_the_record_order() -> None:
    records = [record(i, i % 5, i % 5 + 3, throughput=float(i)) for i in range(1, 12)]
    first = choose_blocks(records, MODEL.config_hash, 10, 3, NOW)
    assert all(choose_blocks(list(reversed(records)), MODEL.config_hash, 10, 3, NOW) == first for _ in range(3))


def test_should_rebalance_moves_a_redundant_node_to_a_gap() -> None:
    me = record(1, 0, 2)
    records = [me, record(2, 0, 2), record(3, 2, 3)]  # block 3 uncovered, [0,2) served twice
    assert should_rebalance(records, me, 4, NOW) == (2, 4)


def test_should_rebalance_never_leaves_its_blocks_uncovered() -> None:
    me = record(1, 0, 2)
    records = [me, record(2, 2, 3)]  # block 3 uncovered, but we are the only server of [0,2)
    assert should_rebalance(records, me, 4, NOW) is None


def test_should_rebalance_stays_when_the_gain_is_small() -> None:
    me = record(1, 0, 2, throughput=10)
    records = [me, record(2, 0, 2, throughput=10), record(3, 2, 4, throughput=18)]
    # moving: [0,2) 10, [2,4) 28 -> bottleneck 10 < 18 now: no gain at all
    assert should_rebalance(records, me, 4, NOW) is None


# -- KV budget ---------------------------------------------------------------------------------
def test_cache_budget_fails_fast_and_frees() -> None:
    budget = CacheBudget(tokens=100, max_sessions=2)
    a = budget.reserve(60)
    with pytest.raises(p2p.RemoteError) as info:
        budget.reserve(41)
    assert info.value.code == "busy" and "41 tokens" in info.value.message
    b = budget.reserve(40)
    assert budget.free_tokens == 0
    budget.release(a)
    budget.release(a)  # idempotent
    assert budget.free_tokens == 60 and budget.sessions == 1
    c = budget.reserve(1)
    with pytest.raises(p2p.RemoteError, match="maximum of 2 sessions"):
        budget.reserve(1)
    budget.release(b)
    budget.release(c)
    assert (budget.free_tokens, budget.sessions) == (100, 0)


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(blocks=(0, 2), num_blocks=2, new_swarm=True), "exactly one"),
    (dict(blocks=(0, 2)), "--initial-peers"),
    (dict(blocks=(0, 2), new_swarm=True, initial_peers=["/ip4/1.2.3.4/tcp/1/p2p/x"]), "takes no"),
    (dict(blocks=(2, 2), new_swarm=True), "non-empty"),
    (dict(num_blocks=0, new_swarm=True), ">= 1"),
    (dict(blocks=(0, 2), new_swarm=True, device="tpu"), "--device"),
    (dict(blocks=(0, 2), new_swarm=True, heartbeat=0.0), "--heartbeat"),
    (dict(blocks=(0, 2), new_swarm=True, heartbeat=5.0, lease=5.0), "--lease"),
    (dict(blocks=(0, 2), new_swarm=True, heartbeat=200.0), "maximum of 600 s"),
    (dict(blocks=(0, 2), new_swarm=True, max_batch_size=0), "--max-batch-size"),
    (dict(blocks=(0, 2), new_swarm=True, inference_max_length=0), "--inference-max-length"),
])
def test_node_config_refuses_bad_values(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        NodeConfig(model="m", **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--model", "m", "--blocks", "3:1", "--new-swarm"], "--blocks"),
    (["--model", "m", "--blocks", "x", "--new-swarm"], "is not A:B"),
    (["--model", "m", "--num-blocks", "-2", "--new-swarm"], "--num-blocks"),
    (["--model", "m", "--blocks", "0:2"], "--new-swarm --initial-peers"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--max-sessions", "many"], "--max-sessions"),
    (["--model", "m", "--blocks", "0:2", "--initial-peers", "/ip4/127.0.0.1/tcp/5"], "/p2p/"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--listen", "nonsense"], "--listen"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--dtype", "int8"], "--dtype"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--heartbeat", "2", "--lease", "1"], "--lease"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--max-batch-size", "0"], "--max-batch-size"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--inference-max-length", "x"], "--inference-max-length"),
    (["--model", "m", "--blocks", "0:2", "--new-swarm", "--device", "tpu"], "--device"),
])
def test_cli_bad_flag_is_one_line_exit_2(args, message) -> None:
    proc = subprocess.run([sys.executable, "-m", "node._cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run-node: error:") and message in lines[0], proc.stderr


@pytest.mark.slow  # a run-node process that gets as far as loading (~3 s)
def test_cli_missing_model_is_one_line_exit_1(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "node._cli", "--model", str(tmp_path / "none"), "--blocks", "0:1",
                           "--new-swarm", "--log-level", "ERROR"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("run-node: error:"), proc.stderr


def test_cli_help_explains_every_flag() -> None:
    proc = subprocess.run([sys.executable, "-m", "node._cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--model", "--blocks", "--num-blocks", "--listen", "--announce-addr", "--new-swarm",
                 "--initial-peers", "--identity", "--device", "--dtype", "--public-name", "--max-sessions",
                 "--cache-tokens", "--num-threads", "--drain-timeout", "--session-idle-timeout",
                 "--max-batch-size", "--inference-max-length", "--version"):
        assert flag in proc.stdout


def test_cli_version_prints_the_version() -> None:
    from importlib import metadata

    proc = subprocess.run([sys.executable, "-m", "node._cli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == f"run-node (lamina) {metadata.version('lamina')}\n"


def test_cli_flags_reach_the_config() -> None:
    from node._cli import config_from_args, parser

    base = ["--model", "m", "--blocks", "0:2", "--new-swarm"]
    config = config_from_args(parser().parse_args(base))
    assert (config.device, config.max_batch_size, config.inference_max_length) == ("auto", None, None)
    config = config_from_args(parser().parse_args(
        [*base, "--device", "cpu", "--max-batch-size", "1", "--inference-max-length", "64"]))
    assert (config.device, config.max_batch_size, config.inference_max_length) == ("cpu", 1, 64)


def test_a_p2p_error_at_start_is_one_line_exit_1(monkeypatch, capsys) -> None:
    """A P2PError out of the node's start (the host, the swarm) is the user's problem to fix,
    not a bug: one line on stderr, exit 1, no traceback."""
    import node._cli as cli
    import node._node as node_module

    async def fails(config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        raise p2p.PeerBrokenError("cannot connect to 12D3KooWx: the connection was refused\n(a second line)")

    monkeypatch.setattr(node_module, "serve_node", fails)
    code = cli.main(["--model", "m", "--blocks", "0:2", "--new-swarm", "--log-level", "ERROR"])
    out = capsys.readouterr()
    assert code == 1 and out.out == ""
    assert out.err == "run-node: error: cannot connect to 12D3KooWx: the connection was refused (a second line)\n"


# -- device choice ----------------------------------------------------------------------------
@pytest.mark.parametrize("cuda, mps, chosen", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, chosen) -> None:
    from node._node import auto_device, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    assert auto_device() == chosen
    device, line = resolve_device("auto")
    assert device == chosen
    assert line == {"cuda": "device cuda (Test GPU) (--device auto)", "mps": "device mps (--device auto)",
                    "cpu": "device cpu (--device auto: no CUDA GPU or Apple MPS device found)"}[chosen]
    assert resolve_device("cpu") == ("cpu", "device cpu")  # an explicit device is taken as given


def test_device_auto_here_is_what_torch_sees() -> None:
    from node._node import auto_device

    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert auto_device() == expected


# -- joining ----------------------------------------------------------------------------------
def test_check_joined_names_every_unreachable_address_once() -> None:
    from node._node import JoinError, check_joined

    refused, silent = ("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWA", "/ip4/127.0.0.1/tcp/2/p2p/12D3KooWB")

    class Host:
        connected: set[str] = set()
        bootstrap_errors = {refused: p2p.PeerBrokenError("cannot connect to 12D3KooWA: the connection was refused")}

        def is_connected(self, peer: str) -> bool:
            return peer in self.connected

    host = Host()
    with pytest.raises(JoinError) as info:
        check_joined(host, [refused, silent, refused])   # the same address twice counts once
    message = str(info.value)
    assert "\n" not in message and message.count(refused) == 1 and message.count(silent) == 1
    assert f"{refused} (the connection was refused)" in message
    assert f"{silent} (no answer within {p2p.constants.BOOTSTRAP_DEADLINE:g} s)" in message
    host.connected = {"12D3KooWB"}
    check_joined(host, [refused, silent])   # one reachable peer is enough


# -- batcher -----------------------------------------------------------------------------------
async def test_batcher_passes_equal_unbatched_and_chunk_long_prompts(micro_model) -> None:
    span = load_span(micro_model, 0, 4)
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 3, PREFILL_CHUNK + 70, 1, 2]
    hiddens = [torch.randn(2 if i == 1 else 1, t, 64, generator=gen) for i, t in enumerate(lengths)]
    expected = []
    for h in hiddens:
        expected.append(span(h, 0, span.new_cache(h.shape[0], 256)))
    batcher = Batcher()
    results: dict[int, torch.Tensor] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.serve)

        async def one(i: int) -> None:
            h = hiddens[i]
            results[i] = await batcher.run(span, h, 0, span.new_cache(h.shape[0], 256))

        async with trio.open_nursery() as clients:
            for i in range(len(hiddens)):
                clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    for i, want in enumerate(expected):
        torch.testing.assert_close(results[i], want, rtol=1e-5, atol=1e-5)
    # all five were queued before the loop ran: pieces of several sessions share passes, and
    # the long prompt took ceil(198 / 128) = 2 pieces
    assert batcher.stats.batched_passes >= 1 and batcher.stats.max_segments >= 2
    assert batcher.stats.segments == len(hiddens) + 1


async def test_batcher_with_max_segments_1_runs_each_step_alone(micro_model) -> None:
    span = load_span(micro_model, 0, 4)
    gen = torch.Generator().manual_seed(2)
    hiddens = [torch.randn(1, t, 64, generator=gen) for t in (1, 3, 2, 1, 5)]
    expected = [span(h, 0, span.new_cache(1, 16)) for h in hiddens]
    batcher = Batcher(max_segments=1)
    results: dict[int, torch.Tensor] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.serve)

        async def one(i: int) -> None:
            results[i] = await batcher.run(span, hiddens[i], 0, span.new_cache(1, 16))

        async with trio.open_nursery() as clients:   # all queued before the loop runs
            for i in range(len(hiddens)):
                clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    for i, want in enumerate(expected):
        torch.testing.assert_close(results[i], want, rtol=1e-5, atol=1e-5)
    stats = batcher.stats
    assert (stats.passes, stats.max_segments, stats.batched_passes) == (len(hiddens), 1, 0), stats
    with pytest.raises(ValueError, match="max_segments"):
        Batcher(max_segments=0)


async def test_batcher_waits_for_no_step_of_a_session_that_ended(micro_model, mock_clock) -> None:
    # Virtual time moves only when every task waits on a timer: a batch window waited out for
    # a session's next step shows as time passing.
    mock_clock.autojump_threshold = 0
    span = load_span(micro_model, 0, 4)
    h = torch.randn(1, 1, 64)
    span(h, 0, span.new_cache(1, 1))  # torch's first-call set-up, outside the batcher
    batcher = Batcher()
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.serve)
        ended = span.new_cache(1, 8)
        for position in range(2):
            await batcher.run(span, h, position, ended)
        batcher.forget(ended)  # (the server does this when it closes a session)
        began = trio.current_time()
        cache = span.new_cache(1, 8)
        outs = [await batcher.run(span, h, position, cache) for position in range(3)]
        assert trio.current_time() == began  # the new session ran at once: no window waited
        nursery.cancel_scope.cancel()
    want = span(h, 0, span.new_cache(1, 8))
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)


# -- a session's way in and out ------------------------------------------------------------------
async def test_served_session_checks_and_converts_a_step_in_one_call_each_way(micro_model) -> None:
    from node._sessions import Reservation, ServedSession, StepError
    from pipeline.protocol import BAD_REQUEST, UNKNOWN_SESSION, Replay, Step, new_session_id

    span = load_span(micro_model, 0, 4)  # float32
    sid = new_session_id()
    sess = ServedSession(sid, None, span, span.new_cache(1, 8), "bfloat16", Reservation(8))  # type: ignore[arg-type]
    h = torch.randn(1, 3, 64).to(torch.bfloat16)
    x = sess.accept(Step(sid, 0, 0, p2p.Tensor.from_torch(h)))
    assert x.dtype is torch.float32 and torch.equal(x, h.float())
    whole = sess.accept(Replay(sid, (0, 1), (2, 1), p2p.Tensor.from_torch(h)))  # from position 0
    assert torch.equal(whole, x)
    out = sess.to_wire(x)
    assert out.dtype == "bfloat16" and torch.equal(out.to_torch(), h)

    def refused(msg) -> tuple[str, str]:
        with pytest.raises(StepError) as info:
            sess.accept(msg)
        return info.value.code, info.value.message

    def step(hidden: torch.Tensor, position: int = 0, session: str = sid) -> Step:
        return Step(session, 1, position, p2p.Tensor.from_torch(hidden))

    assert refused(step(h, session=new_session_id()))[0] == UNKNOWN_SESSION
    for msg, complaint in [
        (step(h.float()), "step hidden states are float32"),
        (step(torch.zeros(1, 1, 32, dtype=torch.bfloat16)), "hidden size is 32"),
        (step(torch.zeros(2, 1, 64, dtype=torch.bfloat16)), "has batch 2"),
        (step(h, position=1), "holds 0 positions"),  # nothing cached yet
        (step(torch.zeros(1, 9, 64, dtype=torch.bfloat16)), "past the session's max_length 8"),
        (Replay(sid, (0,), (1,), p2p.Tensor.from_torch(h[:, :1].float())), "replay hidden states are float32"),
    ]:
        code, message = refused(msg)
        assert code == BAD_REQUEST and complaint in message, (complaint, message)


def test_node_info_state_is_the_records_state_name() -> None:
    from pipeline.protocol import ONLINE

    assert ONLINE == crdt.ServerState.ONLINE.name.lower()


def test_sub_span_shares_the_weights(micro_model) -> None:
    span = load_span(micro_model, 0, 4)
    sub = sub_span(span, 1, 3)
    assert (sub.start, sub.end) == (1, 3)
    assert sub.layers[0] is span.layers[1] and sub.layers[1] is span.layers[2]
    ref = load_span(micro_model, 1, 3)
    h = torch.randn(1, 4, 64)
    torch.testing.assert_close(sub(h, 0, sub.new_cache(1, 8)), ref(h, 0, ref.new_cache(1, 8)), rtol=0, atol=0)


def test_config_limits_follow_the_swarm() -> None:
    from node import _config
    from node._announce import Announcer

    assert _config.MAX_LEASE * 1000 == crdt.DEFAULT_MAX_LEASE_MS
    assert _config.DEFAULT_LEASE_HEARTBEATS == Announcer.LEASE_HEARTBEATS
