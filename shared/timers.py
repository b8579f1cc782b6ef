"""Named deadlines for a service's poll loop, on a clock the caller passes in.

Each loop (dispatcher, disk-watcher, worker) waits in one ``poll`` for sockets and
for the soonest of its timers; instead of a handful of ``next_*`` fields each with
its own arithmetic, it keeps them here::

    timers = Timers()
    timers.start("beat", now, 2.0)         # due at now + 2
    events = poller.poll(timers.wait_ms(now, cap=5.0))
    if timers.due("beat", now):            # True once it has come; re-arm it yourself
        timers.start("beat", now, 2.0)

A timer that is not armed is never due. Time is whatever clock the caller uses
(monotonic in the services, a fake one in tests): nothing here reads a clock.
"""

from __future__ import annotations

import math


class Timers:
    """A few named one-shot deadlines."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def start(self, name: str, now: float, seconds: float) -> None:
        """Arm ``name`` to come due ``seconds`` after ``now`` (0: due at once)."""
        self._at[name] = now + max(0.0, seconds)

    def at(self, name: str, when: float) -> None:
        """Arm ``name`` to come due at ``when``."""
        self._at[name] = when

    def cancel(self, name: str) -> None:
        self._at.pop(name, None)

    def armed(self, name: str) -> bool:
        return name in self._at

    def due(self, name: str, now: float) -> bool:
        """Whether ``name`` is armed and its time has come (it stays armed: re-arm or cancel)."""
        when = self._at.get(name)
        return when is not None and now >= when

    def left(self, name: str, now: float) -> float:
        """Seconds until ``name`` comes due (0 when due, infinity when not armed)."""
        when = self._at.get(name)
        return math.inf if when is None else max(0.0, when - now)

    def soonest(self, now: float) -> float:
        """Seconds until the first armed timer comes due (infinity when none is armed)."""
        return max(0.0, min(self._at.values(), default=math.inf) - now)

    def wait_ms(self, now: float, cap: float | None = None) -> int | None:
        """A poll timeout in milliseconds for the soonest timer (rounded up, so a poll never
        wakes just before it); at most ``cap`` seconds; None (wait for ever) when nothing
        is armed and there is no cap."""
        seconds = self.soonest(now)
        if cap is not None:
            seconds = min(seconds, cap)
        if math.isinf(seconds):
            return None
        return math.ceil(seconds * 1000)
