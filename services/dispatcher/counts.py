"""The queue as the status shows it and ``--exit-when-done`` judges it: the cached
stage counts, the queue detail (waiting for a selection, backing off, runnable) and
the recent failures, read from the database only when something changed.

The queries pass over the whole queue (about 40 ms CPU at 100,000 jobs), so they run
only when something changed (our writes, another connection's commit, a backoff
running out), at most once a second (up to 5 s if a pass is slow: 4 % of the loop's
time), and every REFRESH_SECONDS as a safety net. A change seen inside the rate
limit is sticky until a pass runs: it must not be forgotten.

Also here: whether the queue looked empty at the last claim (no claim is tried again
until it may have changed), and the one log line per series without a selection.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from shared.lifecycle import kv
from shared.models import STAGE_DOWNLOADED, STAGE_FAILED, STAGE_QUEUED
from services.dispatcher.db_health import Database
from services.dispatcher.store import StoreUnavailable

log = logging.getLogger(__name__)
REFRESH_SECONDS = 300.0  # safety net; changes are seen at once


class QueueCounts:
    def __init__(self, perf_clock: Callable[[], float] = time.perf_counter) -> None:
        self.counts: dict[str, int] = {}
        self.detail: dict = {}
        self.failures: list[dict] = []
        self.selection_review: list[dict] = []  # anime whose jobs failed on their selection
        self.counted_at = -1e18
        self.queue_empty = False  # the last claim found nothing runnable
        self._claimed_for_retry: float | None = None  # the backoff end a claim was tried for
        self.no_selection_logged: set[int] = set()
        self._dirty = True
        self._external = False
        self._cost = 0.0  # seconds the last pass took
        self._perf = perf_clock  # measures the cost of a pass, not the dispatcher's time

    def changed(self, requeued: bool = False) -> None:
        """Our own write changed the queue; ``requeued``: a job may be runnable again."""
        self._dirty = True
        if requeued:
            self.queue_empty = False

    def nothing_to_claim(self, now: float) -> bool:
        """Whether a claim can be skipped: the queue looked empty and no backoff has run
        out since."""
        if not self.queue_empty:
            return False
        retry_at = self._soonest()
        if retry_at is None or now < retry_at or retry_at == self._claimed_for_retry:
            return True
        # A backoff (or a release's re-check) ran out since the queue looked empty: one
        # claim for it. The status keeps showing that time until the next count moves on.
        self.queue_empty = False
        self._claimed_for_retry = retry_at
        return False

    def _soonest(self) -> float | None:
        """The next backoff or re-check of a release to run out (None: none waits)."""
        times = [t for t in (self.detail.get("next_retry_at"), self.detail.get("next_recheck_at"))
                 if t is not None]
        return min(times) if times else None

    def refresh(self, db: Database, now: float, force: bool = False) -> bool:
        """Refresh the counts if due; False if the database could not be read (the old
        counts stay, and the next tick tries again)."""
        store = db.store
        try:
            self._external |= db.read(now, store.changed_elsewhere)
            if not force and not self._due(now):
                return True
            started = self._perf()
            counts = db.read(now, store.stage_counts)
            detail = db.read(now, store.queue_detail, now)
            failures = db.read(now, store.recent_failures)
            review = db.read(now, store.selection_review)
            # Only new rows from another program can add a series without a selection.
            without = (db.read(now, store.animes_without_selection)
                       if (self._external or force) else None)
        except StoreUnavailable:
            return False
        self.counts, self.detail, self.failures = counts, detail, failures
        self.selection_review = review
        self.counted_at, self._dirty, self._external = now, False, False
        self.queue_empty = False
        self._cost = self._perf() - started
        if without is not None:
            self._log_without_selection(without)
        return True

    def _due(self, now: float) -> bool:
        if now - self.counted_at < min(5.0, max(1.0, 25 * self._cost)):
            return False
        retry_due = (self._soonest() or float("inf")) <= now
        return (self._dirty or self._external or retry_due
                or now - self.counted_at >= REFRESH_SECONDS)

    def _log_without_selection(self, without: list[int]) -> None:
        # Kept to the series still without a selection: bounded, and a series that
        # loses its selection again is logged again.
        self.no_selection_logged &= set(without)
        for anime_id in without:
            if anime_id not in self.no_selection_logged:
                self.no_selection_logged.add(anime_id)
                log.error(kv(f"No cached selection for MAL ID {anime_id}", anime_id=anime_id))

    # --- completion (--exit-when-done) ----------------------------------------

    def runnable_left(self) -> bool:
        return self.detail["runnable"] > 0

    def summary(self) -> dict:
        """The summary line's figures, from the counts as last refreshed."""
        summary = {
            "downloaded": self.counts.get(STAGE_DOWNLOADED, 0),
            "failed": self.counts.get(STAGE_FAILED, 0),
            "waiting_for_selection": self.detail["waiting_for_selection"],
            "still_queued": self.counts.get(STAGE_QUEUED, 0),
        }
        if self.detail.get("waiting_for_release"):  # part of still_queued, not runnable
            summary["waiting_for_release"] = self.detail["waiting_for_release"]
        return summary
