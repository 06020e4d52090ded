"""Decoding over emulated WAN links (scripts/bench_wan.py has the full table): two nodes and a
client in lab namespaces, every host's traffic held 25 ms by the link emulator. The push chain's
decode step must stay within 1.3x of its physical bound, (n+1)·d + the local compute per step,
so a regression that adds a round trip shows; the client-relayed mode gives the same tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

import netlab

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_wan  # noqa: E402


@pytest.mark.slow
def test_push_chain_is_near_the_bound_over_25ms_links(tmp_path, tiny_model):
    netlab.skip_unless_nat_lab()
    args = argparse.Namespace(new_tokens=16, repeats=3)
    local_ms, expected = bench_wan.local_step_ms(tiny_model, args.new_tokens, args.repeats)
    run = bench_wan.run_config(tiny_model, 2, 25.0, expected, local_ms, args, tmp_path)
    assert run["push"]["tokens_equal_local"] and run["client_relayed"]["tokens_equal_local"]
    assert run["push"]["step_ms"] >= 3 * 25.0, run            # nothing beats the links
    assert run["push"]["ratio"] <= 1.3, run
