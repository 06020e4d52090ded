"""The swarm map: who serves which blocks of a model, from a local replica, as JSON.

`swarm_map(records, ...)` is a pure function of server records and the wall time, so it is
tested without a swarm; the gateway serves it as ``GET /api/swarm`` and the page at ``/``
(`pipeline/_gateway_static/`) draws it. Shape::

    {"model": {"name", "hash", "blocks"}, "now_ms", "complete": bool,
     "missing": [[a, b], ...],                      # block ranges no live node serves
     "coverage": [n_0, ..., n_{blocks-1}],          # live nodes per block
     "nodes": [{"peer_id", "name", "start", "end", "state", "live", "throughput",
                "inference_rps", "sessions", "free_cache_tokens", "reachability", "version",
                "addrs", "last_seen_s", "lease_left_s"}, ...],
     "other_models": [{"name", "hash", "nodes"}, ...]}

A node's "last seen" is its record's own timestamp (the time it last announced itself, on its
clock); nodes are ordered by span start, then peer id, as the router orders them.
"""

from __future__ import annotations

from typing import Any, Iterable

import crdt


def block_ranges(blocks: Iterable[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 4], [7, 8]] (half-open ranges of consecutive blocks)."""
    out: list[list[int]] = []
    for b in sorted(blocks):
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out


def describe_missing(missing: list[list[int]], blocks: int) -> str:
    """"blocks [0, 10), [20, 30) of 30" (what a 503 says)."""
    spans = ", ".join(f"[{a}, {b})" for a, b in missing)
    count = sum(b - a for a, b in missing)
    return f"block{'s' if count > 1 else ''} {spans} of {blocks}"


def _node(r: crdt.ServerRecord, now_ms: int) -> dict[str, Any]:
    return {
        "peer_id": crdt.peer_id_to_str(r.peer_id),
        "name": r.public_name,
        "start": r.start,
        "end": r.end,
        "state": r.state.name.lower(),
        "live": r.is_live(now_ms),
        "throughput": round(r.throughput, 3),
        "inference_rps": round(r.inference_rps, 3),
        "sessions": r.load.active_sessions,
        "free_cache_tokens": r.load.free_cache_tokens,
        "reachability": r.reachability.name.lower(),
        "version": r.version,
        "addrs": list(r.addrs),
        "last_seen_s": round(max(0, now_ms - r.hlc.wall_ms) / 1000, 1),
        "lease_left_s": round(max(0, r.expires_ms - now_ms) / 1000, 1),
    }


def swarm_map(records: Iterable[crdt.ServerRecord], *, model_name: str, model_hash: bytes,
              blocks: int, now_ms: int) -> dict[str, Any]:
    """The map of one model (see the module docstring). `records`: a replica's records, any
    state and lease: OFFLINE and expired ones are left out here."""
    mine: list[crdt.ServerRecord] = []
    others: dict[bytes, dict[str, Any]] = {}
    for r in records:
        if r.expires_ms <= now_ms or r.state is crdt.ServerState.OFFLINE:
            continue
        if r.model.config_hash == model_hash:
            mine.append(r)
        else:
            other = others.setdefault(r.model.config_hash, {"name": r.model.name,
                                                            "hash": r.model.config_hash.hex(), "nodes": 0})
            other["nodes"] += 1
    mine.sort(key=lambda r: (r.start, r.end, r.peer_id))
    coverage = [0] * blocks
    for r in mine:
        if r.is_live(now_ms):
            for b in range(r.start, min(r.end, blocks)):
                coverage[b] += 1
    missing = block_ranges(b for b, n in enumerate(coverage) if n == 0)
    return {
        "model": {"name": model_name, "hash": model_hash.hex(), "blocks": blocks},
        "now_ms": now_ms,
        "complete": not missing,
        "missing": missing,
        "coverage": coverage,
        "nodes": [_node(r, now_ms) for r in mine],
        "other_models": sorted(others.values(), key=lambda m: (m["name"], m["hash"])),
    }
