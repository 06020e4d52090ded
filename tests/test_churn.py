"""The churn soak, shortened (scripts/soak_churn.py has the long version): six `run-node`
processes, every span served twice, nodes killed, frozen and restarted every two seconds under
concurrent generations. Every generation must complete with exactly the local model's tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import soak_churn  # noqa: E402


@pytest.mark.slow
def test_generations_survive_churn_with_the_local_tokens(tmp_path):
    args = soak_churn.parser().parse_args(["--generations", "4", "--waves", "3", "--new-tokens", "40",
                                           "--interval", "2", "--down", "1", "--freeze", "4", "--seed", "3"])
    result = soak_churn.soak(args, log_dir=tmp_path)
    assert result["errors"] == []
    assert result["generations"] == result["completed"] == result["identical"] == 12
    assert result["kills"] + result["freezes"] + result["restarts"] >= 3, result
