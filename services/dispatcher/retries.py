"""When a job handed back may be handed out again, and when a failure counts a retry.

- Errors and time-outs count a retry; a counted retry backs off exponentially with
  jitter (``retry_backoff_seconds``, doubling, capped at ``retry_backoff_max_seconds``).
- An operator stop, no space and a hard-limit abort count none. Such requeues of one
  job in a row (a streak) wait 1 s, 2 s, 4 s ... (at most 60 s) from the second on,
  so that a job cannot spin (e.g. its private directory still locked by a live
  attempt) while others run; the INTERRUPTED_CAP-th interruption in a row counts a
  retry, so it cannot loop for ever.
- Failures that know what they are (shared/failures.py, docs/failures.md): an episode
  that is not released yet counts no retry and waits ``recheck_unreleased_hours`` for a
  re-check, for at most ``max_unreleased_days`` since its first "not released" (kept in
  the row, ``unreleased_since``), then fails with a word on anidb.app's per-season
  numbering; a Cloudflare block backs off at least as long as the hold it puts on its
  host (holds.py). A classified ani-cli message is recorded as its stable form.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Callable

from shared import failures
from shared.config import DownloaderConfig
from shared.protocol import (REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED,
                             REASON_INVALID, REASON_NO_SPACE, REASON_TIMEOUT, JobFailed)
from shared.models import STAGE_FAILED, STAGE_QUEUED
from services.dispatcher.holds import HostHolds
from services.dispatcher.leases import FAIL, REQUEUE, Ending
from services.dispatcher.store import ReleaseWait

COUNTED_REASONS = (REASON_ERROR, REASON_TIMEOUT)
UNCOUNTED_REASONS = (REASON_INTERRUPTED, REASON_NO_SPACE, REASON_HARD_LIMIT)
UNCOUNTED_BACKOFF_FIRST = 1.0
UNCOUNTED_BACKOFF_MAX = 60.0
INTERRUPTED_CAP = 5
STREAKS_KEPT = 10_000


class RetryPolicy:
    def __init__(self, downloader: DownloaderConfig, rng: random.Random) -> None:
        self.base = downloader.retry_backoff_seconds
        self.cap = downloader.retry_backoff_max_seconds
        self.rng = rng
        self._streaks: OrderedDict[int, int] = OrderedDict()  # job id -> uncounted requeues
        self.recheck_seconds = downloader.recheck_unreleased_hours * 3600
        self.max_unreleased_seconds = downloader.max_unreleased_days * 86400
        self.holds = HostHolds(downloader.cloudflare_pause_seconds)

    def failure_ending(self, job_id: int, msg: JobFailed) -> Ending:
        """How a worker's failure report ends the lease."""
        if msg.reason == REASON_INVALID:
            return Ending(FAIL, error=msg.error, reason=msg.reason)
        count = msg.reason in COUNTED_REASONS
        error = msg.error
        found = failures.classify(msg.reason, msg.error)
        if found is not None:
            # The worker's word, if it is a class we know; an older worker sends none.
            cls = failures.known(msg.failure_class) or found.cls
            error = failures.stable_error(msg.error, found)
            if cls == failures.NOT_RELEASED:
                return Ending(REQUEUE, error=error, reason=msg.reason, failure_class=cls)
            return Ending(REQUEUE, error=error, count_retry=count, reason=msg.reason,
                          failure_class=cls)
        streak = self._streaks.get(job_id, 0)
        if msg.reason == REASON_INTERRUPTED and streak + 1 >= INTERRUPTED_CAP:
            count = True
            error = f"{msg.error} (interrupted {streak + 1} times in a row: counted as a retry)"
        return Ending(REQUEUE, error=error, count_retry=count, reason=msg.reason)

    def backoff_at(self, now: float) -> Callable[[int], float | None]:
        """``retry_count`` -> the time before which a counted retry is not handed out."""

        def at(retry_count: int) -> float | None:
            if self.base <= 0:
                return None
            delay = min(self.cap, self.base * 2 ** max(0, retry_count - 1))
            return now + min(self.cap, delay * self.rng.uniform(0.75, 1.25))  # the cap holds

        return at

    def backoff_for(self, ending: Ending, now: float) -> Callable[[int], float | None]:
        """``backoff_at``, and for a Cloudflare block no earlier than its host's hold."""
        at = self.backoff_at(now)
        if ending.hold_until is None:
            return at
        hold = ending.hold_until

        def held(retry_count: int) -> float | None:
            return max(at(retry_count) or now, hold)

        return held

    def release_wait(self, error: str, now: float) -> Callable[[float | None], ReleaseWait]:
        """``unreleased_since`` (None: this is the first "not released") -> whether the job
        waits for a re-check (and until when) or has waited long enough and fails."""

        def decide(since: float | None) -> ReleaseWait:
            since = now if since is None else min(since, now)
            give_up_at = since + self.max_unreleased_seconds
            if now >= give_up_at:
                return ReleaseWait(STAGE_FAILED, None, f"{error}\n{self.gave_up_note()}", since)
            return ReleaseWait(STAGE_QUEUED, min(now + self.recheck_seconds, give_up_at), error,
                               since)

        return decide

    def gave_up_note(self) -> str:
        """The final error's last line: the same for every such job (GROUP BY groups them)."""
        return (f"not released after {self.max_unreleased_seconds / 86400:g} days of re-checks "
                "(max_unreleased_days); anidb.app numbers episodes per season, so an episode "
                "that never appears may be a numbering mismatch: check the season and episode "
                "the site lists")

    def not_before(self, job_id: int, ending: Ending, now: float) -> float | None:
        """The hold of a requeue that counts no retry: none the first time in a row."""
        streak = self._streaks.get(job_id, 0)
        if ending.count_retry or streak == 0 or ending.reason not in UNCOUNTED_REASONS:
            return None
        delay = min(UNCOUNTED_BACKOFF_MAX, UNCOUNTED_BACKOFF_FIRST * 2 ** (streak - 1))
        return now + delay * self.rng.uniform(0.75, 1.25)

    def requeued(self, job_id: int, ending: Ending, stage: str | None) -> None:
        """The requeue was written (``stage``: queued, or failed after its retries)."""
        if stage == STAGE_FAILED or ending.count_retry:
            self.forget(job_id)
        elif ending.reason in UNCOUNTED_REASONS:
            self._streaks[job_id] = self._streaks.pop(job_id, 0) + 1
            while len(self._streaks) > STREAKS_KEPT:
                self._streaks.popitem(last=False)

    def forget(self, job_id: int) -> None:
        self._streaks.pop(job_id, None)
