"""Hosts whose next starts wait: a Cloudflare block holds back hand-outs to every worker
on the host that was blocked.

Cloudflare blocks a client address, not a process: every worker on the blocked
worker's machine shares that address and would hit the same page at once, so the
hold is per host (``WorkerReady.host``); a remote worker on another machine (another
address) goes on. A hold lasts ``cloudflare_pause_seconds``, twice as long for each
block in a row on that host (at most ``CAP_FACTOR`` times as long); a landing from
the host ends the row. Kept in memory: a dispatcher restart forgets the holds (the
blocked job's own backoff is in the database).
"""

from __future__ import annotations

from dataclasses import dataclass

CAP_FACTOR = 8
HOSTS_KEPT = 1_000


@dataclass
class Hold:
    until: float
    blocks: int  # blocks in a row on this host


class HostHolds:
    def __init__(self, pause_seconds: float) -> None:
        self.pause = pause_seconds
        self._holds: dict[str, Hold] = {}

    def block(self, host: str, now: float) -> float | None:
        """A Cloudflare block on ``host``: until when its workers get no new job (None:
        holds are off, ``cloudflare_pause_seconds = 0``)."""
        if self.pause <= 0:
            return None
        hold = self._holds.get(host)
        blocks = (hold.blocks if hold else 0) + 1
        until = now + self.pause * min(CAP_FACTOR, 2 ** (blocks - 1))
        self._holds[host] = Hold(max(until, hold.until if hold else until), blocks)
        while len(self._holds) > HOSTS_KEPT:
            del self._holds[next(iter(self._holds))]
        return self._holds[host].until

    def held(self, host: str, now: float) -> bool:
        hold = self._holds.get(host)
        return hold is not None and now < hold.until

    def landed(self, host: str) -> None:
        """A download from ``host`` landed: the site lets it through again."""
        hold = self._holds.get(host)
        if hold is not None and hold.blocks:
            self._holds[host] = Hold(hold.until, 0)

    def active(self, now: float) -> list[dict]:
        """The holds still running, for the status: ``host``, ``until``, ``blocks``."""
        return [{"host": host, "until": hold.until, "blocks": hold.blocks}
                for host, hold in sorted(self._holds.items()) if now < hold.until]
