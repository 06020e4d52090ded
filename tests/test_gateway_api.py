"""The OpenAI-compatible gateway (`run-gateway`) against a real 2-node swarm of SmolLM2, driven by
the official `openai` package: models, completions, chat completions (greedy tokens equal the
client library's), streaming, usage, stop sequences, every error's status and shape, concurrent
streams, the session bound and its queue, a client that disconnects, and /metrics.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from _gateway import FAST_LEASE, SMOLLM, needs_smollm, running_gateway
from _wait import eventually_sync
from pipeline import DistributedModelForCausalLM
from pipeline._chat import stop_token_ids
from pipeline.launch import LocalSwarm

pytestmark = [pytest.mark.slow, needs_smollm]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
HAIKU = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Write a short poem about the sea."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(SMOLLM, [(0, 15), (15, 30)], extra_args=FAST_LEASE,
                    log_dir=tmp_path_factory.mktemp("swarm")) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def gateway(swarm, tmp_path_factory):
    with running_gateway(swarm.initial_peers, tmp_path_factory.mktemp("gateway")) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def reference(swarm):
    """The client library on the same swarm: what the gateway's greedy answers must equal."""
    with DistributedModelForCausalLM.from_pretrained(SMOLLM, initial_peers=swarm.initial_peers) as model:
        yield model


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(model, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """The client library's greedy tokens after `ids` (ending at a stop token) and their text."""
    stops = stop_token_ids(model.tokenizer, model.config.eos_token_ids)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=list(stops))
    new = out[0, len(ids):].tolist()
    return new, model.tokenizer.decode([t for t in new if t not in stops])


def chat_ids(model, messages) -> list[int]:
    tok = model.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def metrics(gateway) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus_client: (sample name, sorted labels) -> value."""
    text = httpx.get(gateway.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def swarm_nodes(gateway) -> list[dict]:
    return httpx.get(gateway.url + "/api/swarm").json()["nodes"]


# --- models, completions, chat ----------------------------------------------------------

def test_models_list(client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_chat_completion_equals_the_client_library(client, reference):
    tokens, text = greedy(reference, chat_ids(reference, FRANCE), 24)
    assert text == reference.chat(FRANCE, max_new_tokens=24) and "Paris" in text
    reply = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "stop"               # it ended on the template's end of turn
    assert reply.usage.prompt_tokens == len(chat_ids(reference, FRANCE))
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"


def test_completion_equals_the_client_library(client, reference):
    ids = reference.tokenizer.encode(COUNTING)
    tokens, text = greedy(reference, ids, 12)
    reply = client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=12)
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == "length" and len(tokens) == 12
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 12)
    by_ids = client.completions.create(model="smollm2", prompt=ids, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == text


def test_streamed_chunks_reassemble_to_the_whole_reply(client):
    whole = client.chat.completions.create(model="smollm2", messages=HAIKU, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="smollm2", messages=HAIKU, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len([c for c in chunks if c.choices]) > 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage   # include_usage: last chunk
    assert all(c.usage is None for c in chunks[:-1])

    whole = client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=10)
    chunks = list(client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=10,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done(gateway):
    body = {"model": "smollm2", "prompt": COUNTING, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_stop_sequences_cut_the_reply(client, reference):
    full = client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=12).choices[0].text
    stop = full.split(",")[1]               # " 10" after " 9,": the text must end right before it
    assert len(stop) > 1
    for stream in (False, True):
        reply = client.completions.create(model="smollm2", prompt=COUNTING, temperature=0, max_tokens=12,
                                          stop=[stop], stream=stream)
        if stream:
            chunks = list(reply)
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert text == full[:full.index(stop)] and finish == "stop", (stream, text, full)


def test_sampling_with_a_seed_repeats(client):
    def sample():
        return client.chat.completions.create(model="smollm2", messages=HAIKU, temperature=0.9, top_p=0.95,
                                              seed=7, max_tokens=16).choices[0].message.content
    assert sample() == sample()


# --- errors ---------------------------------------------------------------------------

LONG = "hello " * 9000        # more tokens than SmolLM2's 8192 positions


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", b"{not json", 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/chat/completions", {"messages": FRANCE}, 400, "model", None),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": FRANCE}, 404, "model", "model_not_found"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": LONG}]},
     400, "messages", "context_length_exceeded"),
    ("/v1/completions", {"model": "smollm2", "prompt": "hi", "max_tokens": 8192}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": FRANCE, "n": 2}, 400, "n", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": FRANCE, "presence_penalty": 0.5}, 400,
     "presence_penalty", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": FRANCE, "temperature": 3}, 400, "temperature", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": FRANCE, "frobnicate": 1}, 400, "frobnicate",
     "unrecognized_argument"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role", None),
    ("/v1/completions", {"model": "smollm2", "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "stream": "yes"}, 400, "stream", None),
    ("/v1/nothing", {}, 404, None, "not_found"),
])
def test_errors_have_the_openai_shape(gateway, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(gateway.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


def test_the_client_library_sees_the_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=FRANCE)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": LONG}])
    assert e.value.code == "context_length_exceeded" and "8192" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=FRANCE, n=3)
    assert e.value.param == "n"


# --- concurrency ----------------------------------------------------------------------

def _stream_text(client, messages, out: dict, key: str) -> None:
    chunks = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=30,
                                            stream=True)
    out[key] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_two_concurrent_streams_both_complete(client):
    alone = {k: client.chat.completions.create(model="smollm2", messages=m, temperature=0,
                                               max_tokens=30).choices[0].message.content
             for k, m in (("france", FRANCE), ("haiku", HAIKU))}
    together: dict[str, str] = {}
    threads = [threading.Thread(target=_stream_text, args=(client, m, together, k))
               for k, m in (("france", FRANCE), ("haiku", HAIKU))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def test_sessions_are_bounded_and_queued(swarm, tmp_path):
    """--max-sessions 1 --max-queue 1: one runs, one waits (then runs), a third gets 429."""
    with running_gateway(swarm.initial_peers, tmp_path, "--max-sessions", "1", "--max-queue", "1") as tight:
        client = openai.OpenAI(base_url=tight.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        expected = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0,
                                                  max_tokens=30).choices[0].message.content
        queued: dict[str, str] = {}
        body = {"model": "smollm2", "prompt": COUNTING, "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", tight.url + "/v1/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()      # held: a dropped iterator would close the stream
            next(line for line in lines if line)                        # the first runs
            waiter = threading.Thread(target=_stream_text, args=(client, FRANCE, queued, "second"))
            waiter.start()
            eventually_sync(lambda: metrics(tight)[("lamina_gateway_sessions_queued", ())] == 1)
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=4)
            assert e.value.status_code == 429 and e.value.code == "overloaded"
        waiter.join(timeout=120)            # the first stream closed: the queued one ran
        assert queued == {"second": expected}


def test_a_client_that_disconnects_ends_its_session(gateway):
    before = metrics(gateway)
    body = {"model": "smollm2", "prompt": COUNTING, "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line)
        eventually_sync(lambda: any(n["sessions"] > 0 for n in swarm_nodes(gateway)),
                        what=lambda: swarm_nodes(gateway))
        assert metrics(gateway)[("lamina_gateway_sessions_open", ())] == 1
    # closed mid-stream: the gateway cancels the generation and closes the session on the nodes
    eventually_sync(lambda: metrics(gateway)[("lamina_gateway_sessions_open", ())] == 0, timeout=10)
    eventually_sync(lambda: all(n["sessions"] == 0 for n in swarm_nodes(gateway)), timeout=10,
                    what=lambda: swarm_nodes(gateway))
    after = metrics(gateway)
    key = ("lamina_gateway_errors_total", (("kind", "client_disconnected"),))
    assert after[key] == before.get(key, 0) + 1


# --- metrics --------------------------------------------------------------------------

def test_metrics_parse_and_move_after_a_generation(gateway, client):
    before = metrics(gateway)
    reply = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=8)
    after = metrics(gateway)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("lamina_gateway_tokens_total", kind="completion") == reply.usage.completion_tokens
    assert moved("lamina_gateway_tokens_total", kind="prompt") == reply.usage.prompt_tokens
    assert moved("lamina_gateway_requests_total", endpoint="chat", status="200") == 1
    assert moved("lamina_gateway_time_to_first_token_seconds_count") == 1
    assert after[("lamina_swarm_peers_connected", ())] >= 1
    assert after[("lamina_swarm_servers_known", (("state", "online"),))] == 2
    assert after[("lamina_swarm_gossip_messages_total", ())] >= before.get(("lamina_swarm_gossip_messages_total", ()), 0)
