"""A stopping dispatcher: it hands out nothing more and waits, up to its grace, for the
hand-backs of the workers that stop with it.

kill -9 of supervisord sends every program SIGTERM at once (parent-death signal): the
workers kill ani-cli and hand their jobs back (JobFailed interrupted), and a
dispatcher that ended at once would never record those hand-backs (the jobs would stay
``downloading`` and count a retry when their re-adopted leases run out at the next
start). A normal stop loses no time here: supervisord stops the workers first, so no
connected worker holds a lease by the time the dispatcher is asked to stop; and a
stop of the dispatcher alone (a restart) does not wait for workers that go on
downloading (the next dispatcher re-adopts their leases).
"""

from __future__ import annotations

import logging
from shared.logfmt import kv
from services.dispatcher.leases import Lease, LeaseTable
from services.dispatcher.sessions import Sessions

log = logging.getLogger(__name__)
# At most this long: inside supervisord's stopwaitsecs (10 s) for the dispatcher, and as
# long as a worker re-sends its hand-back (its own grace).
STOP_GRACE_SECONDS = 8.0


class Stopping:
    def __init__(self, leases: LeaseTable, sessions: Sessions) -> None:
        self.leases = leases
        self.sessions = sessions  # whether a worker is still connected: asked at each look
        self.requested = False
        self._deadline = float("inf")
        self._everyone_stops = False

    def begin(self, now: float, everyone_stops: bool) -> None:
        """``everyone_stops``: the whole tree got the stop at once (supervisord is gone), so
        every connected worker is stopping too and its hand-back is worth waiting for."""
        self.requested = True
        self._deadline = now + STOP_GRACE_SECONDS
        self._everyone_stops = everyone_stops
        awaited = self._awaited()
        if awaited:
            log.info(kv("stop requested: handing out nothing more, waiting for the hand-backs",
                        leases=len(awaited), grace=STOP_GRACE_SECONDS))
        else:
            log.info(kv("stop requested: handing out nothing more", leases=len(self.leases)))

    def _awaited(self) -> list[Lease]:
        return self.leases.awaited_at_stop(self.sessions.connected, self._everyone_stops)

    def may_exit(self, now: float) -> bool:
        """Nothing left to wait for, or the grace is over (the leases left are re-adopted
        at the next start)."""
        awaited = self._awaited()
        if awaited and now < self._deadline:
            return False
        if awaited:
            log.warning(kv("stopping without the hand-backs of these jobs: re-adopted at the "
                           "next start", job_ids=sorted(l.job.id for l in awaited)))
        return True
