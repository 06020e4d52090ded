"""A push chain's bookkeeping and failover decisions, without I/O.

`Chain` (pipeline/_chain.py) is the trio driver: it opens sessions, sends, reads and waits. Every
decision is taken here, from events the driver reports, in the manner of h11's state machine:

    plan.begin(step_id, position, hidden)            # the client sends a step into the chain
    plan.on_result(link, step_id, position, hidden)  # a node's output (an echo, or the final one)
    plan.on_refused(link, step_id, code, message)    # a StepFailed
    plan.on_push_failed(session_id, step_id, target) # a node could not push to the next one
    plan.on_broken(link, error)                      # a link's stream broke, or a send failed
    plan.deadline_passed(position, message)          # the step's deadline passed
    action = plan.next_action(position)              # what to do now (None: wait for an event)
    plan.replaced(old, new)                          # the driver replaced a failed link

Actions: `Finished` (the step's result), `Refused` (a node refused the step as malformed),
`Send` (send a step to a link: the resend after a failover, or a step the client carries for
a node that cannot push), `Relay` (a node cannot push to the next link: relay between them),
`Replace` (a link failed: replace it, then call `replaced`), `GiveUp` (too many failovers).

Who is to blame (`verdict`) is decided here too: a node that said it dropped the session, or
that answers a probe, keeps its span; a node that went silent is excluded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .protocol import BAD_REQUEST, IDLE_TIMEOUT, UNKNOWN_SESSION

# Error codes with which a node ends a session it no longer holds: it answered, so it is alive.
SESSION_GONE = frozenset({IDLE_TIMEOUT, UNKNOWN_SESSION})


class StepTimeout(Exception):
    """A link did not produce a step's output before the step's deadline."""


@dataclass(eq=False)
class LinkState:
    """What the plan knows of one hop of the chain: its node, blocks and session."""

    peer_id: str
    start: int
    end: int
    session_id: str
    broken: BaseException | None = None
    # The node could not push to the next link (a NAT or firewall between them, while the
    # client reaches both): it no longer pushes, and the client carries each result on.
    relay: bool = False


# -- actions -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Finished:
    output: Any


@dataclass(frozen=True)
class Refused:
    code: str
    message: str


@dataclass(frozen=True, eq=False)
class Send:
    link: LinkState
    step_id: int
    position: int
    hidden: Any


@dataclass(frozen=True)
class Relay:
    up: LinkState
    link: LinkState


@dataclass(frozen=True)
class Replace:
    link: LinkState


@dataclass(frozen=True)
class GiveUp:
    message: str


Action = Finished | Refused | Send | Relay | Replace | GiveUp


# -- verdicts ------------------------------------------------------------------------------------
ALIVE, FAILED, PROBE = "alive", "failed", "probe"


def verdict(error: BaseException | None, *, code: str | None = None, silent: bool = False) -> str:
    """Whether a broken link's node is alive (only our session on it ended), failed, or must be
    probed. `code`: the error frame's code when the node sent one; `silent`: the node stopped
    answering while we ran (our watchdog, a stalled write, the step deadline)."""
    if code is not None:
        return ALIVE if code in SESSION_GONE else FAILED
    if silent or isinstance(error, StepTimeout):
        return FAILED
    return PROBE


# -- the boundary inputs -------------------------------------------------------------------------
class History:
    """Each span boundary's inputs by position, with the step id that produced them: what a
    replacement replays and what a resend or a relayed step sends."""

    def __init__(self) -> None:
        self._store: dict[int, dict[int, tuple[int, Any]]] = {}  # boundary -> pos -> (step, hidden)

    def remember(self, boundary: int, position: int, step_id: int, hidden: Any) -> None:
        store = self._store.setdefault(boundary, {})
        # a rollback (position already stored) discards everything from there on; positions
        # are stored in increasing order, so the common case (appending) checks only the last
        if store and next(reversed(store)) >= position:
            later = [p for p in store if p >= position]
            # ...but only a newer step rolls back: an older step's output arriving now (a
            # replacement's replay echoing the inputs it rebuilt) would wipe the inputs that
            # came after it, and a later replay from this boundary would rebuild too little
            if any(store[p][0] > step_id for p in later):
                return
            for pos in later:
                del store[pos]
        store[position] = (step_id, hidden)

    def forget_outputs(self) -> None:
        """Keep only the client's own inputs (boundary 0): every other boundary holds nodes'
        outputs, which a rebuilt route recomputes (after a spot check found one wrong)."""
        self._store = {0: self._store[0]} if 0 in self._store else {}

    def input(self, boundary: int, position: int, step_id: int) -> Any | None:
        """The input at `boundary` for `position` produced by step `step_id`, if it is in."""
        got = self._store.get(boundary, {}).get(position)
        return got[1] if got is not None and got[0] == step_id else None

    def replay(self, boundary: int, position: int) -> list[tuple[int, int, Any]]:
        """(position, step id, hidden) of every input stored at `boundary` before `position`,
        in order. Raises `ValueError` unless they cover exactly [0, position) (a cache rebuilt
        from less would hold fewer positions than the chain's next step assumes)."""
        chunks = sorted((pos, sid, h) for pos, (sid, h) in self._store.get(boundary, {}).items()
                        if pos < position)
        expected = 0
        for pos, _, h in chunks:
            if pos != expected:
                raise ValueError(f"the inputs stored at block {boundary} have a gap at position {expected}")
            expected += h.shape[1]
        if expected != position:
            raise ValueError(f"the inputs stored at block {boundary} cover positions [0, {expected}), "
                             f"not [0, {position})")
        return chunks


# -- the plan ------------------------------------------------------------------------------------
@dataclass
class _Step:
    step_id: int = -1
    failovers: int = 0
    resend_to: LinkState | None = None
    carried: set[int] = field(default_factory=set)     # id() of the links this step was carried to
    reopened: set[str] = field(default_factory=set)    # peers whose session was re-opened


class Plan:
    """The state of one chain (see the module docstring)."""

    def __init__(self, num_blocks: int, max_failovers: int) -> None:
        self.num_blocks, self.max_failovers = num_blocks, max_failovers
        self.links: list[LinkState] = []
        self.history = History()
        self.latest: dict[str, int] = {}                 # session id -> last step id it answered
        self.failovers = 0                               # over the chain's life
        self._step = _Step()
        self._final: dict[int, Any] = {}                 # the current step's result
        # also keep every final result in `history` (at boundary num_blocks): spot checks
        # compare the last hop's outputs too
        self.keep_final = False
        self._refused: dict[int, Refused] = {}
        # step id -> (session id, target session id) of the pushes that failed
        self._push_failed: dict[int, set[tuple[str, str]]] = {}

    # -- events ----------------------------------------------------------------------------------
    def begin(self, step_id: int, position: int, hidden: Any) -> None:
        """The client sends step `step_id` (input `hidden` at `position`) to the first link."""
        self._step = _Step(step_id)
        self._final.clear()
        self.history.remember(0, position, step_id, hidden)

    def on_result(self, link: LinkState, step_id: int, position: int, hidden: Any) -> None:
        self.latest[link.session_id] = max(step_id, self.latest.get(link.session_id, -1))
        if link.end == self.num_blocks:
            if step_id == self._step.step_id:   # a stale final result is dropped
                self._final.setdefault(step_id, hidden)
            if self.keep_final:
                self.history.remember(link.end, position, step_id, hidden)
        else:
            self.history.remember(link.end, position, step_id, hidden)

    def on_refused(self, link: LinkState, step_id: int, code: str, message: str,
                   error: BaseException | None = None) -> None:
        """A StepFailed: a malformed step is the caller's (`Refused`); anything else breaks the
        link (`error`, the driver's exception for it)."""
        if code == BAD_REQUEST:
            self._refused[step_id] = Refused(code, message)
        elif link.broken is None:
            link.broken = error if error is not None else RuntimeError(f"{code}: {message}")

    def on_push_failed(self, session_id: str, step_id: int, target: str) -> None:
        self._push_failed.setdefault(step_id, set()).add((session_id, target))

    def on_broken(self, link: LinkState, error: BaseException) -> None:
        if link.broken is None:
            link.broken = error

    def deadline_passed(self, position: int, message: str) -> LinkState | None:
        """The step's deadline passed: the first hop that has not produced its output is the
        slow one (it breaks with `StepTimeout`); None if every hop has (nothing to blame)."""
        step_id = self._step.step_id
        for link in self.links:
            if link.end == self.num_blocks or self.history.input(link.end, position, step_id) is None:
                self.on_broken(link, StepTimeout(message.format(peer=link.peer_id)))
                return link
        return None

    def replaced(self, old: LinkState, new: list[LinkState]) -> None:
        """`old` was replaced by `new` (opened, replayed and wired to the next link); the
        interrupted step is resent from new[0]."""
        i = self.links.index(old)
        self.links[i:i + 1] = new
        self._step.resend_to = new[0]

    def reopen(self, peer_id: str) -> bool:
        """Whether a node whose session broke may get a new one if it is alive (once per step:
        a node that loses a second session within one step is routed around)."""
        if peer_id in self._step.reopened:
            return False
        self._step.reopened.add(peer_id)
        return True

    # -- decisions -------------------------------------------------------------------------------
    def quiet(self) -> bool:
        """Nothing needs attention but the step's result (the driver's fast path may read the
        last link alone)."""
        sid = self._step.step_id
        return not (sid in self._refused or self._push_failed.get(sid)
                    or any(link.broken is not None or link.relay for link in self.links))

    def take_final(self) -> Any | None:
        return self._final.pop(self._step.step_id, None)

    def next_action(self, position: int) -> Action | None:
        """What the driver does next for the current step at `position`; None: wait for an
        event or the deadline. A `Send` counts as done when returned (a failed send is an
        `on_broken`); a `Replace` is done when the driver calls `replaced` (or reports a link
        broken); a `Relay` when the driver has set `up.relay` (or reports `up` broken)."""
        step = self._step
        sid = step.step_id
        final = self.take_final()
        if final is not None:
            return Finished(final)
        if sid in self._refused:
            return self._refused.pop(sid)
        resend = step.resend_to
        if resend is not None:
            if resend not in self.links:
                step.resend_to = None
            else:
                hidden = self.history.input(resend.start, position, sid)
                if hidden is not None:
                    step.resend_to = None
                    return Send(resend, sid, position, hidden)
        for up, link in zip(self.links, self.links[1:]):   # carry for the nodes that cannot push
            if up.relay and id(link) not in step.carried and link.broken is None:
                hidden = self.history.input(link.start, position, sid)
                if hidden is not None:
                    step.carried.add(id(link))
                    return Send(link, sid, position, hidden)
        unpushed = self._push_failed_into(sid)
        if unpushed is not None:
            return Relay(self.links[self.links.index(unpushed) - 1], unpushed)
        bad = next((link for link in self.links if link.broken is not None), None)
        if bad is not None:
            step.failovers += 1
            self.failovers += 1
            if step.failovers > self.max_failovers:
                return GiveUp(f"step failed over {step.failovers - 1} times; giving up")
            return Replace(bad)
        return None

    def _push_failed_into(self, step_id: int) -> LinkState | None:
        """The first link whose upstream reported it could not push this step to it (once). A
        report about a link that has been replaced since (its node died while the upstream
        pushed to it) names a target no longer in the chain and blames no one; so does one
        about a broken link (its session is gone: it is replaced, not relayed to)."""
        failed = self._push_failed.get(step_id)
        if not failed:
            return None
        for up, link in zip(self.links, self.links[1:]):
            if (up.session_id, link.session_id) in failed:
                failed.discard((up.session_id, link.session_id))
                if link.broken is not None:
                    continue
                return link
        return None
