"""lamina's node: `run-node` serves a span of a model's blocks over the mesh.

In-process use (tests, embedding)::

    config = NodeConfig(model="path/to/model", blocks=(0, 4), new_swarm=True)
    async with trio.open_nursery() as nursery:
        node = await nursery.start(serve_node, config)   # serving from here on
        ...
        node.request_drain()                             # serve_node returns once drained

Pieces: `SpanServer` (the node side of `pipeline.protocol`), `Batcher` (one forward pass for
every pending session step), `CacheBudget` (KV memory), `Announcer` (the node's signed record),
`choose_blocks` / `should_rebalance` (pure block selection).
"""

import importlib
from typing import TYPE_CHECKING, Any

# Re-exported lazily (PEP 562): `run-node --help` and a bad flag answer without importing torch
# and py-libp2p, which take seconds.
_EXPORTS = {
    "._announce": ("Announcer", "signer_for"),
    "._batching": ("MAX_PASS_TOKENS", "PREFILL_CHUNK", "Batcher", "BatchStats"),
    "._blocks": ("MIN_SERVER_THROUGHPUT", "REBALANCE_GAIN", "choose_blocks", "coverage", "should_rebalance",
                 "weakest_window"),
    "._config": ("NodeConfig",),
    "._node": ("Node", "serve_node"),
    "._server": ("SpanServer", "sub_span"),
    "._sessions": ("CacheBudget", "StepError"),
    # the protocol's error codes (pipeline.protocol), which a node sends
    "pipeline.protocol": ("BAD_REQUEST", "BUSY", "DRAINING", "IDLE_TIMEOUT", "INTERNAL", "UNKNOWN_SESSION"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from pipeline.protocol import BAD_REQUEST, BUSY, DRAINING, IDLE_TIMEOUT, INTERNAL, UNKNOWN_SESSION

    from ._announce import Announcer, signer_for
    from ._batching import MAX_PASS_TOKENS, PREFILL_CHUNK, Batcher, BatchStats
    from ._blocks import (MIN_SERVER_THROUGHPUT, REBALANCE_GAIN, choose_blocks, coverage,
                          should_rebalance, weakest_window)
    from ._config import NodeConfig
    from ._node import Node, serve_node
    from ._server import SpanServer, sub_span
    from ._sessions import CacheBudget, StepError
