"""A set whose members are forgotten after a while (trio time)."""

from __future__ import annotations

from collections.abc import Hashable

import trio


class ExpiringSet:
    """Members stay `ttl` seconds after their latest `add`. Used for "this failed lately, do not
    wait on it again yet" memories, which must heal on their own. Stale members are dropped when
    asked about, and all at once when `max_size` is reached."""

    def __init__(self, ttl: float, max_size: int = 1024) -> None:
        self.ttl, self.max_size = ttl, max_size
        self._until: dict[Hashable, float] = {}

    def add(self, key: Hashable) -> None:
        now = trio.current_time()
        if len(self._until) >= self.max_size:
            self._until = {k: until for k, until in self._until.items() if until > now}
        self._until[key] = now + self.ttl

    def __contains__(self, key: Hashable) -> bool:
        until = self._until.get(key)
        if until is not None and until <= trio.current_time():
            del self._until[key]
            return False
        return until is not None
