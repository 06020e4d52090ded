"""`run-node --http-port`: a node serves the swarm map, /metrics and the OpenAI API from its own
replica of the swarm state, from its ready line on, before the swarm covers every block.

Real `run-node` processes of the tiny model on loopback (`pipeline.launch.LocalSwarm`); the HTTP
address is the node's own log line ``http: serving URL``, written before its ready line. No
fixed sleeps: waits are `eventually_sync`.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from _wait import eventually_sync
from pipeline import DistributedModelForCausalLM, LaminaError
from pipeline.launch import LocalSwarm, NodeProcess

pytestmark = pytest.mark.slow

FAST_LEASE = ["--heartbeat", "1", "--lease", "3"]
HTTP_URL = re.compile(r"http: serving (http://\S+)")
TIMEOUT = 20.0        # seconds for one HTTP request (a loaded 2-core machine)
PROMPT = "The river runs to the sea"
NEW_TOKENS = 8


def http_url(node: NodeProcess) -> str:
    """The node's HTTP address, from the log line it writes before its ready line."""
    match = HTTP_URL.search(node.log())
    assert match, f"no 'http: serving' line in the node's log:\n{node.log()[-2000:]}"
    return match.group(1)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics parsed with prometheus_client's own parser: {(sample name, labels): value}."""
    reply = httpx.get(url + "/metrics", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def node_counts(url: str) -> dict[str, float]:
    m = metrics(url)
    return {name: m[(f"lamina_node_{name}", ())] for name in
            ("steps_total", "tokens_total", "step_latency_seconds_count", "sessions_open", "sessions_total")}


def peers_in_map(url: str) -> list[str]:
    return [n["peer_id"] for n in httpx.get(url + "/api/swarm", timeout=TIMEOUT).json()["nodes"]]


@pytest.fixture
def swarm(tiny_model, tmp_path):
    swarm = LocalSwarm(tiny_model, [], extra_args=FAST_LEASE, log_dir=tmp_path / "swarm")
    try:
        yield swarm
    finally:
        swarm.stop()


def test_a_node_serves_its_map_metrics_and_api_at_once_and_generations_once_the_chain_is_complete(
        swarm, tiny_model):
    first = swarm.add_node(0, 4, "--http-port", "0")
    url = http_url(first)

    # right after the ready line, alone: the map of its own replica, the page, metrics, models
    data = httpx.get(url + "/api/swarm", timeout=TIMEOUT).json()
    assert [(n["peer_id"], n["start"], n["end"], n["state"]) for n in data["nodes"]] == \
        [(first.peer_id, 0, 4, "online")]
    assert (data["complete"], data["missing"], data["model"]["blocks"]) == (False, [[4, 8]], 8)
    assert data["node"]["peer_id"] == first.peer_id and data["node"]["blocks"] == [0, 4]
    page = httpx.get(url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/api/swarm" in httpx.get(url + "/static/map.js", timeout=TIMEOUT).text
    before = metrics(url)
    assert before[("lamina_node_steps_total", ())] == 0
    assert before[("lamina_node_kv_cache_bytes_used", ())] == 0
    assert before[("lamina_node_kv_cache_bytes_budget", ())] > 0
    assert ("lamina_node_swarm_exchanges_total", ()) in before          # the replica's gossip rounds
    models = httpx.get(url + "/v1/models", timeout=TIMEOUT).json()["data"]
    assert [m["blocks"] for m in models] == [8]
    name = models[0]["id"]
    body = {"model": name, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
    refused = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "swarm_unavailable" and "[4, 8)" in refused.json()["error"]["message"]
    health = httpx.get(url + "/health", timeout=TIMEOUT)
    assert (health.status_code, health.json()["api"], health.json()["missing"]) == (503, "incomplete", [[4, 8]])

    # a second node: the map shows both, and the node's API opens its client by itself
    second = swarm.add_node(4, 8)
    eventually_sync(lambda: sorted(peers_in_map(url)) == sorted([first.peer_id, second.peer_id]),
                    what=lambda: peers_in_map(url))
    eventually_sync(lambda: httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200,
                    what=lambda: httpx.get(url + "/health", timeout=TIMEOUT).text)

    # a generation through the swarm with the client library moves the node's counters
    start = node_counts(url)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers) as model:
        ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[0, len(ids):].tolist()
    assert len(new) == NEW_TOKENS, "the reference ended early: pick another prompt"
    expected = model.tokenizer.decode(new)
    moved = eventually_sync(lambda: (c := node_counts(url))["sessions_open"] == 0 and
                            c["steps_total"] >= start["steps_total"] + NEW_TOKENS and c,
                            what=lambda: (start, node_counts(url)))
    steps = moved["steps_total"] - start["steps_total"]
    # a prefill of the prompt, then one step per new token but the last (more if a step was resent)
    assert steps >= NEW_TOKENS
    assert moved["tokens_total"] - start["tokens_total"] >= len(ids) + NEW_TOKENS - 1
    assert moved["step_latency_seconds_count"] - start["step_latency_seconds_count"] == steps
    assert moved["sessions_total"] == start["sessions_total"] + 1

    # the same completion through the node's own OpenAI API: the client library's greedy text
    reply = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["choices"][0]["text"] == expected
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (len(ids), NEW_TOKENS)
    after = metrics(url)
    assert after[("lamina_gateway_requests_total", (("endpoint", "completions"), ("status", "200")))] == 1
    assert after[("lamina_gateway_tokens_total", (("kind", "completion"),))] == NEW_TOKENS
    assert after[("lamina_node_swarm_peers_known", ())] >= 1
    eventually_sync(lambda: node_counts(url)["sessions_open"] == 0, what=lambda: node_counts(url))


def test_refusals_are_counted_by_kind_and_the_http_side_stops_with_the_drain(swarm, tiny_model):
    """A node that refuses a session (longer than its --inference-max-length, which routing does
    not see) counts it under errors{kind="bad_request"}; on SIGTERM its HTTP server stops while the
    node drains, and the node exits 0."""
    first = swarm.add_node(0, 4, "--http-port", "0", "--inference-max-length", "32")
    swarm.add_node(4, 8)
    url = http_url(first)
    eventually_sync(lambda: httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200,
                    what=lambda: httpx.get(url + "/health", timeout=TIMEOUT).text)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers,
                                                     failover_deadline=2.0) as model:
        ids = model.tokenizer.encode(PROMPT, add_special_tokens=True)
        with pytest.raises(LaminaError, match="no server for blocks"):
            model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)    # > 32 positions
    counts = metrics(url)
    assert counts[("lamina_node_errors_total", (("kind", "bad_request"),))] >= 1
    assert counts[("lamina_node_sessions_open", ())] == 0

    first.signal(signal.SIGTERM)
    assert first.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=TIMEOUT)
    assert "http: stopped (the node is draining)" in first.log()
