"""The gateway's pure parts, without a swarm: OpenAI request checking and its errors, stop
sequences over streamed text, the swarm map of a set of records, and the metrics' text format."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import crdt
from pipeline._metrics import GatewayMetrics, NodeMetrics, render
from pipeline._openai import ApiError, StopText, parse_chat, parse_completion
from pipeline._swarm_map import describe_missing, swarm_map

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_chat_request_maps_onto_generate_options():
    r = parse_chat({**CHAT, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "x", "max_completion_tokens": 7,
                    "stream": True, "stream_options": {"include_usage": True}, "user": "u"})
    assert (r.kind, r.model, r.stream, r.include_usage, r.sampling.max_tokens) == ("chat", "m", True, True, 7)
    assert r.sampling.generate_options() == {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                                             "stop_strings": ["x"]}
    assert parse_chat({**CHAT, "temperature": 0}).sampling.generate_options() == {"do_sample": False}
    assert parse_chat({**CHAT, "n": 1, "presence_penalty": 0, "logprobs": False}).sampling.max_tokens is None
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert parse_chat({"model": "m", "messages": [{"role": "developer", "content": parts}]}).messages == \
        ({"role": "system", "content": "ab"},)


def test_completion_prompts():
    assert parse_completion({"model": "m", "prompt": "x"}).prompt == "x"
    assert parse_completion({"model": "m", "prompt": ["x"]}).prompt == "x"
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompt == (1, 2)
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}).prompt == (1, 2)


@pytest.mark.parametrize("body, param", [
    ([], None), ({"messages": CHAT["messages"]}, "model"), ({**CHAT, "n": 2}, "n"), ({**CHAT, "n": True}, "n"),
    ({**CHAT, "frequency_penalty": 1}, "frequency_penalty"), ({**CHAT, "logit_bias": {"1": 2}}, "logit_bias"),
    ({**CHAT, "tools": [{}]}, "tools"), ({**CHAT, "temperature": -1}, "temperature"),
    ({**CHAT, "temperature": "hot"}, "temperature"), ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"), ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({**CHAT, "stop": ["a"] * 5}, "stop"), ({**CHAT, "stop": [""]}, "stop"), ({**CHAT, "stop": 3}, "stop"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"), ({**CHAT, "bogus": 1}, "bogus"),
    ({"model": "m", "messages": "hi"}, "messages"), ({"model": "m", "messages": ["hi"]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "x", "content": "a"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_bad_chat_requests_are_400_naming_the_parameter(body, param):
    with pytest.raises(ApiError) as e:
        parse_chat(body)
    assert e.value.status == 400 and e.value.param == param
    error = e.value.body()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", [None, 3, [], ["a", "b"], [1, -2], [True], [[1], [2]]])
def test_bad_prompts_are_400(prompt):
    with pytest.raises(ApiError) as e:
        parse_completion({"model": "m", "prompt": prompt})
    assert e.value.status == 400 and e.value.param == "prompt"


def _feed(stops, pieces):
    text = StopText(tuple(stops))
    shown = [text.feed(p) for p in pieces]
    return shown, text.flush(), text.stopped


def test_stop_sequences_over_pieces():
    # a stop split across pieces is never shown, and the text before it is
    assert _feed(["END"], ["ab", "cE", "N", "Dxx"]) == (["ab", "c", "", ""], "", True)
    # a held-back prefix that does not become a stop comes out with the next piece
    assert _feed(["END"], ["abE", "Nq"]) == (["ab", "ENq"], "", False)
    # the held-back end comes out at the flush
    assert _feed(["END"], ["abEN"]) == (["ab"], "EN", False)
    # the earliest of several stops wins; nothing after a stop
    assert _feed(["yz", "b"], ["ab", "c"]) == (["a", ""], "", True)
    assert _feed([], ["a", "b"]) == (["a", "b"], "", False)


def _record(signer, start, end, state=crdt.ServerState.ONLINE, *, model=b"\1" * 32, wall=1_000, lease=5_000):
    return crdt.ServerRecord(peer_id=signer.peer_id, model=crdt.ModelId("m", model), start=start, end=end,
                             state=state, hlc=crdt.Hlc(wall, 0), expires_ms=wall + lease, throughput=12.5,
                             load=crdt.Load(2, 100), version="0.1.0", public_name="n")


def test_swarm_map_of_records():
    a, b, c, d = (crdt.Signer(bytes([i]) * 32) for i in range(1, 5))
    records = [_record(a, 0, 2), _record(b, 3, 4, crdt.ServerState.DRAINING), _record(c, 2, 3, wall=0, lease=500),
               _record(d, 0, 4, model=b"\2" * 32)]
    data = swarm_map(records, model_name="m", model_hash=b"\1" * 32, blocks=4, now_ms=2_000)
    assert [(n["start"], n["state"], n["live"]) for n in data["nodes"]] == [(0, "online", True), (3, "draining", False)]
    assert data["coverage"] == [1, 1, 0, 0] and data["missing"] == [[2, 4]] and not data["complete"]
    node = data["nodes"][0]
    assert node["peer_id"] == crdt.peer_id_to_str(a.peer_id) and node["sessions"] == 2
    assert (node["last_seen_s"], node["lease_left_s"], node["throughput"]) == (1.0, 4.0, 12.5)
    assert data["other_models"] == [{"name": "m", "hash": "02" * 32, "nodes": 1}]
    assert describe_missing(data["missing"], 4) == "blocks [2, 4) of 4"


def test_metrics_render_in_the_text_format():
    registry = CollectorRegistry()
    gateway, node = GatewayMetrics(registry), NodeMetrics(registry)
    gateway.tokens.labels("completion").inc(5)
    gateway.errors.labels("model_not_found").inc()
    gateway.ttft.observe(0.02)
    node.session_opened()
    node.step(0.004, 3)
    node.cache(used=lambda: 1024, budget=lambda: 4096)
    body, content_type = render(registry)
    assert content_type.startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples[("lamina_gateway_tokens_total", (("kind", "completion"),))] == 5
    assert samples[("lamina_gateway_errors_total", (("kind", "model_not_found"),))] == 1
    assert samples[("lamina_gateway_time_to_first_token_seconds_count", ())] == 1
    assert samples[("lamina_node_sessions_open", ())] == 1
    assert samples[("lamina_node_tokens_total", ())] == 3
    assert samples[("lamina_node_step_latency_seconds_count", ())] == 1
    assert (samples[("lamina_node_kv_cache_bytes_used", ())], samples[("lamina_node_kv_cache_bytes_budget", ())]) \
        == (1024, 4096)


def test_gateway_metrics_leave_their_registry():
    """A gateway that restarts beside its node registers its metrics again on the same registry."""
    registry = CollectorRegistry()
    GatewayMetrics(registry).unregister()
    GatewayMetrics(registry).tokens.labels("prompt").inc(2)
    assert b'lamina_gateway_tokens_total{kind="prompt"} 2.0' in render(registry)[0]
