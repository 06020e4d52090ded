"""Wire compression (issue 22): float16/bfloat16 hidden states from float32 nodes, and the int8
blockwise packing of long steps (`pipeline/_wire_format.py`, `OpenSession.dtype` "<dtype>+int8:N").

Units: the packing's error bound, exactness, per-token independence and refusals; the option and
the protocol names; a node session's way in and out. In-process nodes: malformed packed steps get
StepFailed/BAD_REQUEST and the session goes on; an unknown packing is refused at open. `run-node`
swarms: each format against the local model (a stated logit bound, the same greedy tokens where
the reference leads by more than twice it), and failover under compression giving the tokens
of the run without failure.
"""

from __future__ import annotations

import signal

import pytest
import torch

import p2p
from conftest import assert_decisive
from pipeline import DistributedModelForCausalLM, LocalModelForCausalLM, load_span
from pipeline._chain import ChainConfig
from pipeline._errors import InvalidOptionError
from pipeline._wire_format import (WireCodec, WireFormat, check_int8, decode_int8, encode_int8, packed_width,
                                   unpacked_width)
from pipeline.protocol import INT8_BLOCK, INT8_OUTLIERS, OpenSession, Replay, Step, StepFailed, StepResult, \
    new_session_id, parse_wire_format
from test_node_serving import Local, client_host, close, remote_session, running_node


def _parts(packed: torch.Tensor, d: int):
    """(q int8 [.., d], scales, outlier indices, outlier values) of a packed tensor."""
    a = d + 2 * -(-d // INT8_BLOCK)
    k = INT8_OUTLIERS
    return (packed[..., :d], packed[..., d:a].contiguous().view(torch.float16),
            packed[..., a:a + 2 * k].contiguous().view(torch.int16).long(),
            packed[..., a + 2 * k:].contiguous().view(torch.float16))


def _bound(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Each value's error bound: half its block's scale (outliers: float16 rounding)."""
    b, t, d = x.shape
    _, scales, idx, _ = _parts(packed, d)
    per_value = scales.double().repeat_interleave(INT8_BLOCK, dim=-1)[..., :d] / 2
    outlier = x.double().gather(-1, idx).abs() * 2.0 ** -11 + 2.0 ** -25
    return per_value.scatter(-1, idx, outlier)


# -- the packing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [4, 64, 65, 200, 576])
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 3e3])
def test_packing_round_trip_within_half_a_scale(d, magnitude):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 7, d, generator=g) * magnitude
    x[0, 0, d // 2] = min(400 * magnitude, 6e4)            # a massive activation (float16 holds it)
    packed = encode_int8(x)
    assert packed is not None and packed.dtype == torch.int8 and packed.shape == (2, 7, packed_width(d))
    assert unpacked_width(packed.shape[-1]) == d and check_int8(packed, d) is None
    q, scales, idx, values = _parts(packed, d)
    # the outliers are the 4 largest magnitudes, in increasing index order, carried as float16
    want = x.abs().topk(INT8_OUTLIERS, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(idx, want) and torch.equal(values, x.gather(-1, want).half())
    # the block scale is absmax / 127 of the block without them, never below it
    rest = x.scatter(-1, idx, 0.0)
    nb = -(-d // INT8_BLOCK)
    absmax = torch.nn.functional.pad(rest.abs(), (0, nb * INT8_BLOCK - d)).view(2, 7, nb, INT8_BLOCK).amax(-1)
    assert bool((scales.double() * 127 >= absmax.double()).all())
    assert bool((scales.double() <= absmax.double() / 127 * (1 + 2.0 ** -9) + 2.0 ** -24).all())
    assert int(q.abs().max()) <= 127
    y = decode_int8(packed, d)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert bool(((y.double() - x.double()).abs() <= _bound(x, packed) * (1 + 1e-6)).all())


def test_packing_is_exact_in_float32_and_per_token():
    x = torch.randn(1, 40, 200, generator=torch.Generator().manual_seed(3)) * 5
    packed = encode_int8(x)
    y = decode_int8(packed, 200)
    q, scales, idx, values = _parts(packed, 200)
    # q * s is computed exactly in float32: the same value in float64
    exact = (q.double().view(1, 40, -1)[..., :200]
             * scales.double().repeat_interleave(INT8_BLOCK, -1)[..., :200]).scatter(-1, idx, values.double())
    assert torch.equal(y.double(), exact)
    # any chunking along the sequence packs to the same rows (replay chunks, long prompts)
    for a, b in [(0, 1), (3, 17), (17, 40)]:
        assert torch.equal(encode_int8(x[:, a:b]), packed[:, a:b])
    # and the same values pack to the same bytes every time
    assert torch.equal(encode_int8(x.clone()), packed)


def test_ties_go_to_the_lower_index():
    x = torch.zeros(1, 3, 64)
    x[0, 1, 9] = 2.0
    x[0, 2] = 1.0
    x[0, 2, 60] = -1.0
    _, _, idx, _ = _parts(encode_int8(x), 64)
    assert idx.tolist() == [[[0, 1, 2, 3], [0, 1, 2, 9], [0, 1, 2, 3]]]
    assert torch.equal(decode_int8(encode_int8(x), 64)[0, 0], torch.zeros(64))


@pytest.mark.parametrize("where, value", [(3, float("nan")), (3, float("inf")), (3, 7e4), (3, -7e4)])
def test_values_that_do_not_pack_travel_plain(where, value):
    x = torch.randn(1, 3, 64)
    x[0, 1, where] = value
    assert encode_int8(x) is None
    many = torch.randn(1, 3, 64)
    many[0, 1, :INT8_OUTLIERS + 1] = float("inf")   # more non-finite values than outliers
    assert encode_int8(many) is None
    assert encode_int8(torch.randn(1, 2, 3)) is None   # fewer values than outliers
    codec = WireCodec(WireFormat.parse("bfloat16+int8:1"), torch.float32, 64)
    sent = codec.encode(x)
    assert sent.dtype == torch.bfloat16 and codec.refusal(sent) is None
    assert codec.encode(torch.randn(1, 3, 64)).dtype == torch.int8


def test_malformed_packings_are_refused():
    d = 130
    good = encode_int8(torch.randn(1, 2, d))
    a = d + 2 * -(-d // INT8_BLOCK)
    k = INT8_OUTLIERS

    def patched(start: int, values: torch.Tensor) -> torch.Tensor:
        bad = good.clone()
        raw = values.view(torch.int8).reshape(-1)
        bad[0, 1, start:start + raw.numel()] = raw
        return bad

    cases = [
        (good.to(torch.int16), "must be int8"),
        (good[0], "must be int8"),
        (good[..., :-1], "hidden size 130 packs to"),
        (torch.cat([good, good[..., :2]], -1), "hidden size 130 packs to"),
        (patched(d, torch.tensor([float("nan")], dtype=torch.float16)), "scales must be finite"),
        (patched(d + 2, torch.tensor([float("inf")], dtype=torch.float16)), "scales must be finite"),
        (patched(d, torch.tensor([-1.0], dtype=torch.float16)), "non-negative"),
        (patched(a, torch.tensor([d], dtype=torch.int16)), "indices must increase"),
        (patched(a, torch.tensor([-1], dtype=torch.int16)), "indices must increase"),
        (patched(a, torch.tensor([5, 5, 6, 7], dtype=torch.int16)), "indices must increase"),
        (patched(a + 2 * k, torch.tensor([float("inf")], dtype=torch.float16)), "outlier values must be finite"),
    ]
    for bad, complaint in cases:
        assert complaint in (check_int8(bad, d) or ""), (complaint, check_int8(bad, d))
        with pytest.raises(ValueError, match=complaint):
            decode_int8(bad, d)
    assert "no hidden size packs" in check_int8(torch.zeros(1, 1, 2, dtype=torch.int8))
    assert check_int8(good) is None and check_int8(good, d) is None


# -- names and options ---------------------------------------------------------------------------
def test_wire_format_names():
    parse = WireFormat.parse
    assert parse(None) == parse("model") == WireFormat()
    assert parse("float16") == WireFormat("float16", None)
    assert parse("int8") == WireFormat(None, 64) and parse("INT8:2") == WireFormat(None, 2)
    assert parse("bfloat16+int8:16") == WireFormat("bfloat16", 16)
    assert parse("int8").session_name(torch.float32) == "float32+int8:64"
    assert parse(None).session_name(torch.bfloat16) == "bfloat16"
    for bad in ["int4", "float64", "float16+", "float16+int4", "int8:0", "int8:x", "+int8", 16]:
        with pytest.raises(InvalidOptionError, match="wire_format"):
            parse(bad)
    with pytest.raises(InvalidOptionError, match="wire_format 'int4'"):
        ChainConfig(wire_format="int4")
    with pytest.raises(InvalidOptionError, match="wire_format"):
        DistributedModelForCausalLM.from_pretrained("/nonexistent", initial_peers=["x"], wire_format="fp8")
    assert parse_wire_format("float32") == ("float32", None, None)
    assert parse_wire_format("bfloat16+int8:64") == ("bfloat16", "int8", 64)
    assert parse_wire_format("float16+zstd:3") == ("float16", "zstd", 3)   # well-formed: nodes judge it
    sid = new_session_id()
    for bad in ["float64", "float16+int8", "int8", "float16+int8:0", "float16+INT8:4"]:
        with pytest.raises(p2p.LocalProtocolError):
            OpenSession(sid, "m" * 64, 0, 4, 16, 1, bad)
    packed = p2p.Tensor.from_torch(encode_int8(torch.randn(1, 2, 64)))
    assert Step(sid, 1, 0, packed).hidden.dtype == "int8"
    assert StepResult(sid, 1, 0, packed).hidden.dtype == "int8"
    with pytest.raises(p2p.LocalProtocolError):
        Replay(sid, (1,), (2,), packed)


def test_the_default_codec_changes_nothing():
    codec = WireCodec(WireFormat(), torch.float32, 64)
    h = torch.randn(1, 300, 64)
    assert codec.encode(h) is h and codec.decode(h) is h and codec.name == "float32"
    assert codec.refusal(h) is None and codec.refusal(h.half()) is not None
    assert codec.refusal(encode_int8(h)) is not None         # no packing asked for: refused
    half = WireCodec(WireFormat.parse("float16"), torch.float32, 64)
    assert half.encode(h).dtype == torch.float16 and half.decode(half.encode(h)).dtype == torch.float32


def test_codec_replays_packed_chunks_as_their_exact_float32_values():
    codec = WireCodec(WireFormat.parse("float16+int8:4"), torch.float32, 64)
    prefill, decode = codec.encode(torch.randn(1, 9, 64)), codec.encode(torch.randn(1, 1, 64))
    assert prefill.dtype == torch.int8 and decode.dtype == torch.float16
    replay = codec.replay([prefill, decode])
    assert replay.dtype == torch.float32
    assert torch.equal(replay[:, :9], decode_int8(prefill, 64)) and torch.equal(replay[:, 9:], decode.float())
    assert codec.replay([decode, decode]).dtype == torch.float16    # nothing packed: as sent


# -- a node session's way in and out -------------------------------------------------------------
async def test_served_session_unpacks_packs_and_refuses(micro_model):
    from node._sessions import CacheBudget, ServedSession, StepError

    span = load_span(micro_model, 0, 4)
    sid = new_session_id()
    budget = CacheBudget(100, 4)
    def session(fmt: str) -> ServedSession:
        return ServedSession(sid, None, span, span.new_cache(1, 8), fmt, budget.reserve(8))  # type: ignore[arg-type]

    sess = session("float32+int8:2")
    assert (sess.dtype, sess.int8_from, sess.wire_format) == ("float32", 2, "float32+int8:2")
    h = torch.randn(1, 3, 64)
    packed = encode_int8(h)
    x = sess.accept(Step(sid, 0, 0, p2p.Tensor.from_torch(packed)))
    assert torch.equal(x, decode_int8(packed, 64))
    assert sess.to_wire(x).dtype == "int8" and torch.equal(sess.to_wire(x).to_torch(), packed)
    assert sess.to_wire(x[:, :1]).dtype == "float32"             # one token: below the threshold
    assert torch.equal(sess.accept(Step(sid, 0, 0, p2p.Tensor.from_torch(h))), h)   # plain: always taken
    assert torch.equal(sess.accept(Replay(sid, (0,), (3,), p2p.Tensor.from_torch(h))), h)

    def refused(msg) -> str:
        with pytest.raises(StepError) as info:
            sess.accept(msg)
        assert info.value.code == "bad_request"
        return info.value.message

    bad_scale = packed.clone()
    bad_scale[0, 0, 64:66] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.int8)
    assert "scales must be finite" in refused(Step(sid, 1, 0, p2p.Tensor.from_torch(bad_scale)))
    narrow = p2p.Tensor.from_torch(packed[..., :-1].contiguous())
    assert f"rows are {packed_width(64) - 1} bytes wide" in refused(Step(sid, 1, 0, narrow))
    assert "steps come as float32 or int8" in refused(Step(sid, 1, 0, p2p.Tensor.from_torch(h.half())))
    plain = session("float32")
    with pytest.raises(StepError, match="step hidden states are int8, the session was opened for float32"):
        plain.accept(Step(sid, 1, 0, p2p.Tensor.from_torch(packed)))
    assert plain.to_wire(torch.randn(1, 5, 64)).dtype == "float32"
    # a packing this node does not know: BAD_REQUEST, and the reservation is given back
    assert budget.free_tokens == 84
    with pytest.raises(p2p.RemoteError, match="does not support the wire format 'float32\\+int4:8'") as info:
        session("float32+int4:8")
    assert info.value.code == "bad_request" and budget.free_tokens == 84 and budget.sessions == 2


# -- nodes in this process -----------------------------------------------------------------------
async def test_a_node_refuses_malformed_packed_steps_and_the_session_goes_on(micro_model, tmp_path):
    async with running_node(micro_model, tmp_path, cache_tokens=1000) as node, client_host(node) as host:
        with pytest.raises(p2p.RemoteError) as info:
            async with remote_session(host, node, dtype="float16+int4:8"):
                pass
        assert info.value.code == "bad_request" and "does not support the wire format" in info.value.message
        assert node.server.active_sessions == 0 and node.server.budget.free_tokens == 1000
        async with remote_session(host, node, dtype="float32+int8:2", max_length=16) as remote:
            local = Local(micro_model, max_length=16)
            h = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(1))
            packed = encode_int8(h)
            out = await remote.step(packed, 0)                  # the result of a 5-token step: packed
            assert out.dtype == torch.int8
            want = local(decode_int8(packed, 64), 0)   # what the node computed, up to kernel rounding
            assert bool(((decode_int8(out, 64) - want).abs() <= _bound(want, out) * 1.001 + 1e-5).all())
            nan_scale = packed.clone()
            nan_scale[0, 2, 64:66] = torch.tensor([float("inf")], dtype=torch.float16).view(torch.int8)
            duplicate = packed.clone()
            duplicate[0, 0, 66:74] = torch.tensor([3, 3, 4, 5], dtype=torch.int16).view(torch.int8)
            cases = [
                (nan_scale, "scales must be finite"),
                (duplicate, "indices must increase"),
                (torch.cat([packed, packed[..., :2]], -1), "bytes wide"),
                (torch.zeros(1, 1, packed_width(64), dtype=torch.int8)[..., :70], "bytes wide"),
                (h[:, :1].half(), "steps come as float32 or int8 blockwise"),
            ]
            for bad, complaint in cases:
                failed = await remote.fails(bad, 5)
                assert isinstance(failed, StepFailed) and failed.code == "bad_request", failed
                assert complaint in failed.message, failed
            # the session is untouched by all of that: a one-token step comes back plain
            step = torch.randn(1, 1, 64)
            out = await remote.step(step, 5)
            assert out.dtype == torch.float32
            close(out, local(step, 5))


async def test_a_replay_carries_packed_steps_exactly_and_rebuilds_the_same_outputs(micro_model, tmp_path):
    """A two-node chain in "bfloat16+int8:2": a packed prefill and bfloat16 decode steps; fresh
    sessions then get them replayed as one float32 tensor (`WireCodec.replay`), and every output,
    echo and final, is the original bit for bit (one session per node: the same kernels)."""
    fmt = "bfloat16+int8:2"
    codec = WireCodec(WireFormat.parse(fmt), torch.float32, 64)
    g = torch.Generator().manual_seed(7)
    inputs = [(codec.encode(torch.randn(1, t, 64, generator=g)), pos) for t, pos in ((5, 0), (1, 5), (1, 6))]
    assert [h.dtype for h, _ in inputs] == [torch.int8, torch.bfloat16, torch.bfloat16]
    async with running_node(micro_model, tmp_path, blocks=(0, 2)) as a, \
            running_node(micro_model, tmp_path, blocks=(2, 4), initial_peers=a.addrs) as b, \
            client_host(a, b) as host:
        echoes, finals = [], []
        async with remote_session(host, b, start=2, end=4, dtype=fmt) as down, \
                remote_session(host, a, start=0, end=2, dtype=fmt, next_peer=b.peer_id,
                               next_session=down.session_id) as up:
            for h, pos in inputs:
                echoes.append(await up.step(h, pos))
                result = await down.receive()
                assert type(result) is StepResult and result.step_id == up.step_id
                finals.append(result.hidden.to_torch())
        assert [e.dtype for e in echoes] == [f.dtype for f in finals] == [torch.int8, torch.bfloat16, torch.bfloat16]
        async with remote_session(host, b, start=2, end=4, dtype=fmt) as down2, \
                remote_session(host, a, start=0, end=2, dtype=fmt, next_peer=b.peer_id,
                               next_session=down2.session_id) as up2:
            replay = codec.replay([h for h, _ in inputs])
            assert replay.dtype == torch.float32
            await up2.stream.send(Replay(up2.session_id, (1, 2, 3), (5, 1, 1), p2p.Tensor.from_torch(replay),
                                         push=True))
            for k in range(3):
                echo, result = await up2.receive(), await down2.receive()
                assert type(echo) is StepResult and echo.step_id == k + 1, echo
                assert torch.equal(echo.hidden.to_torch(), echoes[k])
                assert torch.equal(result.hidden.to_torch(), finals[k])
            # a float32 step (not a replay) is still refused on this session
            failed = await up2.fails(torch.randn(1, 1, 64), 7, step_id=4)
            assert failed.code == "bad_request" and "replays as bfloat16 or float32" in failed.message


# -- run-node swarms ------------------------------------------------------------------------------
# The largest logit error each format may give on the tiny model (float32, logits within about
# 1.3 of zero), a few times what it gives (measured: float16 5e-4, bfloat16 3.9e-3, int8 1e-2,
# docs/benchmarks.md): rounding the hidden states is deterministic, so these hold on any
# machine. Greedy tokens must then equal the reference's wherever it leads by more than twice
# the bound: the test checks that the reference does, at every choice.
BOUNDS = {"float16": 2e-3, "bfloat16": 1.5e-2, "int8:4": 4e-2, "bfloat16+int8:4": 4e-2}
NEW = 24


@pytest.fixture(scope="module")
def reference(tiny_model):
    local = LocalModelForCausalLM.from_pretrained(tiny_model)
    prompt = torch.tensor([local.tokenizer.encode("Once upon a time, in a small village")])
    tokens = local.generate(prompt, max_new_tokens=NEW, eos_token_id=[])
    assert_decisive(local, tokens, NEW)
    with torch.no_grad():
        logits = local(tokens[:, :-1]).logits.float()
    top = logits[:, prompt.shape[1] - 1:].topk(2, dim=-1).values
    lead = (top[..., 0] - top[..., 1]).min().item()
    assert lead > 2 * max(BOUNDS.values()), f"the reference leads by only {lead:.3g}: pick another prompt"
    return prompt, tokens, local(prompt).logits.float()


@pytest.fixture(scope="module")
def swarm(tiny_model):
    from pipeline.launch import LocalSwarm

    with LocalSwarm(tiny_model, [(0, 4), (4, 8)]) as swarm:
        yield swarm


@pytest.mark.slow
@pytest.mark.parametrize("wire_format", list(BOUNDS))
def test_each_format_stays_within_its_bound_of_the_local_model(wire_format, tiny_model, reference, swarm):
    prompt, tokens, logits = reference
    with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers,
                                                     wire_format=wire_format) as model:
        error = (model(prompt).logits.float() - logits).abs().max().item()
        out = model.generate(prompt, max_new_tokens=NEW, eos_token_id=[])
    print(f"{wire_format}: max logit error {error:.3g} (bound {BOUNDS[wire_format]:g})")
    assert 0 < error < BOUNDS[wire_format]   # > 0: the format was really used (the model is float32)
    assert torch.equal(out, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("hop", [1, 2], ids=["middle", "last"])
def test_failover_under_compression_gives_the_tokens_of_the_run_without_failure(hop, tiny_model, reference):
    """The prompt travels packed, the decode steps as bfloat16; the killed node's replacement
    gets the stored inputs replayed (the packed prefill as its exact float32 values), and the
    tokens are those of the same format's run without failure (and the local model's)."""
    from pipeline.launch import LocalSwarm
    from test_client_swarm import KillAfter

    prompt, tokens, _ = reference
    spans = [(0, 3), (3, 6), (3, 6), (6, 8)] if hop == 1 else [(0, 3), (3, 6), (6, 8), (6, 8)]
    with LocalSwarm(tiny_model, spans) as swarm, DistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=swarm.initial_peers, wire_format="bfloat16+int8:4") as model:
        quiet = model.generate(prompt, max_new_tokens=NEW, eos_token_id=[])
        with model.inference_session(max_length=64) as session:
            killer = KillAfter(swarm, model, 10, signal.SIGKILL, hop)
            out = model.generate(prompt, max_new_tokens=NEW, eos_token_id=[], streamer=killer, session=session)
            assert killer.victim is not None and session.chain.failovers >= 1
            assert session.route[hop].peer_id != killer.victim.peer_id
    assert torch.equal(out, quiet)
    assert torch.equal(out, tokens)


def test_the_cli_takes_a_wire_format_and_refuses_a_bad_one(tiny_model, capsys):
    from pipeline.__main__ import main

    peer = f"/ip4/127.0.0.1/tcp/9/p2p/{p2p.Identity.generate().peer_id}"
    assert main(["generate", "--model", str(tiny_model), "--input-ids", "1,2", "--initial-peers", peer,
                 "--wire-format", "int4"]) == 2
    assert "wire_format 'int4' is not one of" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model), "--input-ids", "1,2", "--local",
                 "--wire-format", "int8"]) == 2
    assert "not with --local" in capsys.readouterr().err
