"""The chain's failover decisions (`pipeline._failover.Plan`) on their own, without sockets:
every failure at every position, double failures, stale step ids, refused steps, failed
pushes, deadlines, the bound on failovers, and who is blamed. `tests/test_client_*.py` run
the same decisions end to end through real nodes."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline._failover import (ALIVE, FAILED, PROBE, Finished, GiveUp, History, LinkState, Plan, Refused, Relay,
                                Replace, Send, StepTimeout, verdict)
from pipeline.protocol import BAD_REQUEST, IDLE_TIMEOUT, INTERNAL, UNKNOWN_SESSION, new_session_id

BLOCKS = 8


def h(value: float, t: int = 1) -> torch.Tensor:
    return torch.full((1, t, 1), float(value))


def link(peer: str, start: int, end: int) -> LinkState:
    return LinkState(peer, start, end, new_session_id())


def spans(n: int) -> list[tuple[int, int]]:
    """n links splitting the BLOCKS blocks."""
    cuts = [round(BLOCKS * k / n) for k in range(n + 1)]
    return list(zip(cuts, cuts[1:]))


def plan_of(n: int, max_failovers: int = 8) -> Plan:
    plan = Plan(BLOCKS, max_failovers)
    plan.links = [link(f"n{k}", a, b) for k, (a, b) in enumerate(spans(n))]
    return plan


def run_through(plan: Plan, step_id: int, position: int, links: list[LinkState] | None = None) -> None:
    """Each of `links` (default: all) answers step `step_id`: node output = input + its blocks."""
    for lk in links if links is not None else plan.links:
        x = plan.history.input(lk.start, position, step_id)
        assert x is not None, f"no input for {lk.peer_id} at {lk.start}"
        plan.on_result(lk, step_id, position, x + (lk.end - lk.start))


def warm(plan: Plan, steps: int = 3) -> int:
    """`steps` steps done without trouble (a prompt of 2 tokens, then decode); the next position."""
    position = 0
    for step_id in range(steps):
        t = 2 if step_id == 0 else 1
        plan.begin(step_id, position, h(step_id, t))
        run_through(plan, step_id, position)
        assert isinstance(plan.next_action(position), Finished)
        position += t
    return position


def test_a_step_without_trouble_finishes_with_the_last_output():
    plan = plan_of(3)
    plan.begin(0, 0, h(1))
    assert plan.quiet() and plan.next_action(0) is None
    run_through(plan, 0, 0, plan.links[:2])
    assert plan.next_action(0) is None and plan.take_final() is None
    run_through(plan, 0, 0, plan.links[2:])
    action = plan.next_action(0)
    assert isinstance(action, Finished) and torch.equal(action.output, h(1 + BLOCKS))
    assert plan.next_action(0) is None and plan.failovers == 0


def test_a_stale_final_result_is_dropped():
    plan = plan_of(2)
    position = warm(plan)
    plan.begin(3, position, h(9))
    plan.on_result(plan.links[-1], 2, position - 1, h(0))  # the previous step's, late
    assert plan.next_action(position) is None and plan.take_final() is None


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("upstream_echoed", [True, False], ids=["echoed", "not-echoed"])
def test_every_failure_at_every_position(n, upstream_echoed):
    for i in range(n):
        plan = plan_of(n)
        position = warm(plan)
        step_id = 3
        plan.begin(step_id, position, h(5))
        if upstream_echoed:
            run_through(plan, step_id, position, plan.links[:i])
        bad = plan.links[i]
        plan.on_broken(bad, ConnectionError("gone"))
        assert not plan.quiet()
        assert plan.next_action(position) == Replace(bad) and plan.failovers == 1
        # the replacement is rebuilt from exactly the inputs the dead link had, in order
        chunks = plan.history.replay(bad.start, position)
        assert [(pos, sid) for pos, sid, _ in chunks] == [(0, 0), (2, 1), (3, 2)]
        new = link("r", bad.start, bad.end)
        plan.replaced(bad, [new])
        assert plan.links[i] is new
        if not upstream_echoed and i > 0:
            assert plan.next_action(position) is None  # waits for the upstream's echo
            run_through(plan, step_id, position, plan.links[:i])
        action = plan.next_action(position)
        assert isinstance(action, Send) and action.link is new and action.step_id == step_id
        assert torch.equal(action.hidden, h(5 + bad.start))
        run_through(plan, step_id, position, plan.links[i:])
        action = plan.next_action(position)
        assert isinstance(action, Finished) and torch.equal(action.output, h(5 + BLOCKS))


@pytest.mark.parametrize("first,second", list(itertools.permutations(range(3), 2)))
def test_double_failures_are_replaced_in_chain_order(first, second):
    plan = plan_of(3)
    position = warm(plan)
    plan.begin(3, position, h(5))
    run_through(plan, 3, position, plan.links[:min(first, second)])
    a, b = plan.links[first], plan.links[second]
    plan.on_broken(a, ConnectionError("a"))
    plan.on_broken(b, ConnectionError("b"))
    order = sorted([a, b], key=plan.links.index)
    sent: list[LinkState] = []
    replaced: list[LinkState] = []
    for _ in range(20):
        action = plan.next_action(position)
        if isinstance(action, Replace):
            replaced.append(action.link)
            new = link("r" + action.link.peer_id, action.link.start, action.link.end)
            plan.replaced(action.link, [new])
        elif isinstance(action, Send):
            sent.append(action.link)
            k = plan.links.index(action.link)
            run_through(plan, 3, position, [action.link])
            assert k < len(plan.links)
        elif isinstance(action, Finished):
            break
        else:  # waiting: the links after the last resend answer (they were never broken)
            pending = [lk for lk in plan.links if plan.history.input(lk.start, position, 3) is not None
                       and (lk.end == BLOCKS or plan.history.input(lk.end, position, 3) is None)]
            assert pending, "stuck"
            run_through(plan, 3, position, pending[:1])
    else:
        raise AssertionError("did not finish")
    assert replaced == order and plan.failovers == 2
    assert torch.equal(action.output, h(5 + BLOCKS))


def test_failovers_per_step_are_bounded():
    plan = plan_of(2, max_failovers=2)
    position = warm(plan)
    plan.begin(3, position, h(1))
    for _ in range(2):
        bad = plan.links[0]
        plan.on_broken(bad, ConnectionError("again"))
        assert plan.next_action(position) == Replace(bad)
        plan.replaced(bad, [link("r", bad.start, bad.end)])
        assert isinstance(plan.next_action(position), Send)
    plan.on_broken(plan.links[0], ConnectionError("and again"))
    action = plan.next_action(position)
    assert isinstance(action, GiveUp) and "2 times" in action.message
    # the bound is per step: the next step may fail over again
    plan.links[0].broken = None
    plan.begin(4, position + 1, h(1))
    plan.on_broken(plan.links[1], ConnectionError("later"))
    assert isinstance(plan.next_action(position + 1), Replace)


def test_a_malformed_step_is_refused_and_other_step_failures_break_the_link():
    plan = plan_of(2)
    plan.begin(0, 0, h(1))
    plan.on_refused(plan.links[1], 0, BAD_REQUEST, "wrong shape")
    assert plan.next_action(0) == Refused(BAD_REQUEST, "wrong shape")
    plan.begin(1, 0, h(1))
    plan.on_refused(plan.links[0], 1, INTERNAL, "forward pass failed")
    assert plan.next_action(0) == Replace(plan.links[0])


def test_a_failed_push_makes_the_client_relay_and_carry():
    plan = plan_of(3)
    position = warm(plan)
    up, down = plan.links[0], plan.links[1]
    plan.begin(3, position, h(5))
    plan.on_push_failed(up.session_id, 3, down.session_id)
    assert not plan.quiet()
    assert plan.next_action(position) == Relay(up, down)
    up.relay = True                              # the driver re-wired `up`: it pushes no more
    assert plan.next_action(position) is None   # the client carries once up's echo is in
    run_through(plan, 3, position, [up])
    action = plan.next_action(position)
    assert isinstance(action, Send) and action.link is down and torch.equal(action.hidden, h(5 + up.end))
    assert plan.next_action(position) is None   # carried once per step
    run_through(plan, 3, position, plan.links[1:])
    assert isinstance(plan.next_action(position), Finished)
    assert not plan.quiet()                      # relaying: the driver reads every link


def test_a_push_failure_blames_the_pair_only_while_its_target_is_the_next_link():
    plan = plan_of(2)
    up, dead = plan.links
    replacement = link("c", dead.start, dead.end)
    plan.links = [up, replacement]  # `dead` was replaced before the upstream's report came in
    plan.begin(3, 0, h(1))
    plan.on_push_failed(up.session_id, 3, dead.session_id)
    assert plan.next_action(0) is None  # stale: the replacement is not blamed
    plan.on_push_failed(up.session_id, 3, replacement.session_id)
    assert plan.next_action(0) == Relay(up, replacement)
    assert plan.next_action(0) is None  # reported once


def test_a_push_into_a_broken_link_replaces_it_instead_of_relaying():
    """A client that paused comes back to every session gone: the upstream's new session
    pushes into the old downstream one, which its node dropped. That is no reason to relay."""
    plan = plan_of(2)
    up, down = plan.links
    plan.begin(3, 0, h(1))
    plan.on_broken(down, ConnectionError("session dropped"))
    plan.on_push_failed(up.session_id, 3, down.session_id)
    assert plan.next_action(0) == Replace(down)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_deadline_blames_the_first_link_without_the_steps_output(n):
    for answered in range(n):
        plan = plan_of(n)
        position = warm(plan)
        plan.begin(3, position, h(5))
        run_through(plan, 3, position, plan.links[:answered])
        blamed = plan.deadline_passed(position, "no result from {peer}")
        assert blamed is plan.links[answered]
        assert isinstance(blamed.broken, StepTimeout) and str(blamed.broken) == f"no result from n{answered}"
        assert plan.next_action(position) == Replace(blamed)


def test_a_node_gets_one_new_session_per_step():
    plan = plan_of(2)
    plan.begin(0, 0, h(1))
    assert plan.reopen("n0") and not plan.reopen("n0") and plan.reopen("n1")
    plan.begin(1, 1, h(1))
    assert plan.reopen("n0")


@pytest.mark.parametrize("error,code,silent,expected", [
    (RuntimeError("idle"), IDLE_TIMEOUT, False, ALIVE),
    (RuntimeError("gone"), UNKNOWN_SESSION, False, ALIVE),
    (RuntimeError("oom"), INTERNAL, False, FAILED),
    (TimeoutError("frozen"), None, True, FAILED),
    (StepTimeout("late"), None, False, FAILED),
    (ConnectionResetError("reset"), None, False, PROBE),
    (EOFError("no goodbye"), None, False, PROBE),
])
def test_who_is_blamed(error, code, silent, expected):
    assert verdict(error, code=code, silent=silent) == expected


def test_history_rolls_back_and_refuses_to_replay_a_gap():
    history = History()
    for pos, sid in [(0, 0), (2, 1), (3, 2), (4, 3)]:
        history.remember(0, pos, sid, h(sid, 2 if pos == 0 else 1))
    history.remember(0, 3, 7, h(7))  # a rollback to 3 drops 3 and 4, then stores the new 3
    assert [(p, s) for p, s, _ in history.replay(0, 4)] == [(0, 0), (2, 1), (3, 7)]
    assert [(p, s) for p, s, _ in history.replay(0, 3)] == [(0, 0), (2, 1)]
    assert history.input(0, 3, 2) is None and torch.equal(history.input(0, 3, 7), h(7))
    with pytest.raises(ValueError, match=r"cover positions \[0, 4\), not \[0, 10\)"):
        history.replay(0, 10)          # a replay from too little would leave the cache short
    gap = History()
    gap.remember(4, 0, 0, h(0, 2))
    gap.remember(4, 3, 1, h(1))
    with pytest.raises(ValueError, match="gap at position 2"):
        gap.replay(4, 10)


def test_an_older_steps_output_never_rolls_back_newer_inputs():
    """A replacement's replay echoes the inputs it rebuilt, with their old step ids, after
    newer ones are stored at that boundary: they must not wipe the newer ones."""
    history = History()
    for pos, sid in [(0, 0), (2, 1), (3, 2), (4, 3)]:
        history.remember(5, pos, sid, h(sid, 2 if pos == 0 else 1))
    for pos, sid in [(0, 0), (2, 1), (3, 2)]:        # the replay's echoes
        history.remember(5, pos, sid, h(sid + 100, 2 if pos == 0 else 1))
    assert [(p, s) for p, s, _ in history.replay(5, 5)] == [(0, 0), (2, 1), (3, 2), (4, 3)]
    assert torch.equal(history.input(5, 2, 1), h(1))   # the first value kept
    history.remember(5, 4, 3, h(33))                   # the same step again (a resend) replaces it
    assert torch.equal(history.input(5, 4, 3), h(33))
