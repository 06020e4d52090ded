"""An inference session over a push chain of nodes, with failover and replay (async core).

The client opens one `/lamina/inference/1` stream per hop and wires each hop to push its output
straight to the next one. A step goes client -> n1 -> n2 -> ... and the last node's output comes
back to the client; every node also echoes its output to the client, which keeps each span
boundary's inputs (`_failover.History`) so it can replay them. What to do when is decided by
`_failover.Plan` (no I/O); this module does the I/O it calls for.

Failover: a hop whose stream breaks (SIGKILL: milliseconds), whose stream goes silent (SIGSTOP:
the p2p heartbeat watchdog, about 2.2 s), or that lets a step's deadline pass, is replaced by
one or more servers covering exactly its blocks (chosen from the swarm view, excluding failed
peers; waiting up to `failover_deadline` for one to appear). The replacement gets the lost
span's stored inputs replayed in their original chunking (same shapes: bit-identical when run
alone), is wired between the surviving neighbours, and the interrupted step is resent from the
replacement. Downstream caches stay valid: a resent step rewrites the same positions with the
same values. The number of failovers per step is bounded.

A node that cannot push to the next one (a NAT or firewall between two nodes the client itself
reaches) reports `PushFailed`; the client then tells it to stop pushing and relays between the
two itself for the rest of the session: one more hop per step, the same tokens. The client
remembers the pair (`UNPUSHABLE_TTL`), so its next sessions relay between them from the start.

A link that broke because its node dropped our session (this client paused past the heartbeat
timeout, or idled past the node's idle timeout) is not a failed node: when the node says so or
answers a probe, the session is re-opened on it and replayed (`Chain._session_lost`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import trio

import p2p
from crdt import peer_id_to_str

from ._errors import InvalidOptionError, LaminaError
from ._failover import ALIVE, PROBE, Finished, LinkState, Plan, Refused, Relay, Replace, Send, verdict
from .protocol import (INFERENCE_PROTOCOL, CloseSession, OpenSession, PushFailed, Replay, SessionOpened, SetNextHop,
                        Step, StepFailed, StepResult, new_session_id)
from ._routing import DISTRUST_TTL, Hop, NoRouteError, RouteOptions, choose_route, describe_route
from ._spotcheck import DEFAULT_TOLERANCE, INT8_TOLERANCE, Redo, SpotChecker, SpotCheckStats, check_rate, held_inputs
from ._probe import answers, connect, learn_addrs, round_trip_ms
from ._swarm import now_ms
from ._wire_format import WireCodec, WireFormat

log = logging.getLogger("lamina.client")


class RemoteStepError(LaminaError):
    """A node refused a step as malformed: a bug or a mismatch, not a failure to route around."""


class NoReplacementError(LaminaError):
    """A span was lost and no server for it appeared within the failover deadline."""


class LostInputsError(LaminaError):
    """The client no longer holds the inputs a replacement must replay (a bug if it happens)."""


class TooManyFailuresError(LaminaError):
    """A step failed over more often than `max_failovers`."""


@dataclass(frozen=True)
class ChainConfig:
    open_timeout: float = 15.0          # open a session on one node
    step_timeout: float = 30.0          # a step's final result, beyond which the slow hop is replaced
    failover_deadline: float = 30.0     # wait this long for a replacement server to appear
    max_failovers: int = 8              # per step
    route_options: RouteOptions = field(default_factory=RouteOptions)
    show_route: bool = False
    # the client carries every hop's output to the next node, as it does for nodes that cannot
    # push to each other (2n link latencies per step instead of n+1): for comparisons
    client_relays: bool = False
    # re-run this fraction of the steps on second servers and compare (`pipeline._spotcheck`)
    spot_check: float = 0.0
    spot_check_tolerance: float = DEFAULT_TOLERANCE
    spot_check_stats: SpotCheckStats = field(default_factory=SpotCheckStats)  # shared by the client's sessions
    wire_format: str | None = None   # how hidden states travel (`_wire_format`); None: in `dtype`

    def __post_init__(self) -> None:
        WireFormat.parse(self.wire_format)   # a bad one fails in from_pretrained, not at a session
        check_rate(self.spot_check)
        tolerance = self.spot_check_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise InvalidOptionError(f"spot_check_tolerance must be a positive number, got {tolerance!r}")


RTT_REFRESH = 60.0      # seconds before the client measures its RTT to a server again
UNPUSHABLE_TTL = 300.0  # seconds a pair that could not push is relayed without trying again
FORGIVE_INTERVAL = 3.0  # with no route left, an excluded node is probed again at most this often


def unpushable_pairs() -> p2p.ExpiringSet:
    """The client's memory of node pairs that could not push (see `Chain`)."""
    return p2p.ExpiringSet(UNPUSHABLE_TTL)


@dataclass(eq=False, kw_only=True)
class _Link(LinkState):
    """One hop of the chain: what the plan knows of it, plus its node's session and stream."""

    hop: Hop
    session: p2p.Session
    cancel: trio.CancelScope            # of the task that owns the stream (see Chain._run_link)
    # The last link's stream is read by the stepping task itself while all is well (see
    # Chain._read_final): `lent` is set then, and the link's own task waits for it to be set.
    lent: trio.Event | None = None
    reading: trio.CancelScope | None = None  # the link task's reading, to stop it when lent


class Chain:
    """A session through the swarm covering blocks [0, num_blocks). Use `open`/`step`/`close`.
    The decisions are `_failover.Plan`'s; this class does the I/O they call for."""

    def __init__(self, host: p2p.Host, view, model_hash: str, num_blocks: int, *, batch: int,
                 max_length: int, dtype: torch.dtype, config: ChainConfig,
                 unpushable: p2p.ExpiringSet | None = None, hidden_size: int | None = None) -> None:
        self.host, self.view, self.model_hash = host, view, model_hash
        # (upstream, downstream) peers where the upstream could not push lately; shared by one
        # client's sessions, so a new session relays between them from its first step instead
        # of waiting out the node's push grace again (a path may heal: entries expire)
        self.unpushable = unpushable if unpushable is not None else unpushable_pairs()
        self.num_blocks, self.batch, self.max_length = num_blocks, batch, max_length
        self.dtype, self.config = dtype, config
        self.wire = WireCodec(WireFormat.parse(config.wire_format), dtype, hidden_size)  # history: wire form
        self.plan = Plan(num_blocks, config.max_failovers)
        self.position = 0
        self.reopened = 0                                   # sessions re-opened on a live node
        self._excluded: set[str] = set()
        self._probed: dict[str, float] = {}                 # excluded peer -> when last probed (_forgive)
        self._next_step = 0
        self._changed = trio.Event()
        self._fast: _Link | None = None                     # the link Chain._read_final reads
        self._deadline = math.inf                            # of the step under way (see _watch_deadline)
        self._timer = trio.CancelScope()                     # _watch_deadline's, until close
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._timing = (-1, 0.0, 0)  # (step id, when the last echo of it came, failovers then)
        self._spot: SpotChecker | None = None
        if config.spot_check > 0:
            tolerance = config.spot_check_tolerance
            if self.wire.int8_from is not None and tolerance == DEFAULT_TOLERANCE:
                tolerance = INT8_TOLERANCE
            self._spot = SpotChecker(host, view, model_hash, rate=config.spot_check, tolerance=tolerance,
                                     stats=config.spot_check_stats, options=config.route_options,
                                     connect=partial(connect, self.host), timeout=config.step_timeout, batch=batch,
                                     max_length=max_length, plain=self.wire.dtype, decode=self.wire.decode)
            self.plan.keep_final = True

    @property
    def links(self) -> list[_Link]:
        return self.plan.links  # type: ignore[return-value]  # the driver puts only _Links there

    @links.setter
    def links(self, links: list[_Link]) -> None:
        self.plan.links = links  # type: ignore[assignment]

    @property
    def failovers(self) -> int:
        """Failovers over the chain's life (re-opened sessions included)."""
        return self.plan.failovers

    # --- lifecycle ---------------------------------------------------------------------
    async def open(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if self._spot is not None:
            self._spot.nursery = nursery
        self._deadline = trio.current_time() + self.config.step_timeout
        nursery.start_soon(self._watch_deadline)
        deadline = trio.current_time() + self.config.failover_deadline
        while True:
            route = await self._route(0, self.num_blocks, deadline=deadline)
            try:
                self.links = await self._open_links(route, None)
                break
            except _OpenFailed as e:          # busy, draining, unreachable: route around it
                self._excluded.add(e.peer_id)
        if self.config.show_route:
            log.warning("route: %s", describe_route([link.hop for link in self.links]))

    @property
    def route(self) -> list[Hop]:
        return [link.hop for link in self.links]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if self._spot is not None:
            self._spot.close()
        for link in self.links:
            await self._drop(link, polite=True)
        self.links = []

    # --- stepping ----------------------------------------------------------------------
    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run every block on hidden [B, T, D] at `position`; returns the last block's output."""
        if self._closed:
            raise LaminaError("this inference session is closed")
        b, t, _ = hidden.shape
        if b != self.batch:
            raise ValueError(f"this session was opened for batch {self.batch}, got {b}")
        if position + t > self.max_length:
            raise ValueError(f"positions up to {position + t} exceed the session's max_length "
                             f"{self.max_length}")
        if position > self.position:
            raise ValueError(f"step at {position} but the session holds {self.position} positions")
        hidden = self.wire.encode(hidden)
        if self._spot is not None:
            self._spot.written_from(position)
        step_id = self._next_step
        self._next_step += 1
        self.plan.begin(step_id, position, hidden)
        # one-token steps without failover time each hop for the router (`observe_hop`)
        self._timing = (step_id if t == 1 else -1, trio.current_time(), self.plan.failovers)
        try:
            await self._send_step(self.links[0], step_id, position, hidden)
        except p2p.P2PError as e:    # failover takes it from here
            self.plan.on_broken(self.links[0], e)
        self._deadline = trio.current_time() + self.config.step_timeout
        out = await self._read_final()
        if out is None:
            out = await self._await_final(position)
        self.position = position + t
        if self._spot is not None and self._spot.sampler.sample():
            out = await self._spot_check(step_id, position, out)
        return self.wire.decode(out)

    async def _read_final(self) -> torch.Tensor | None:
        """The usual case, without a task switch per step: read the last link's stream in this
        task until the step's result arrives. None as soon as anything needs attention (a
        broken link, a refused step or push, the deadline: `_wake` interrupts the read): the
        link's own task then reads it again and `_await_final` takes over."""
        final = self.links[-1]
        session = final.session
        plan = self.plan
        if not plan.quiet():
            self._give_back(final)
            return None
        if final.lent is None:  # stop the link's task reading (it waits until given back)
            final.lent = trio.Event()
            if final.reading is not None:
                final.reading.cancel()
        self._fast = final
        try:
            while (out := plan.take_final()) is None and final.broken is None:
                self._on_message(final, await session.receive())
        except p2p.ReceiveInterrupted:
            out = plan.take_final()
        except (p2p.P2PError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            plan.on_broken(final, e)
            out = plan.take_final()
        finally:
            self._fast = None
            session.clear_interrupt()
        if out is None:
            self._give_back(final)
        return out

    async def _watch_deadline(self) -> None:
        """Interrupt `_read_final` when a step's deadline passes. The stepping task only moves
        `_deadline` on (no timer per step): this task sleeps until the deadline it last saw
        and, when that turns out to have moved, sleeps again, so it wakes about once per
        `step_timeout` while steps keep coming."""
        with self._timer:
            while True:
                deadline = self._deadline
                await trio.sleep_until(deadline)
                if self._deadline == deadline:  # not moved on: the step (if any) is late
                    self._wake(urgent=True)
                    await trio.sleep(self.config.step_timeout)

    def _give_back(self, link: _Link) -> None:
        if link.lent is not None:
            lent, link.lent = link.lent, None
            lent.set()

    async def _await_final(self, position: int) -> torch.Tensor:
        """The general loop: do what the plan says until the step's result is in."""
        plan = self.plan
        while True:
            action = plan.next_action(position)
            if action is None:
                if trio.current_time() >= self._deadline:
                    plan.deadline_passed(position, f"no result from {{peer}} within {self.config.step_timeout} s")
                    continue
                changed = self._changed
                with trio.move_on_at(self._deadline):
                    await changed.wait()
            elif isinstance(action, Finished):
                return action.output
            elif isinstance(action, Send):
                try:
                    await self._send_step(action.link, action.step_id, action.position, action.hidden)  # type: ignore[arg-type]
                except p2p.P2PError as e:
                    plan.on_broken(action.link, e)
            elif isinstance(action, Relay):
                await self._start_relay(action.up, action.link)  # type: ignore[arg-type]
            elif isinstance(action, Replace):
                await self._replace(action.link, position)  # type: ignore[arg-type]
                self._deadline = trio.current_time() + self.config.step_timeout
            elif isinstance(action, Refused):
                raise RemoteStepError(f"node refused the step ({action.code}): {action.message}")
            else:
                bad = next((link for link in self.links if link.broken is not None), None)
                raise TooManyFailuresError(action.message) from (bad.broken if bad else None)

    async def _start_relay(self, up: _Link, link: _Link) -> None:
        """The path between two nodes broke, not necessarily either node: the upstream stops
        pushing, and from now on the client carries its results to the link (this step
        included, from the upstream's echo). A dead link shows up as its own broken stream."""
        log.warning("node %s cannot push to %s; the client relays between them",
                    up.hop.peer_id, link.hop.peer_id)
        self.unpushable.add((up.hop.peer_id, link.hop.peer_id))
        try:
            await self._wire(up, link)
        except (p2p.P2PError, trio.TooSlowError) as e:
            self.plan.on_broken(up, e)

    async def _send_step(self, link: _Link, step_id: int, position: int, hidden: torch.Tensor) -> None:
        # no deadline of our own: the session's watchdog fails a write the node stops taking
        await link.session.send(Step(link.session_id, step_id, position, p2p.Tensor.from_torch(hidden), True))

    # --- failover ----------------------------------------------------------------------
    async def _replace(self, bad: _Link, position: int) -> None:
        """Swap `bad` for server(s) covering its blocks; the plan resends the step from there."""
        i = self.links.index(bad)
        peer = bad.hop.peer_id
        same_node = self.plan.reopen(peer) and await self._session_lost(bad)
        if same_node:
            self.reopened += 1
            log.warning("session on node %s [%d:%d) was lost (%s), but the node answers: re-opening "
                        "a session on it and replaying", peer, bad.start, bad.end, bad.broken)
        else:
            log.warning("node %s [%d:%d) failed (%s); rerouting", peer, bad.start, bad.end, bad.broken)
            self._excluded.add(peer)
        await self._drop(bad, polite=False)
        deadline = trio.current_time() + self.config.failover_deadline
        while True:
            nxt = self.links[i + 1] if i + 1 < len(self.links) else None
            if same_node:   # first the node that lost the session; then whatever the router finds
                route, same_node = [bad.hop], False
            else:
                route = await self._route(bad.start, bad.end, deadline=deadline)
            new = await self._open_replayed(route, bad.start, position, nxt)
            if new is None:
                continue
            self.plan.replaced(bad, new)
            if i > 0:
                up = self.links[i - 1]
                try:
                    await self._wire(up, new[0])
                except (p2p.P2PError, trio.TooSlowError) as e:   # the upstream failed too: next round
                    self.plan.on_broken(up, e)
            if self.config.show_route:
                log.warning("new route: %s", describe_route(self.route))
            return

    async def _open_replayed(self, route: list[Hop], boundary: int, position: int,
                             nxt: _Link | None) -> list[_Link] | None:
        """Sessions on `route`, their caches rebuilt from the inputs stored at `boundary` before
        `position`, the last one wired to `nxt`; None when a node of it fails (excluded)."""
        try:
            # the new hops push to each other during the replay: no relaying among them
            new = await self._open_links(route, None, may_relay=False)
        except _OpenFailed as e:
            self._excluded.add(e.peer_id)
            return None
        try:
            await self._replay(new, boundary, position)
            if nxt is not None:
                try:
                    await self._wire(new[-1], nxt)
                except (p2p.P2PError, trio.TooSlowError) as e:
                    self.plan.on_broken(new[-1], e)
                    raise
        except (p2p.P2PError, trio.TooSlowError, _ReplayFailed) as e:
            culprit = next((link for link in new if link.broken is not None), new[0])
            log.warning("replacement %s failed during replay (%s)", culprit.hop.peer_id, e)
            self._excluded.add(culprit.hop.peer_id)
            for link in new:
                await self._drop(link, polite=False)
            return None
        return new

    async def _session_lost(self, link: _Link) -> bool:
        """Whether `link` broke because its node dropped our session, not because the node
        failed (`_failover.verdict`). When the stream just ended, the node must answer an
        InfoRequest on a fresh stream, serving our model and blocks, ONLINE."""
        err = link.broken
        found = verdict(err, code=err.code if isinstance(err, p2p.RemoteError) else None,
                        silent=isinstance(err, (p2p.PeerFrozenError, p2p.PeerTimeoutError)))
        if found != PROBE:
            return found == ALIVE
        return await self._answers(link.hop.peer_id, link.start, link.end)

    async def _replay(self, new: list[_Link], boundary: int, position: int) -> None:
        """Rebuild the new links' caches from the inputs stored at `boundary` before `position`."""
        try:
            chunks = self.plan.history.replay(boundary, position)
        except ValueError as e:   # not the replacement's fault: no other node would do better
            raise LostInputsError(f"cannot rebuild the session's caches from block {boundary}: {e}") from None
        if not chunks:
            return
        step_ids = [sid for _, sid, _ in chunks]      # the new hops push to each other already
        msg = Replay(session_id=new[0].session_id, step_ids=tuple(step_ids),
                     chunks=tuple(h.shape[1] for _, _, h in chunks),
                     hidden=p2p.Tensor.from_torch(self.wire.replay([h for _, _, h in chunks])),
                     push=len(new) > 1)
        last = new[-1]
        with trio.fail_after(self.config.step_timeout):
            await new[0].session.send(msg)
            while True:
                broken = next((link for link in new if link.broken is not None), None)
                if broken is not None:
                    raise _ReplayFailed(f"{broken.hop.peer_id} broke during replay: {broken.broken}")
                if self.plan.latest.get(last.session_id, -1) >= step_ids[-1]:
                    return
                changed = self._changed
                await changed.wait()

    # --- spot checks -------------------------------------------------------------------
    async def _spot_check(self, step_id: int, position: int, out: torch.Tensor) -> torch.Tensor:
        """Compare every hop's outputs so far with other servers' (`pipeline._spotcheck`). With
        a faulty node on the route, rebuild the route without it and return this step's output
        recomputed; raise `Redo` when the outputs of earlier steps were wrong too."""
        assert self._spot is not None
        end, history = self.position, self.plan.history
        # nodes echo to the client after pushing on: the final result may come before an echo
        with trio.move_on_after(self.config.step_timeout):
            while any(self.plan.latest.get(link.session_id, -1) < step_id for link in self.links[:-1]):
                changed = self._changed
                await changed.wait()
        hops = [(link.hop.peer_id, link.start, link.end) for link in self.links]
        faults = await self._spot.check(hops, held_inputs(history, end, self.wire.replay), self.wire.name,
                                        self._excluded)
        route = {peer for peer, _, _ in hops}
        found = [f for f in faults if f.peer in route]
        if not found:
            return out
        self._excluded.update(f.peer for f in found)
        out = await self._rebuild(end)
        first = min(found, key=lambda f: f.position)
        if first.position < position:
            self._spot.stats.redos += 1
            raise Redo(first.position, first.peer)
        return out

    async def _rebuild(self, position: int) -> torch.Tensor:
        """A new route for every block, without the excluded nodes, its caches rebuilt from the
        client's own inputs for [0, position); returns the current step's output from it."""
        self._spot.stats.rebuilds += 1  # type: ignore[union-attr]
        old, self.links = self.links, []
        for link in old:
            await self._drop(link, polite=True)
        self.plan.history.forget_outputs()   # they were computed from the faulty node's
        self._spot.restart()  # type: ignore[union-attr]
        deadline = trio.current_time() + self.config.failover_deadline
        new = None
        while new is None:
            new = await self._open_replayed(await self._route(0, self.num_blocks, deadline=deadline), 0,
                                            position, None)
        self.links, self._deadline = new, trio.current_time() + self.config.step_timeout
        log.warning("route rebuilt without the faulty node: %s", describe_route(self.route))
        out = self.plan.take_final()
        if out is None:   # the replay waited for the last link's echo of this step
            raise LaminaError("the rebuilt route did not return the step's output")
        return out

    # --- opening links -----------------------------------------------------------------
    async def _route(self, start: int, end: int, deadline: float | None = None) -> list[Hop]:
        deadline = deadline if deadline is not None else trio.current_time() + self.config.failover_deadline
        while True:
            try:
                return choose_route(self.view.servers(self.model_hash), start, end,
                                    now_ms=now_ms(),
                                    needed_tokens=self.batch * self.max_length,
                                    options=self.config.route_options, excluded=self._excluded)
            except NoRouteError as e:
                if await self._forgive(start, end):
                    continue
                if trio.current_time() >= deadline:
                    raise NoReplacementError(
                        f"no server for blocks [{start}, {end}) within the "
                        f"{self.config.failover_deadline:.0f} s failover deadline: {e}") from None
                with trio.move_on_at(min(deadline, trio.current_time() + FORGIVE_INTERVAL)):
                    await self.view.wait_changed()

    async def _forgive(self, start: int, end: int) -> bool:
        """With no route left, give the nodes this session excluded for [start, end) a second
        chance: one that answers a probe again (its link broke, e.g. the relay it was reached
        through died, but it lives and serves our blocks) is routable again. At most one probe
        per node every FORGIVE_INTERVAL seconds."""
        now = trio.current_time()
        records = {peer_id_to_str(r.peer_id): r for r in self.view.servers(self.model_hash)} if self._excluded else {}
        forgiven = False
        for peer in sorted(self._excluded):
            record = records.get(peer)
            if (record is None or record.end <= start or end <= record.start
                    or now - self._probed.get(peer, -math.inf) < FORGIVE_INTERVAL):
                continue
            self._probed[peer] = now
            if await self._answers(peer, max(start, record.start), min(end, record.end)):
                log.warning("node %s answers again: routing through it once more", peer)
                self._excluded.discard(peer)
                forgiven = True
        return forgiven

    async def _answers(self, peer: str, start: int, end: int) -> bool:
        """`_probe.answers`, with `peer`'s addresses from its latest record (a node behind a NAT
        that lost a relay has taken another since the route was chosen)."""
        record = next((r for r in self.view.servers(self.model_hash) if peer_id_to_str(r.peer_id) == peer), None)
        if record is not None:
            learn_addrs(self.host, peer, record.addrs)
        return await answers(self.host, peer, self.model_hash, start, end)

    async def _open_links(self, route: list[Hop], nxt: _Link | None, may_relay: bool = True) -> list[_Link]:
        """Open sessions on `route`, last hop first, each pushing to the one after it."""
        links: list[_Link] = []
        for hop in reversed(route):
            try:
                link = await self._open_link(hop, links[0] if links else nxt, may_relay)
            except BaseException:
                for opened in links:
                    await self._drop(opened, polite=True)
                raise
            links.insert(0, link)
        return links

    async def _open_link(self, hop: Hop, nxt: _Link | None, may_relay: bool) -> _Link:
        """Open a session on hop's node. A stream that broke while the connection to the node
        lives is tried once more (seen under heavy load: the node's watchdog gave up on a new
        stream before our OpenSession arrived) before the node is routed around."""
        assert self._nursery is not None
        for attempt in (1, 2):
            try:
                return await self._nursery.start(self._run_link, hop, nxt, may_relay)
            except (p2p.P2PError, trio.TooSlowError, OSError) as e:
                why = "timed out" if isinstance(e, trio.TooSlowError) else (str(e) or repr(e))
                if attempt == 1 and isinstance(e, p2p.PeerBrokenError) and self.host.is_connected(hop.peer_id):
                    log.info("opening a session on %s failed (%s); once more", hop.peer_id, why)
                    continue
                log.info("cannot open a session on %s: %s", hop.peer_id, why)
                if self.config.route_options.distrust_refusal(hop.peer_id, e):
                    log.warning("node %s refused blocks [%d:%d) that its record announces (%s); not routing "
                                "through it for %.0f s", hop.peer_id, hop.start, hop.end, why, DISTRUST_TTL)
                raise _OpenFailed(hop.peer_id) from e
        raise AssertionError("unreachable")

    async def _run_link(self, hop: Hop, nxt: _Link | None, may_relay: bool,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own one node's stream for its whole life: open it, read it, close it (a nursery inside
        the p2p session must be entered and left by the same task)."""
        sid = new_session_id()
        with trio.CancelScope() as cancel:
            with trio.fail_after(self.config.open_timeout):
                if not self.host.is_connected(hop.peer_id):
                    await connect(self.host, hop)
            rtts = self.config.route_options
            if trio.current_time() - rtts.client_rtts_at.get(hop.peer_id, -RTT_REFRESH) >= RTT_REFRESH:
                rtts.client_rtts_at[hop.peer_id] = trio.current_time()
                assert self._nursery is not None
                self._nursery.start_soon(self._measure_rtt, hop.peer_id)
            async with self.host.open_session(hop.peer_id, INFERENCE_PROTOCOL, lane=True) as session:
                relay = may_relay and self._relays(hop, nxt)
                with trio.fail_after(self.config.open_timeout):
                    await session.send(OpenSession(
                        session_id=sid, model=self.model_hash, start=hop.start, end=hop.end,
                        max_length=self.max_length, batch=self.batch,
                        dtype=self.wire.name,
                        next_peer=None if relay or nxt is None else nxt.hop.peer_id,
                        next_session=None if relay or nxt is None else nxt.session_id))
                    reply = await session.receive()
                if not isinstance(reply, SessionOpened) or reply.session_id != sid:
                    raise p2p.RemoteProtocolError(f"expected SessionOpened, got {type(reply).__name__}")
                link = _Link(hop.peer_id, hop.start, hop.end, sid, relay=relay, hop=hop, session=session,
                             cancel=cancel)
                task_status.started(link)
                try:
                    while True:
                        if link.lent is not None:  # the stepping task reads (`_read_final`)
                            await link.lent.wait()
                            continue
                        with trio.CancelScope() as link.reading:
                            while True:
                                self._on_message(link, await session.receive())
                except (p2p.P2PError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    self.plan.on_broken(link, e)
                finally:
                    if link.broken is None and not cancel.cancel_called:
                        self.plan.on_broken(link, p2p.PeerBrokenError(f"{hop.peer_id} ended the session"))
                    self._wake(urgent=True)

    async def _measure_rtt(self, peer: str) -> None:
        """For later routes (this one is chosen): `_probe.round_trip_ms`."""
        rtt = await round_trip_ms(self.host, peer)
        if rtt is not None:
            self.config.route_options.client_rtts_ms[peer] = rtt

    def _relays(self, hop: Hop, nxt: _Link | None) -> bool:
        """Whether the client carries hop's results to nxt (its node could not push there lately)."""
        return nxt is not None and (self.config.client_relays or (hop.peer_id, nxt.hop.peer_id) in self.unpushable)

    async def _wire(self, link: _Link, nxt: _Link) -> None:
        """Point link's node at nxt, or make the client relay between them (`_relays`)."""
        link.relay = self._relays(link.hop, nxt)
        await self._set_next(link, None if link.relay else nxt)

    async def _set_next(self, link: _Link, nxt: _Link | None) -> None:
        with trio.fail_after(self.config.open_timeout):
            await link.session.send(SetNextHop(
                session_id=link.session_id, next_peer=nxt.hop.peer_id if nxt else None,
                next_session=nxt.session_id if nxt else None))

    async def _drop(self, link: _Link, polite: bool) -> None:
        if polite and link.broken is None and not link.cancel.cancel_called:
            with trio.move_on_after(2):
                try:
                    await link.session.send(CloseSession(session_id=link.session_id))
                except p2p.P2PError:
                    pass
        link.cancel.cancel()

    # --- reading -----------------------------------------------------------------------
    def _on_message(self, link: _Link, msg: p2p.Message) -> None:
        """Hand a node's message to the plan, and wake whoever waits for news."""
        urgent = True  # for the stepping task, when it reads the last link itself
        plan = self.plan
        if isinstance(msg, StepResult):
            out = msg.hidden.to_torch()
            if out.shape[0] != self.batch or (out.dtype != self.wire.dtype and self.wire.refusal(out)):
                plan.on_broken(link, p2p.RemoteProtocolError(f"{link.hop.peer_id} sent a result of the wrong shape"))
            else:
                urgent = False
                plan.on_result(link, msg.step_id, msg.position, out)
                self._time_hop(link, msg.step_id)
        elif isinstance(msg, StepFailed):
            plan.on_refused(link, msg.step_id, msg.code, msg.message, p2p.RemoteError(msg.code, msg.message))
        elif isinstance(msg, PushFailed):
            plan.on_push_failed(msg.session_id, msg.step_id, msg.target)
        self._wake(urgent)

    def _time_hop(self, link: _Link, step_id: int) -> None:
        """The time from the previous hop's echo of this step (or its send) to this hop's: what
        this hop's blocks cost, measured, for the router (`RouteOptions.observe_hop`)."""
        timed, since, failovers = self._timing
        if step_id != timed or failovers != self.plan.failovers:
            return
        now = trio.current_time()
        self.config.route_options.observe_hop(link.hop.peer_id, link.end - link.start, 1000 * (now - since), now_ms())
        self._timing = (step_id, now, failovers)

    def _wake(self, urgent: bool = False) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if urgent and self._fast is not None:
            self._fast.session.interrupt_receive()


class _OpenFailed(Exception):
    def __init__(self, peer_id: str) -> None:
        super().__init__(peer_id)
        self.peer_id = peer_id


class _ReplayFailed(Exception):
    pass
