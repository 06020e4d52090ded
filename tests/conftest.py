"""Shared fixtures: checkpoints written by transformers (test-only) and by lamina's tiny writer.

Running the tests
-----------------
Fast inner loop (about a minute on 2 cores)::

    python3 -m pytest -q -m "not slow"

`slow` marks the tests that start `run-node` or other Python processes (LocalSwarm, start_node,
peer processes), build network namespaces (netlab), or otherwise take more than ~3 s. CI runs
everything: ``python3 -m pytest -q``. Waiting in a test: `from _wait import eventually` (bounded
polling that names what it waited for), never a fixed sleep; prefer an event where there is one.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# Tests share the cores with the node processes they start: one intra-op thread each avoids
# OpenMP spin-waiting on oversubscribed cores (10x slowdowns measured on 2 cores).
# LAMINA_TEST_THREADS runs the suite with another count (the exactness tests hold for any).
torch.set_num_threads(int(os.environ.get("LAMINA_TEST_THREADS", "1")))

# family name -> transformers config kwargs (small, but exercising each family's specifics)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama3-rope": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-linear-rope": ("LlamaConfig", dict(num_key_value_heads=4, rope_scaling={
        "rope_type": "linear", "factor": 4.0})),
    "llama2-mha": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32)),
}
FAMILIES = list(FAMILY_CONFIGS)
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            vocab_size=320, max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
            pad_token_id=None)


def write_hf_checkpoint(directory: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A random-init checkpoint of `family`, written by transformers' own save_pretrained."""
    import transformers

    cls_name, extra = FAMILY_CONFIGS[family]
    config = getattr(transformers, cls_name)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        model.save_pretrained(directory)
    return directory


# Token-equality tests compare greedy tokens computed by different kernels: transformers' and
# ours, one thread and another, a pass alone and one batched with other sessions. Those agree to
# float rounding only (logits within 1e-6 here, measured; the bits depend on the machine), so a
# choice between two logits closer than that could go either way on another machine. Every
# reference a test compares tokens against is checked first: each of its greedy choices leads
# the runner-up by more than GREEDY_LEAD, so equal tokens are what any machine must produce.
# A reference that fails this check needs another prompt, never a looser comparison.
GREEDY_LEAD = 1e-5


def assert_decisive(model, tokens: torch.Tensor, new: int) -> torch.Tensor:
    """Check that the last `new` tokens of `tokens` (rows of prompt + greedy output) are each
    the argmax of `model(tokens).logits` by more than GREEDY_LEAD; returns `tokens`."""
    with torch.no_grad():
        logits = model(tokens).logits[:, -new - 1:-1].float()
    assert torch.equal(logits.argmax(-1), tokens[:, -new:]), "not a greedy continuation"
    top = logits.topk(2, dim=-1).values
    lead = (top[..., 0] - top[..., 1]).min().item()
    assert lead > GREEDY_LEAD, f"a greedy choice of this reference leads by only {lead:.1e}: pick another prompt"
    return tokens


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (checkpoint dir, transformers model), written once per session."""
    made: dict[str, tuple[Path, object]] = {}

    def get(family: str):
        if family not in made:
            import transformers

            path = write_hf_checkpoint(tmp_path_factory.mktemp(family), family)
            model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            made[family] = (path, model)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded tiny model (lamina's own writer), written once per session."""
    from pipeline.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    from pipeline.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("micro"), "micro")


@pytest.fixture
def make_host(nursery):  # type: ignore[no-untyped-def]
    """Start real p2p hosts on loopback in the test's nursery; they all close when the test ends."""
    import p2p

    async def make(**kwargs) -> "p2p.Host":  # type: ignore[no-untyped-def]
        kwargs.setdefault("listen_addrs", ["/ip4/127.0.0.1/tcp/0"])
        kwargs.setdefault("enable_dht", False)
        kwargs.setdefault("enable_gossip", False)
        config = p2p.HostConfig(identity=kwargs.pop("identity", None) or p2p.Identity.generate(), **kwargs)
        return await nursery.start(p2p.serve_host, config)

    return make


@pytest.fixture
def nat_lab(request):
    """A started `netlab.NatLab` (an internet, public hosts, homes behind NATs, all in network
    namespaces), closed when the test ends; skips where the lab cannot run (not root, no ip/nft)."""
    import netlab

    return netlab.open_nat_lab(request)
