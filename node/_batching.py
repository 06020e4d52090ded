"""Batching across sessions: one compute loop turns every session's pending step into one
`Span.forward_segments` pass.

Sessions call ``await batcher.run(span, hidden, start, cache)``. The loop takes every pending
job, gives each its next piece (a decode step whole; a long prompt `PREFILL_CHUNK` tokens at a
time) until a pass holds `MAX_PASS_TOKENS` tokens, and runs the pieces as one pass on the node's
one persistent compute thread (torch releases the GIL; the event loop keeps serving heartbeats
meanwhile), or, for short passes (a few decode steps of a small span), on the event loop's own
thread, which saves the two thread hand-offs (see `INLINE_TOKENS`). A persistent thread, not `trio.to_thread`: trio's thread cache may run each call on
another OS thread, and torch's per-thread state then starts cold every pass (measured: 7.8 ms
against 5.7 ms per tiny-model decode pass). A
partly done prompt goes to the back of the queue, so decode steps that arrived during a pass run
in the next one: one long prompt never stalls everyone.

`Batcher(max_segments=N)` (``run-node --max-batch-size N``) puts at most N sessions' steps in
one pass; 1 turns batching across sessions off (each pass runs one session's step, and no pass
waits for other sessions' steps).

Jobs are validated by the caller (`ServedSession.accept`) before they get here, so a pass only
fails on a bug or an out-of-memory; then each piece is retried alone, so a failure stays with the
job that caused it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import trio

from pipeline import KVCache, Segment, Span
from pipeline._threads import start_thread

logger = logging.getLogger("lamina.node")

PREFILL_CHUNK = 128  # tokens per piece of a long prompt
MAX_PASS_TOKENS = 512  # tokens (rows x positions) per pass, beyond the first piece
# How long a pass may wait for the next steps of recently served sessions: BATCH_WINDOW_FRACTION
# of the last pass's duration (waiting a little is cheap next to a long pass), clamped to
# [BATCH_WINDOW, BATCH_WINDOW_MAX] seconds.
BATCH_WINDOW = 0.002
BATCH_WINDOW_FRACTION = 1.0
BATCH_WINDOW_MAX = 0.05
RECENT_PASSES = 2  # a session served in one of the last this many passes counts as stepping
# Short passes run on the event loop's own thread: handing a pass to the compute thread and
# back costs about 0.4 ms (two thread wake-ups and the GIL changing hands), which is a large
# share of a small model's decode step. A pass is short when it holds at most INLINE_TOKENS
# tokens and the last such pass took at most INLINE_MAX_SECONDS (the loop is then blocked at
# most that long; heartbeats allow seconds). The first short pass runs on the thread.
INLINE_TOKENS = 16
INLINE_MAX_SECONDS = 0.010


@dataclass(eq=False)
class _Job:
    span: Span
    hidden: torch.Tensor  # [B, T, D] in the span's dtype and device
    start: int
    cache: KVCache
    done: int = 0  # positions already computed
    outputs: list[torch.Tensor] = field(default_factory=list)
    finished: trio.Event = field(default_factory=trio.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def next_piece(self) -> int:
        return min(self.hidden.shape[1] - self.done, PREFILL_CHUNK)


@dataclass
class BatchStats:
    passes: int = 0  # forward passes run
    batched_passes: int = 0  # passes that held more than one segment
    segments: int = 0
    max_segments: int = 0
    tokens: int = 0
    compute_seconds: float = 0.0  # wall time spent in forward passes
    inline_passes: int = 0  # passes run on the event loop's thread (short ones)


class Batcher:
    """The node's single compute loop. Start `serve` in a nursery; call `run` from sessions."""

    def __init__(self, max_segments: int | None = None) -> None:
        if max_segments is not None and max_segments < 1:
            raise ValueError("max_segments must be >= 1 (or None: no limit)")
        # sessions' steps one pass may hold (run-node --max-batch-size); 1: no batching
        self.max_segments = max_segments
        self._queue: deque[_Job] = deque()
        self._wakeup = trio.Event()
        self._worker = ComputeThread()
        self.stats = BatchStats()
        self._short_pass: float | None = None  # seconds the last pass of <= INLINE_TOKENS took
        self._recent: dict[int, int] = {}  # id of a session's cache -> the last pass that served it
        self._passes = 0
        self._parked = False  # the loop is waiting for work, with nothing queued

    async def run(self, span: Span, hidden: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """Run one session's step (batched with whatever else is pending); the output
        [B, T, D]. Raises what the forward pass raised for this job."""
        if self._parked and not self._queue and hidden.shape[0] * hidden.shape[1] <= INLINE_TOKENS \
                and self._inline_ok() and self._alone(cache):
            return self._run_inline(span, hidden, start, cache)
        job = _Job(span, hidden, start, cache)
        self._queue.append(job)
        self._wakeup.set()
        try:
            await job.finished.wait()
        except BaseException:
            job.abandoned = True  # cancelled: the loop drops it (or ignores its result)
            raise
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._worker.start()
        try:
            task_status.started()
            await self._serve()
        finally:
            self._worker.stop()

    async def _serve(self) -> None:
        last_pass = 0.0  # seconds the last pass took
        while True:
            while not self._queue:
                self._parked = True
                try:
                    await self._wait_for_job()
                finally:
                    self._parked = False
            # Sessions served in the last RECENT_PASSES passes are probably sending their next
            # steps: give them BATCH_WINDOW to arrive, so they share this pass. Without this,
            # sessions settle into groups that alternate passes (each group's steps arrive while
            # the other group computes) and every pass runs half full. A lone session never waits.
            self._forget_old_sessions()
            window = min(max(BATCH_WINDOW, BATCH_WINDOW_FRACTION * last_pass), BATCH_WINDOW_MAX)
            wanted = min(len(self._recent), self.max_segments or len(self._recent))
            with trio.move_on_after(window):
                while len(self._queue) < wanted:
                    await self._wait_for_job()
            batch = self._take()
            if batch:
                self._count_pass(job.cache for job, _ in batch)
                began = time.perf_counter()
                await self._pass(batch)
                last_pass = time.perf_counter() - began

    def _forget_old_sessions(self) -> None:
        self._recent = {k: p for k, p in self._recent.items() if p >= self._passes - RECENT_PASSES}

    def _count_pass(self, caches: Iterable[KVCache]) -> None:
        self._passes += 1
        for cache in caches:
            self._recent[id(cache)] = self._passes

    def _note_pass(self, took: float, segments: int, short: bool, inline: bool) -> None:
        """Statistics of a pass that took `took` seconds (and, when short, the inline test's
        measure)."""
        if short:
            self._short_pass = took
        stats = self.stats
        stats.compute_seconds += took
        stats.passes += 1
        stats.inline_passes += inline
        stats.segments += segments
        stats.max_segments = max(stats.max_segments, segments)
        stats.batched_passes += segments > 1

    def forget(self, cache: KVCache) -> None:
        """A session ended: stop counting it as stepping. Otherwise the next passes would wait
        out their batch window for a step that never comes (and the next session's first
        steps would not run inline: it would not be alone)."""
        self._recent.pop(id(cache), None)

    def _alone(self, cache: KVCache) -> bool:
        """No other session stepped in the last RECENT_PASSES passes (none to wait for)."""
        key = id(cache)
        if len(self._recent) > 1 or (self._recent and key not in self._recent):
            self._forget_old_sessions()
        return all(k == key for k in self._recent)

    def _run_inline(self, span: Span, hidden: torch.Tensor, start: int, cache: KVCache) -> torch.Tensor:
        """A lone session's short step with the loop idle: nothing to batch it with and no one
        to wait for, so it runs right here, in the caller's task, on the event loop's thread.
        No other task runs until it is done, and none before the caller has sent the result on
        (it then waits for its next message, which lets the others run). Raises what the pass
        raised."""
        self._count_pass((cache,))
        began = time.perf_counter()
        try:
            out = span.forward_segments([Segment(hidden, start, cache)])[0]
        finally:
            self._note_pass(time.perf_counter() - began, 1, short=True, inline=True)
        self.stats.tokens += hidden.shape[0] * hidden.shape[1]
        return out

    def _inline_ok(self) -> bool:
        return self._short_pass is not None and self._short_pass <= INLINE_MAX_SECONDS

    async def _wait_for_job(self) -> None:
        self._wakeup = trio.Event()
        await self._wakeup.wait()

    def _take(self) -> list[tuple[_Job, int]]:
        """Pieces for the next pass: (job, tokens), at most one piece per job and
        `max_segments` pieces."""
        batch: list[tuple[_Job, int]] = []
        budget = MAX_PASS_TOKENS
        for _ in range(len(self._queue)):
            job = self._queue.popleft()
            if job.abandoned:
                continue
            t = job.next_piece()
            cost = t * job.hidden.shape[0]
            if batch and (cost > budget or len(batch) == self.max_segments):
                self._queue.append(job)
                continue
            budget -= cost
            batch.append((job, t))
        return batch

    async def _pass(self, batch: list[tuple[_Job, int]]) -> None:
        by_span: dict[int, list[tuple[_Job, int]]] = {}
        for job, t in batch:
            by_span.setdefault(id(job.span), []).append((job, t))
        groups = list(by_span.values())
        tokens = sum(t * job.hidden.shape[0] for job, t in batch)
        short = tokens <= INLINE_TOKENS
        began = time.perf_counter()
        inline = short and self._inline_ok()
        if inline:
            outcome = _compute(groups)
        else:
            outcome = await self._worker.run(_compute, groups)
        self._note_pass(time.perf_counter() - began, len(batch), short, inline)
        await trio.lowlevel.checkpoint()  # an inline pass must not starve the other tasks
        for (job, t), out in zip([p for g in groups for p in g], outcome):
            self.stats.tokens += t * job.hidden.shape[0]
            if isinstance(out, BaseException):
                job.error = out
                job.finished.set()
                continue
            job.outputs.append(out)
            job.done += t
            if job.done < job.hidden.shape[1]:
                if not job.abandoned:
                    self._queue.append(job)  # the rest of a long prompt, behind newer steps
                continue
            job.result = job.outputs[0] if len(job.outputs) == 1 else torch.cat(job.outputs, dim=1)
            job.finished.set()


class ComputeThread:
    """One long-lived OS thread that runs the node's forward passes, one at a time."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = start_thread(self._loop, "lamina-compute")

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, token, box, done = job
            try:
                box.append((True, fn(*args)))
            except BaseException as exc:  # handed to the awaiting task
                box.append((False, exc))
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

    async def run(self, fn, *args):
        """`fn(*args)` on the compute thread. Like `trio.to_thread.run_sync`, not cancellable
        once started: a pass finishes (they are short) before a cancellation takes effect."""
        if self._thread is None:
            raise RuntimeError("the compute thread is not running")
        box: list = []
        done = trio.Event()
        self._jobs.put((fn, args, trio.lowlevel.current_trio_token(), box, done))
        with trio.CancelScope(shield=True):
            await done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


def _segments(group: list[tuple[_Job, int]]) -> list[Segment]:
    return [Segment(job.hidden[:, job.done:job.done + t], job.start + job.done, job.cache)
            for job, t in group]


def _compute(groups: list[list[tuple[_Job, int]]]) -> list[torch.Tensor | BaseException]:
    """Runs in the worker thread: one forward_segments per span in the pass."""
    out: list[torch.Tensor | BaseException] = []
    for group in groups:
        span = group[0][0].span
        try:
            out.extend(span.forward_segments(_segments(group)))
        except Exception as exc:  # isolate: retry each piece alone
            if len(group) == 1:
                out.append(exc)
                continue
            logger.warning("a batched pass failed (%r); retrying its %d pieces alone", exc, len(group))
            for piece in group:
                try:
                    out.extend(span.forward_segments(_segments([piece])))
                except Exception as exc1:
                    out.append(exc1)
    return out
