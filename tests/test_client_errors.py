"""Every error a user can get from the client is one `LaminaError` with a one-sentence message,
never a trio `ExceptionGroup`: bad arguments (no network needed), then real failures injected
in each public call (`from_pretrained`, `model(ids)` / `forward`, `generate`, `inference_session`
enter and exit, `chat`, `close`) with real `run-node` processes on loopback: a peer address with
nothing listening, a swarm missing a span, a node killed under the client.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import threading
from contextlib import ExitStack

import pytest
import torch
import trio

import p2p
import pipeline
from pipeline import (AsyncDistributedModelForCausalLM, ChatTemplateError, CheckpointNotFoundError,
                      DistributedModelForCausalLM, InvalidInputError, InvalidOptionError, LaminaError,
                      LocalModelForCausalLM, ModelClosedError, NoReplacementError, SwarmUnavailableError,
                      TextIteratorStreamer, UnknownOptionError)
from pipeline.launch import LocalSwarm

PROMPT = torch.tensor([[5, 17, 300, 41, 9]])


def one_sentence(error: BaseException) -> BaseException:
    """The error is a LaminaError (not a group) whose message is one sentence."""
    assert isinstance(error, LaminaError) and not isinstance(error, BaseExceptionGroup), repr(error)
    text = str(error)
    assert text and "\n" not in text and not re.search(r"[.!?]\s+[A-Z]", text), text
    return error


def test_every_error_class_is_a_lamina_error():
    """One tree: `except LaminaError` catches what the client, the engine and the p2p layer
    raise (`ReceiveInterrupted` is a wake-up call between tasks, not an error)."""
    assert pipeline.LaminaError is p2p.LaminaError
    found = []
    for module in (pipeline, p2p):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, BaseException) and value is not p2p.ReceiveInterrupted:
                found.append(value)
                assert issubclass(value, LaminaError), value
    names = {c.__name__ for c in found}
    assert {"P2PError", "NoRouteError", "SwarmKeyError", "ReplyInterrupted", "NoReplacementError",
            "SwarmUnavailableError", "ModelClosedError", "StreamTimeoutError"} <= names
    # argument errors are also what Python would raise
    assert issubclass(InvalidOptionError, ValueError) and issubclass(UnknownOptionError, TypeError)
    assert issubclass(InvalidInputError, ValueError) and issubclass(InvalidInputError, TypeError)


def test_bad_arguments_to_the_local_model_are_clear_errors(micro_model):
    model = LocalModelForCausalLM.from_pretrained(micro_model)
    calls = [
        (lambda: LocalModelForCausalLM.from_pretrained("/nonexistent/model"), CheckpointNotFoundError, "neither"),
        (lambda: model.generate("some text"), InvalidInputError, "input_ids must be token ids"),
        (lambda: model.generate(torch.tensor([[1.5, 2.0]])), InvalidInputError, "integer token ids"),
        (lambda: model.generate(torch.tensor([[1, 10 ** 6]])), InvalidInputError, "token ids must lie in"),
        (lambda: model(torch.zeros(1, 0, dtype=torch.long)), InvalidInputError, "at least one token"),
        (lambda: model.generate(PROMPT, num_beams=4), UnknownOptionError, "num_beams=4"),
        (lambda: model.generate(PROMPT, max_new_tokens=-1), InvalidOptionError, "max_new_tokens must be"),
        (lambda: model.chat([{"role": "user", "content": "hi"}]), ChatTemplateError, "no chat template"),
    ]
    for call, kind, match in calls:
        with pytest.raises(kind, match=match) as e:
            call()
        one_sentence(e.value)


def test_bad_arguments_to_the_client_are_clear_errors(micro_model, monkeypatch):
    monkeypatch.delenv("LAMINA_SWARM_KEY", raising=False)
    peer = f"/ip4/127.0.0.1/tcp/9/p2p/{p2p.Identity.generate().peer_id}"
    calls = [
        (dict(), SwarmUnavailableError, "initial_peers is empty: give the multiaddr"),
        (dict(initial_peers=["garbage"]), InvalidOptionError, "initial_peers: invalid multiaddr 'garbage'"),
        (dict(initial_peers=["/ip4/127.0.0.1/tcp/9"]), InvalidOptionError, "needs a /p2p/<peer id> suffix"),
        (dict(initial_peers=[peer], num_beams=2), UnknownOptionError, "unknown option.*num_beams"),
        (dict(initial_peers=[peer], swarm_key=42), InvalidOptionError, "swarm_key must be"),
        (dict(initial_peers=[peer], swarm_key="/nonexistent/swarm.key"), p2p.SwarmKeyError, "does not exist"),
        (dict(initial_peers=[peer], dtype="float32", torch_dtype="bfloat16"), InvalidOptionError, "disagree"),
    ]
    for options, kind, match in calls:
        with pytest.raises(kind, match=match) as e:
            DistributedModelForCausalLM.from_pretrained(micro_model, **options)
        one_sentence(e.value)
    with pytest.raises(CheckpointNotFoundError):
        DistributedModelForCausalLM.from_pretrained("/nonexistent/model", initial_peers=[peer])


async def test_bad_arguments_to_the_async_client_are_clear_errors(micro_model):
    for options, kind in ((dict(), SwarmUnavailableError), (dict(initial_peers=["x"]), InvalidOptionError),
                          (dict(initial_peers=["x"], typo_option=1), UnknownOptionError)):
        try:
            async with AsyncDistributedModelForCausalLM.from_pretrained(micro_model, **options):
                raise AssertionError("opened")
        except LaminaError as e:      # never an ExceptionGroup: `except LaminaError` catches it
            assert isinstance(e, kind)
            one_sentence(e)


# --- real failures ------------------------------------------------------------------------------------

def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: nobody else took it since)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
async def test_a_peer_with_nothing_listening_is_named_with_the_reason(micro_model):
    addr = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{p2p.Identity.generate().peer_id}"
    with pytest.raises(SwarmUnavailableError) as e:
        await trio.to_thread.run_sync(lambda: DistributedModelForCausalLM.from_pretrained(
            micro_model, initial_peers=[addr]))
    assert str(one_sentence(e.value)) == (f"could not reach any of initial_peers ({addr}): the connection was "
                                          f"refused (nothing listens at that address: is the node running?)")
    try:
        async with AsyncDistributedModelForCausalLM.from_pretrained(micro_model, initial_peers=[addr, addr]):
            raise AssertionError("opened")
    except LaminaError as err:
        assert f"({addr} and 1 other): the connection was refused" in str(one_sentence(err))


def chat_copy(tiny_model, tmp_path):
    """The tiny model with a chat template (the model hash, from config.json, is the same)."""
    path = shutil.copytree(tiny_model, tmp_path / "chat")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def kill(node) -> None:
    node.signal(signal.SIGKILL)
    node.proc.wait()


@pytest.mark.slow
def test_failures_in_every_sync_call_are_one_lamina_error(tiny_model, tmp_path):
    """A swarm missing a span (from_pretrained), then the node serving blocks [4, 8) killed
    under the client: every call raises one LaminaError naming what is wrong, leaving a
    session or the client whose node died raises nothing, and a closed client says so."""
    with LocalSwarm(tiny_model, [(0, 4)]) as swarm:
        with pytest.raises(SwarmUnavailableError, match=r"no node of the swarm serves blocks \[4, 8\) of this "
                                                         r"model's 8 \(model hash [0-9a-f]{12}\) after 2 s") as e:
            DistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers,
                                                        connect_timeout=2)
        one_sentence(e.value)
        last = swarm.add_node(4, 8)
        model = DistributedModelForCausalLM.from_pretrained(chat_copy(tiny_model, tmp_path),
                                                            initial_peers=swarm.initial_peers, failover_deadline=2.0)
        with ExitStack() as sessions:
            used = sessions.enter_context(model.inference_session(max_length=64))
            sessions.enter_context(model.inference_session(max_length=64))     # left untouched
            assert model.generate(PROMPT, max_new_tokens=2, session=used).shape == (1, 7)
            kill(last)
            check_failures({"generate in a session": lambda: model.generate(PROMPT, max_new_tokens=4, session=used)})
        # leaving both sessions (one failed, one whose node died) raised nothing
        streamer = TextIteratorStreamer(model.tokenizer, timeout=60)
        thread = threading.Thread(target=lambda: pytest.raises(NoReplacementError, model.generate, PROMPT,
                                                               streamer=streamer, max_new_tokens=4))
        thread.start()
        with pytest.raises(NoReplacementError):      # the iterating thread hears of the failure
            list(streamer)
        thread.join()
        check_failures({
            "model(ids)": lambda: model(PROMPT),
            "generate": lambda: model.generate(PROMPT, max_new_tokens=4),
            "generate a padded batch": lambda: model.generate(
                torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])),
            "inference_session enter": lambda: model.inference_session(max_length=16).__enter__(),
            "chat": lambda: model.chat([{"role": "user", "content": "hi"}], max_new_tokens=4),
        })
        model.close()                                 # the swarm is half gone: closing is still quiet
        model.close()
        with pytest.raises(ModelClosedError, match="this model was closed") as e:
            model.generate(PROMPT)
        one_sentence(e.value)


def check_failures(calls) -> None:
    for call in calls.values():
        with pytest.raises(NoReplacementError, match=r"no server for blocks \[\d, 8\) within the 2 s failover "
                                                     r"deadline") as e:
            call()
        one_sentence(e.value)


@pytest.mark.slow
async def test_failures_in_every_async_call_are_one_lamina_error(tiny_model):
    """The trio API: `except LaminaError` catches every failure (no ExceptionGroup), and an
    exception of the caller's own code inside `async with` comes out exactly as raised."""
    swarm = LocalSwarm(tiny_model, [(0, 4), (4, 8)]).start()
    try:
        async with AsyncDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers):
            raise KeyError("mine")
    except KeyError as e:
        assert e.args == ("mine",)
    group = ExceptionGroup("mine", [KeyError(1), ValueError(2)])
    try:
        async with AsyncDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.initial_peers):
            raise group
    except ExceptionGroup as e:
        assert e is group
    try:
        async with AsyncDistributedModelForCausalLM.from_pretrained(
                tiny_model, initial_peers=swarm.initial_peers, failover_deadline=2.0) as model:
            async with model.inference_session(max_length=64) as session:
                await model.generate(PROMPT, max_new_tokens=2, session=session)
                kill(swarm.nodes[1])
            # leaving the session whose node died raised nothing
            for what, call in {
                "forward": lambda: model.forward(PROMPT),
                "generate": lambda: model.generate(PROMPT, max_new_tokens=3),
                "generate a padded batch": lambda: model.generate(
                    torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])),
            }.items():
                try:
                    await call()
                    raise AssertionError(f"{what} did not fail")
                except LaminaError as e:
                    assert isinstance(one_sentence(e), NoReplacementError), what
            try:
                async with model.inference_session(max_length=16):
                    raise AssertionError("opened")
            except LaminaError as e:
                assert isinstance(one_sentence(e), NoReplacementError)
        # leaving the client (its swarm half gone) raised nothing
    finally:
        swarm.stop()
