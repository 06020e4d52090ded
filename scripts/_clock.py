"""The benchmarks' streamer: when each new token of one generation came out."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenClock:
    """An HF-style streamer (`put`/`end`). The first `put` is the prompt and is not timed; each
    later one records a new token's time. `on_token(n)` runs after the n-th new token."""

    def __init__(self, on_token: Callable[[int], None] | None = None) -> None:
        self.t0 = time.perf_counter()        # made just before the generation starts
        self.times: list[float] = []         # one per new token
        self._prompt_seen = False
        self.on_token = on_token

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if self.on_token:
            self.on_token(len(self.times))

    def end(self) -> None:
        pass

    def ttft(self) -> float:
        """Seconds from the clock's creation to the first new token."""
        return self.times[0] - self.t0

    def decode_tok_s(self) -> float:
        """New tokens after the first, per second."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])

    def ms_per_token(self) -> float:
        return 1e3 / self.decode_tok_s()
