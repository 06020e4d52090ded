"""Waiting for a condition in tests: poll it, bounded, and fail saying what never came true.

    from _wait import eventually, eventually_sync

    await eventually(lambda: budget.sessions == 0)                 # trio tests
    await eventually(lambda: session.failed is not None, timeout=10)
    eventually_sync(lambda: "closed" in node.log(), interval=0.05)  # plain (sync) tests

The predicate may return any value: the first truthy one is returned. `eventually` also takes an
async predicate (one that returns an awaitable). On timeout both raise AssertionError naming the
predicate (its source) or `what`; `what` may be a callable, called then, to report the state
reached (e.g. counts). The project rule is no fixed sleeps in tests: wait for readiness. Prefer
an event when the code offers one (`view.wait_changed()`, a `trio.Event`): polling is for state
that nothing signals.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from typing import Any

import trio

TIMEOUT = 30.0  # generous: the suite shares 2 cores with the nodes it starts; a hang still fails
INTERVAL = 0.01

What = str | Callable[[], object] | None


async def eventually(predicate: Callable[[], Any], timeout: float = TIMEOUT, *, interval: float = INTERVAL,
                     what: What = None) -> Any:
    """Poll `predicate` (sync or async) every `interval` s until it returns a truthy value, and
    return that value; after `timeout` s raise AssertionError saying what was waited for."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(_message(predicate, timeout, what))


def eventually_sync(predicate: Callable[[], Any], timeout: float = TIMEOUT, *, interval: float = INTERVAL,
                    what: What = None) -> Any:
    """`eventually` for synchronous tests (blocks the calling thread between polls)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(_message(predicate, timeout, what))
        time.sleep(interval)
    return value


def _message(predicate: Callable[[], Any], timeout: float, what: What) -> str:
    if callable(what):
        what = str(what())
    return f"still not true after {timeout:g} s: {what or _describe(predicate)}"


def _describe(predicate: Callable[[], Any]) -> str:
    """The predicate's source (a lambda's line(s)) and where it is, else its name."""
    name = getattr(predicate, "__qualname__", repr(predicate))
    try:
        lines, lineno = inspect.getsourcelines(predicate)
        where = f"{os.path.basename(inspect.getsourcefile(predicate) or '?')}:{lineno}"
    except (OSError, TypeError):
        return name
    if getattr(predicate, "__name__", "") != "<lambda>":
        return f"{name} ({where})"
    text = " ".join(line.strip() for line in lines)
    return f"{text[:300]} ({where})"
