"""A `run-node` that returns slightly wrong outputs and claims to be fast: the malicious node of
tests/test_spot_check.py (and scripts/bench_spotcheck.py).

    python tests/_liar_node.py RUN_NODE [run-node's arguments...]

(`pipeline.launch.spawn_node(..., prefix=[python, this file])` starts it so.) Every output
position from LAMINA_LIE_FROM on (default 0) gets Gaussian noise of LAMINA_LIE times its own RMS
(default 0.05: a 5% relative error, well past honest float noise and small enough to keep the
text plausible). Its announced throughput is LAMINA_LIE_SPEEDUP times what it measured
(default 3: under the client's lie factor of 4, so routers keep preferring it), so clients
route through it.
"""

from __future__ import annotations

import os
import sys

import torch

from node import _node, _server

SCALE = float(os.environ.get("LAMINA_LIE", "0.05"))
FROM = int(os.environ.get("LAMINA_LIE_FROM", "0"))
SPEEDUP = float(os.environ.get("LAMINA_LIE_SPEEDUP", "3"))

_compute = _server.SpanServer._compute
_throughput = _node.span_throughput


async def _lying_compute(self, sess, x: torch.Tensor, position: int) -> torch.Tensor:
    out = await _compute(self, sess, x, position)
    first = max(0, FROM - position)
    if first >= out.shape[1]:
        return out
    generator = torch.Generator().manual_seed(position)
    part = out[:, first:].float()
    rms = part.pow(2).mean(dim=-1, keepdim=True).sqrt()
    noise = torch.randn(part.shape, generator=generator) * rms * SCALE
    out = out.clone()
    out[:, first:] = (part + noise).to(out.dtype)
    return out


async def _boasting_throughput(*args, **kwargs) -> float:
    return SPEEDUP * await _throughput(*args, **kwargs)


_server.SpanServer._compute = _lying_compute
_node.span_throughput = _boasting_throughput

if __name__ == "__main__":
    from node._cli import main

    sys.argv = ["run-node", *sys.argv[2:]]
    sys.exit(main())
