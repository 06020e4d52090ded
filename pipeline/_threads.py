"""Threads that compute like the thread that started them.

torch's intra-op thread count is per OS thread under OpenMP: `torch.set_num_threads(1)` in the
main thread leaves a thread started later on OpenMP's default (every core). The two then run
the same step with different reduction splits and get different bits (measured: a 5-token
prefill of the micro model differs in the last bit between the main thread and a fresh one).
Every thread that runs model code (a node's compute thread, the client's event loop) is started
here, so a step's bits do not depend on which thread ran it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread running `target` with the caller's torch intra-op thread count."""
    threads = torch.get_num_threads()

    def run() -> None:
        torch.set_num_threads(threads)
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
