"""What the client's public calls raise, and the synchronous client's trio thread.

* `clear_errors`: one exception, never a trio `ExceptionGroup` (a nursery wraps whatever
  crosses it), and a failure of the network as a `SwarmUnavailableError` saying so. `cleared`
  does the same for an async context manager, leaving the caller's own exceptions (raised in
  its body) exactly as they were.
* `TrioThread`: a trio event loop on a daemon thread, to which synchronous code submits
  coroutines; `Held`: an async context manager entered, held and left by one task of that loop
  (a nursery must be left by the task that entered it), so that a synchronous context manager
  or object can keep it open between calls.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Callable, Iterator

import trio

import p2p

from ._errors import LaminaError, ModelClosedError, SwarmUnavailableError
from ._threads import start_thread


@contextmanager
def clear_errors() -> Iterator[None]:
    """Around a public call: a group is unwrapped to its one meaningful leaf (a `LaminaError`
    first, else the first that is not a `trio.Cancelled`), and an error of the network layer
    (p2p, py-libp2p, a broken trio stream) becomes a `SwarmUnavailableError` saying so."""
    try:
        yield
    except BaseExceptionGroup as group:  # noqa: F821 - py3.11 builtin
        leaves = _leaves(group)
        chosen = next((e for e in leaves if isinstance(e, LaminaError)), None) \
            or next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
        err = as_client_error(chosen)
        raise err from err.__cause__  # its own cause (a wrapped P2PError's is that error), not the group
    except (p2p.P2PError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise as_client_error(e) from e
    except Exception as e:
        if not _from_libp2p(e):
            raise
        raise as_client_error(e) from e


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):  # noqa: F821
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def _from_libp2p(exc: BaseException) -> bool:
    return type(exc).__module__.split(".")[0] == "libp2p"


def as_client_error(exc: BaseException) -> BaseException:
    """A network failure as a `SwarmUnavailableError` (its cause set); anything else as it is."""
    if isinstance(exc, (p2p.P2PError, trio.BrokenResourceError, trio.ClosedResourceError)) or _from_libp2p(exc):
        err = SwarmUnavailableError(f"the connection to the swarm failed: {exc or type(exc).__name__}")
        err.__cause__ = exc
        return err
    return exc


@asynccontextmanager
async def cleared(manager: AsyncContextManager[Any]) -> AsyncIterator[Any]:
    """`manager` with what entering and leaving it raise cleared (`clear_errors`), while an
    exception of the caller's own body goes through untouched: never wrapped in a group by our
    nurseries, never unwrapped if it is a group of the caller's."""
    body_error: BaseException | None = None
    try:
        with clear_errors():
            async with manager as value:
                try:
                    yield value
                except BaseException as e:   # the caller's: re-raised as it is once we are closed
                    body_error = e
    finally:
        if body_error is not None:
            raise body_error


class TrioThread:
    """A trio event loop on a daemon thread; sync code submits coroutines to it with `run`."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.nursery: trio.Nursery | None = None
        self._thread = start_thread(self._main, "lamina-client")
        self._ready.wait()

    def _main(self) -> None:
        try:
            trio.run(self._amain)
        except BaseException as e:  # surfaced to the caller of run()
            self._error = e
            self._ready.set()

    async def _amain(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, afn: Callable[..., Any], *args: Any) -> Any:
        """``await afn(*args)`` on the loop, from another thread; errors cleared (`clear_errors`)."""
        if self.token is None:
            raise ModelClosedError("the client's event loop did not start") from self._error
        with clear_errors():
            try:
                return trio.from_thread.run(afn, *args, trio_token=self.token)
            except trio.RunFinishedError:
                raise ModelClosedError("this model was closed: load it again with from_pretrained") from None

    def stop(self) -> None:
        if self.token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)


class Held:
    """``async with manager`` entered by a task of `thread`'s loop and held open until
    `leave`: `value` is what it gave. Entering raises what the manager raised; an error while
    held (the manager's own tasks failed) ends it and is kept in `error`, for the next call to
    report (`ended`), instead of ending the whole loop."""

    def __init__(self, thread: TrioThread, manager: Callable[[], AsyncContextManager[Any]]) -> None:
        self.thread, self._manager = thread, manager
        self.error: BaseException | None = None
        self._leave: trio.Event | None = None
        self._done: trio.Event | None = None
        self._ended = threading.Event()
        self.value = thread.run(self._start)

    async def _start(self) -> Any:
        assert self.thread.nursery is not None
        return await self.thread.nursery.start(self._hold)

    async def _hold(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._leave, self._done = trio.Event(), trio.Event()
        started = False
        try:
            async with self._manager() as value:
                task_status.started(value)
                started = True
                await self._leave.wait()
        except Exception as e:
            if not started:
                raise
            self.error = e
        finally:
            self._ended.set()
            self._done.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def leave(self) -> None:
        """Leave the manager (from the sync side); raises what leaving it raised."""
        if not self.ended:
            self.thread.run(self._leave_async)
        if self.error is not None:
            error, self.error = self.error, None
            with clear_errors():
                raise error

    async def _leave_async(self) -> None:
        assert self._leave is not None and self._done is not None
        self._leave.set()
        await self._done.wait()
