"""Block selection and rebalancing as pure, deterministic functions of the swarm's records.

The swarm's strength at block ``b`` is its *coverage*: the summed throughput (tokens/s) of the
servers of this model whose span holds ``b`` and that are ONLINE or JOINING (a JOINING server
counts, so nodes starting together do not all pick the same hole). A server that has not
measured its throughput yet counts as `MIN_SERVER_THROUGHPUT`, so it is never invisible.

* `choose_blocks`: the window of ``num_blocks`` consecutive blocks where the swarm is weakest.
  Windows compare by their coverages sorted ascending (the weakest block first, then the next
  weakest, ...); ties go to the lowest start. An uncovered block always wins over a covered one.
* `should_rebalance`: move only when the swarm's bottleneck (its least covered block) would grow
  by more than `REBALANCE_GAIN` times, with this node removed from where it is and added where
  `choose_blocks` would put it now. A node that is the only server of its blocks never moves
  (its blocks would become the bottleneck at zero).

Nothing here reads the network or a clock: records and the current time are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from crdt import ServerRecord, ServerState

MIN_SERVER_THROUGHPUT = 1.0  # tokens/s a server counts for before it has measured itself
REBALANCE_GAIN = 1.5  # move when the bottleneck would grow by more than this factor
COUNTED_STATES = (ServerState.ONLINE, ServerState.JOINING)


def _counted(records: Iterable[ServerRecord], config_hash: bytes, total_blocks: int,
             now_ms: int, exclude: bytes | None) -> list[ServerRecord]:
    return [
        r for r in records
        if r.model.config_hash == config_hash and r.state in COUNTED_STATES
        and r.expires_ms > now_ms and r.peer_id != exclude and r.end <= total_blocks
    ]


def coverage(records: Iterable[ServerRecord], config_hash: bytes, total_blocks: int, now_ms: int,
             *, exclude: bytes | None = None) -> list[float]:
    """Summed throughput per block of the live servers of this model (`exclude`: a peer id
    whose record is left out, e.g. our own)."""
    cover = [0.0] * total_blocks
    for r in _counted(records, config_hash, total_blocks, now_ms, exclude):
        weight = max(r.throughput, MIN_SERVER_THROUGHPUT)
        for b in range(r.start, r.end):
            cover[b] += weight
    return cover


def weakest_window(cover: Sequence[float], num_blocks: int) -> int:
    """The start of the weakest window of `num_blocks` blocks (lowest start on ties)."""
    if not 1 <= num_blocks <= len(cover):
        raise ValueError(f"cannot place {num_blocks} blocks in a model of {len(cover)}")
    return min(range(len(cover) - num_blocks + 1),
               key=lambda s: (sorted(cover[s:s + num_blocks]), s))


def choose_blocks(records: Iterable[ServerRecord], config_hash: bytes, total_blocks: int,
                  num_blocks: int, now_ms: int, *, exclude: bytes | None = None) -> tuple[int, int]:
    """The span ``[start, end)`` of `num_blocks` blocks where the swarm is weakest."""
    start = weakest_window(coverage(records, config_hash, total_blocks, now_ms, exclude=exclude),
                           num_blocks)
    return start, start + num_blocks


def should_rebalance(records: Iterable[ServerRecord], me: ServerRecord, total_blocks: int,
                     now_ms: int) -> tuple[int, int] | None:
    """The span this node should move to, or None to stay where it is."""
    records = list(records)
    n = me.end - me.start
    others = coverage(records, me.model.config_hash, total_blocks, now_ms, exclude=me.peer_id)
    start = weakest_window(others, n)
    if start == me.start:
        return None
    weight = max(me.throughput, MIN_SERVER_THROUGHPUT)
    before, after = list(others), list(others)
    for b in range(me.start, me.end):
        before[b] += weight
    for b in range(start, start + n):
        after[b] += weight
    if min(after) > min(before) * REBALANCE_GAIN:
        return start, start + n
    return None
