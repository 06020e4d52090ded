"""Spot-checking: re-run a random sample of steps on a second server and compare the results.

A volunteer's node can return wrong numbers: a bug, broken hardware, or on purpose. With
`spot_check=r` (0 < r <= 1; `from_pretrained(..., spot_check=0.05)`), a chain checks about a
fraction r of its steps:

* Which steps (`Sampler`): the steps are cut into windows of ``W = round(1/r)`` consecutive
  steps, and one step of each window, drawn at random, is checked. So checks come about once
  per W steps and never more than ``2W - 1`` steps apart.
* What a check covers (`SpotChecker.check`): every hop of the route. For a hop serving blocks
  [s, e), another server whose span covers [s, e) (never the hop's own node nor one found
  faulty; one off the route when there is one) holds a standing session (`_Standing`, kept
  across checks) whose cache holds the hop's blocks over the hop's stored inputs; each check
  sends it the positions since the last one and compares its outputs with the hop's position by
  position (the relative L2 error over the hidden size). A new checker gets every position from
  0, so the checker's cache always covers [0, P): a node that perturbs even a single step is
  caught at the next check after it.
* Who is wrong: a mismatch (an error above `tolerance` at some position) is settled by a third
  server when one covers the blocks; whoever disagrees with the other two is faulty. With no
  third server the hop's node is taken as faulty (the client drew the checker at random; a node
  cannot choose to check itself).
* Then (`pipeline._chain.Chain`): the faulty node is excluded from this client's routes
  (`RouteOptions.faulty`), logged and counted in `SpotCheckStats`. When it was on the route, the
  whole route is rebuilt without it from the client's own inputs (the embeddings it computed,
  never a node's output), so every cache holds verified values again and the checked step's
  output is recomputed. When the first wrong output came before the checked step, the tokens
  chosen since were chosen from wrong logits: the step raises `Redo` and the generation starts
  again from its prompt (`pipeline._generation`: seeded sampling draws the same numbers; tokens
  already streamed are not streamed twice, and a call whose streamed tokens turn out to differ
  fails with `SpotCheckError` rather than leave wrong text on screen).

What it costs: a check replays P positions on one server per hop (a prefill's work, batched),
so it grows with the session's length; `scripts/bench_spotcheck.py` measures it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import torch
import trio

import p2p
from crdt import peer_id_to_str

from ._errors import InvalidOptionError
from ._generation import Redo
from ._routing import Hop, RouteOptions, usable
from ._swarm import now_ms
from .protocol import (INFERENCE_PROTOCOL, CloseSession, OpenSession, Replay, SessionOpened, Step, StepFailed,
                       StepResult, new_session_id)

log = logging.getLogger("lamina.client")

DEFAULT_TOLERANCE = 1e-2  # relative L2 error per position; honest fp32 nodes differ by ~1e-6
# ...with an int8 wire format (`_wire_format`), whose rounding alone reaches ~6e-3 on SmolLM2
INT8_TOLERANCE = 3e-2


@dataclass
class SpotCheckStats:
    """A client's spot-checking so far (shared by its sessions): `model.spot_check_stats`."""

    steps: int = 0          # steps checked
    hops: int = 0           # hops compared with a second server
    unchecked: int = 0      # hops not compared: no other server covers them, or none answered
    mismatches: int = 0     # comparisons beyond the tolerance
    rebuilds: int = 0       # routes rebuilt without a faulty node
    redos: int = 0          # generations started again from their prompt
    faulty: dict[str, str] = field(default_factory=dict)  # peer id -> what was found
    caught_at: dict[str, int] = field(default_factory=dict)  # peer id -> steps its chain had run then


def check_rate(rate: Any) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise InvalidOptionError(f"spot_check must be a fraction of steps in [0, 1], got {rate!r}")
    return float(rate)


class Sampler:
    """Which steps are checked: one at random in each window of round(1/rate) steps."""

    def __init__(self, rate: float, rng: random.Random | None = None) -> None:
        rate = check_rate(rate)
        self.window = max(1, round(1.0 / rate)) if rate > 0 else 0
        self._rng = rng if rng is not None else random.Random()
        self.steps = 0  # steps seen
        self._pick = -1

    def sample(self) -> bool:
        """Whether the next step is checked (call once per step)."""
        self.steps += 1
        if not self.window:
            return False
        i = (self.steps - 1) % self.window
        if i == 0:
            self._pick = self._rng.randrange(self.window)
        return i == self._pick


def compare(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> tuple[float, int | None]:
    """The largest relative error per position between two [B, P, D] outputs, and the first
    position where it exceeds `tolerance` (None: they agree). Non-finite values or another shape
    are a mismatch at position 0."""
    if got.shape != want.shape:
        return float("inf"), 0
    a, b = got.float(), want.float()
    err = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).amax(dim=0)  # [P]
    bad = ~torch.isfinite(err) | (err > tolerance)
    if not bool(bad.any()):
        return float(err.max()) if err.numel() else 0.0, None
    return float(err.nan_to_num(float("inf")).max()), int(bad.nonzero()[0, 0])


def held_inputs(history: Any, end: int, join: Callable[[list[torch.Tensor]], torch.Tensor]
                ) -> Callable[[int], torch.Tensor | None]:
    """What crossed each block boundary at positions [0, end), from a chain's history
    (`_failover.History`), its chunks joined by `join` (`WireCodec.replay`: as one Replay
    sends them); None where it is not all held (an echo that never came)."""
    def inputs(boundary: int) -> torch.Tensor | None:
        try:
            chunks = history.replay(boundary, end)
        except ValueError:
            return None
        return join([h for _, _, h in chunks]) if chunks else None

    return inputs


@dataclass(frozen=True)
class Fault:
    """A node found returning wrong outputs for blocks [start, end), first at `position`."""

    peer: str
    start: int
    end: int
    position: int
    error: float


Connect = Callable[[Hop], Awaitable[None]]


class SpotChecker:
    """One chain's checks (see the module docstring). `check` does the I/O and finds faults;
    acting on them is the chain's."""

    def __init__(self, host: p2p.Host, view: Any, model_hash: str, *, rate: float, tolerance: float,
                 stats: SpotCheckStats, options: RouteOptions, connect: Connect, timeout: float,
                 batch: int, max_length: int, plain: torch.dtype,
                 decode: Callable[[torch.Tensor], torch.Tensor] = lambda wire: wire,
                 rng: random.Random | None = None) -> None:
        self.host, self.view, self.model_hash = host, view, model_hash
        self.batch, self.max_length = batch, max_length
        self.plain = plain  # the session's wire dtype: stored inputs of another dtype go as a Replay
        self.nursery: trio.Nursery | None = None  # the chain's: standing sessions run there
        self._standing: dict[tuple[int, int], _Standing] = {}
        self.sampler = Sampler(rate, rng)
        self.tolerance = float(tolerance)
        self.stats, self.options = stats, options
        self.faulty = options.faulty  # the client's: its routes avoid these nodes
        self._connect, self._timeout = connect, timeout
        self._decode = decode  # a result as received (the session's wire form) -> values
        self._rng = rng if rng is not None else random.Random()

    async def check(self, hops: list[tuple[str, int, int]], inputs: Callable[[int], torch.Tensor | None],
                    dtype: str, excluded: set[str]) -> list[Fault]:
        """Compare every hop (peer, start, end) with a second server (never one in
        `excluded`), on sessions of wire format `dtype` (`OpenSession.dtype`). `inputs(b)` is
        what crossed block boundary b at every position so far ([B, P, D]; None when not held):
        a hop's input is `inputs(start)`, its output `inputs(end)`."""
        self.stats.steps += 1
        faults: list[Fault] = []
        on_route = {peer for peer, _, _ in hops}

        async def one(peer: str, start: int, end: int) -> None:
            x, y = inputs(start), inputs(end)
            fault = None if x is None or y is None else \
                await self._check_hop(peer, start, end, x, y, dtype, on_route, excluded)
            if fault is not None:
                faults.append(fault)

        async with trio.open_nursery() as nursery:
            for peer, start, end in hops:
                nursery.start_soon(one, peer, start, end)
        return faults

    async def _check_hop(self, peer: str, start: int, end: int, x: torch.Tensor, y: torch.Tensor,
                         dtype: str, on_route: set[str], excluded: set[str]) -> Fault | None:
        candidates = self._checkers(peer, start, end, on_route, excluded)
        second = await self._standing_run(candidates, start, end, x, dtype)
        if second is None:
            self.stats.unchecked += 1
            log.info("spot check: no second server answered for blocks [%d:%d) of %s", start, end, peer)
            return None
        checker, since, z = second
        self.stats.hops += 1
        err, first = compare(y[:, since:], z, self.tolerance)
        if first is None:
            return None
        first += since
        self.stats.mismatches += 1
        log.warning("spot check: node %s and node %s disagree on blocks [%d:%d) from position %d "
                    "(relative error %.3g > %.3g)", peer, checker, start, end, first, err, self.tolerance)
        third = await self._recompute_any([c for c in candidates if c.peer_id != checker], start, end, x, dtype)
        if third is not None and compare(y, third[1], self.tolerance)[1] is None \
                and compare(z, third[1][:, since:], self.tolerance)[1] is not None:
            self._mark(checker, f"its outputs for blocks [{start}:{end}) disagreed with {peer}'s and "
                                f"{third[0]}'s (relative error {err:.3g})")
            self._drop((start, end))
            return Fault(checker, start, end, first, err)
        why = (f"its outputs for blocks [{start}:{end}) disagreed with {checker}'s"
               + (f" and {third[0]}'s" if third is not None else " (no third server to ask)")
               + f" from position {first} (relative error {err:.3g})")
        self._mark(peer, why)
        return Fault(peer, start, end, first, err)

    # -- standing sessions -----------------------------------------------------------------------
    def written_from(self, position: int) -> None:
        """The chain stepped at `position`: what the standing sessions hold from there on is
        older inputs (a step rewrites the positions it covers)."""
        for standing in self._standing.values():
            standing.upto = min(standing.upto, position)

    def restart(self) -> None:
        """Every stored output was replaced (a rebuilt route): check everything again."""
        for standing in self._standing.values():
            standing.upto = 0

    def close(self) -> None:
        for key in list(self._standing):
            self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        standing = self._standing.pop(key, None)
        if standing is not None:
            standing.send.close()

    async def _standing_run(self, candidates: list[Hop], start: int, end: int, x: torch.Tensor,
                            dtype: str) -> tuple[str, int, torch.Tensor] | None:
        """(checker, since, its outputs for positions [since, P)) from the standing session for
        [start, end), opened on a candidate first if there is none (or its node may not check
        this hop now)."""
        key = (start, end)
        standing = self._standing.get(key)
        if standing is not None and standing.hop.peer_id not in {c.peer_id for c in candidates}:
            self._drop(key)
            standing = None
        tries = [standing.hop] if standing is not None else candidates[:2]
        for hop in tries:
            try:
                if standing is None:
                    standing = _Standing(hop)
                    assert self.nursery is not None
                    await self.nursery.start(standing.serve, self, dtype)
                    self._standing[key] = standing
                since = standing.upto
                out = await standing.run(self, x, since)
                standing.upto = x.shape[1]
                return hop.peer_id, since, out
            except (p2p.P2PError, trio.TooSlowError, trio.BrokenResourceError, OSError, _CheckRefused) as e:
                log.info("spot check: %s could not recompute blocks [%d:%d): %s", hop.peer_id, start, end,
                         "timed out" if isinstance(e, trio.TooSlowError) else e)
                self._drop(key)
                standing = None
        return None

    def _mark(self, peer: str, why: str) -> None:
        self.faulty[peer] = why
        self.stats.faulty[peer] = why
        self.stats.caught_at[peer] = self.sampler.steps
        log.warning("spot check: node %s is faulty: %s; not routing through it again", peer, why)

    def _checkers(self, peer: str, start: int, end: int, on_route: set[str], excluded: set[str]) -> list[Hop]:
        """Servers that could recompute [start, end): covering it, not `peer`, not faulty nor
        excluded, in random order with the ones off the route first."""
        records = [r for r in self.view.servers(self.model_hash)
                   if r.start <= start and end <= r.end and usable(r, now_ms(), 0, self.options)]
        hops = [Hop(peer_id_to_str(r.peer_id), start, end, tuple(r.addrs)) for r in records]
        hops = [h for h in hops if h.peer_id != peer and h.peer_id not in excluded]
        self._rng.shuffle(hops)
        hops.sort(key=lambda h: h.peer_id in on_route)
        return hops

    async def _recompute_any(self, candidates: list[Hop], start: int, end: int, x: torch.Tensor,
                             dtype: str) -> tuple[str, torch.Tensor] | None:
        for hop in candidates[:2]:
            try:
                return hop.peer_id, await self._recompute(hop, x, dtype)
            except (p2p.P2PError, trio.TooSlowError, OSError, _CheckRefused) as e:
                log.info("spot check: %s could not recompute blocks [%d:%d): %s", hop.peer_id, start, end,
                         "timed out" if isinstance(e, trio.TooSlowError) else e)
        return None

    async def _recompute(self, hop: Hop, x: torch.Tensor, dtype: str) -> torch.Tensor:
        """Hop's blocks over x [B, P, D] from position 0, in one replay on a fresh session."""
        sid = new_session_id()
        b, p, _ = x.shape
        with trio.fail_after(self._timeout):
            if not self.host.is_connected(hop.peer_id):
                await self._connect(hop)
            async with self.host.open_session(hop.peer_id, INFERENCE_PROTOCOL, lane=True) as session:
                await session.send(OpenSession(session_id=sid, model=self.model_hash, start=hop.start,
                                               end=hop.end, max_length=p, batch=b, dtype=dtype))
                reply = await session.receive()
                if not isinstance(reply, SessionOpened) or reply.session_id != sid:
                    raise _CheckRefused(f"expected SessionOpened, got {type(reply).__name__}")
                await session.send(Replay(session_id=sid, step_ids=(0,), chunks=(p,),
                                          hidden=p2p.Tensor.from_torch(x.contiguous()), push=False))
                while True:
                    msg = await session.receive()
                    if isinstance(msg, StepFailed):
                        raise _CheckRefused(f"{msg.code}: {msg.message}")
                    if isinstance(msg, StepResult) and msg.session_id == sid and msg.step_id == 0:
                        out = self._decode(msg.hidden.to_torch())
                        break
                await session.send(CloseSession(session_id=sid))
        if out.shape != x.shape:
            raise _CheckRefused(f"a result of shape {tuple(out.shape)} for inputs {tuple(x.shape)}")
        return out


class _CheckRefused(Exception):
    pass


@dataclass(eq=False)
class _Reply:
    done: trio.Event = field(default_factory=trio.Event)
    out: torch.Tensor | None = None
    error: BaseException | None = None


class _Standing:
    """A session on a checking server, kept open across one chain's checks of one hop: its cache
    holds the hop's blocks over the same inputs at [0, upto), so a check sends it only the
    positions since (a Step; a Replay from 0 when the stored inputs mix wire forms)."""

    def __init__(self, hop: Hop) -> None:
        self.hop = hop
        self.upto = 0
        self.session_id = new_session_id()
        self.step_id = 0
        self.send, self._requests = trio.open_memory_channel[tuple[p2p.Message, _Reply]](0)

    async def run(self, checker: SpotChecker, x: torch.Tensor, since: int) -> torch.Tensor:
        """The hop's blocks over x [B, P, D] at positions [since, P), as values."""
        self.step_id += 1
        b, p, _ = x.shape
        if x.dtype == checker.plain:
            msg: p2p.Message = Step(self.session_id, self.step_id, since,
                                    p2p.Tensor.from_torch(x[:, since:].contiguous()), False)
        else:
            msg = Replay(session_id=self.session_id, step_ids=(self.step_id,), chunks=(p,),
                         hidden=p2p.Tensor.from_torch(x.contiguous()), push=False)
        reply = _Reply()
        with trio.fail_after(checker._timeout):
            await self.send.send((msg, reply))
            await reply.done.wait()
        if reply.error is not None:
            raise reply.error
        assert reply.out is not None
        out = reply.out if isinstance(msg, Step) else reply.out[:, since:]
        if out.shape != (b, p - since, x.shape[2]):
            raise _CheckRefused(f"a result of shape {tuple(out.shape)} for {p - since} positions")
        return out

    async def serve(self, checker: SpotChecker, dtype: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the session (open it, answer `run`'s requests one by one, close it). A failure to
        open is raised to the opener; a later one ends the session, and the request it hit
        gets it (`_Standing.run`)."""
        started = False
        try:
            with self._requests:
                await self._open(checker, dtype, task_status)
                started = True
        except (p2p.P2PError, trio.TooSlowError, OSError, _CheckRefused) as e:
            if not started:
                raise
            log.info("spot check: the session on %s ended: %s", self.hop.peer_id, e)

    async def _open(self, checker: SpotChecker, dtype: str, task_status) -> None:
        hop, sid = self.hop, self.session_id
        with trio.fail_after(checker._timeout):
            if not checker.host.is_connected(hop.peer_id):
                await checker._connect(hop)
        async with checker.host.open_session(hop.peer_id, INFERENCE_PROTOCOL, lane=True) as session:
            with trio.fail_after(checker._timeout):
                await session.send(OpenSession(session_id=sid, model=checker.model_hash, start=hop.start,
                                               end=hop.end, max_length=checker.max_length,
                                               batch=checker.batch, dtype=dtype))
                reply = await session.receive()
            if not isinstance(reply, SessionOpened) or reply.session_id != sid:
                raise _CheckRefused(f"expected SessionOpened, got {type(reply).__name__}")
            task_status.started()
            async for msg, answer in self._requests:
                try:
                    answer.out = checker._decode(await _result(session, msg, sid))
                except (p2p.P2PError, _CheckRefused) as e:
                    answer.error = e
                    raise
                finally:
                    answer.done.set()
            with trio.move_on_after(2):
                await session.send(CloseSession(session_id=sid))


async def _result(session: p2p.Session, msg: p2p.Message, sid: str) -> torch.Tensor:
    """Send a Step or Replay (its id the last of `msg`'s) and read its StepResult."""
    step_id = msg.step_id if isinstance(msg, Step) else msg.step_ids[-1]
    await session.send(msg)
    while True:
        reply = await session.receive()
        if isinstance(reply, StepFailed):
            raise _CheckRefused(f"{reply.code}: {reply.message}")
        if isinstance(reply, StepResult) and reply.session_id == sid and reply.step_id == step_id:
            return reply.hidden.to_torch()
