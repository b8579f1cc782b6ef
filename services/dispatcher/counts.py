"""The queue as the status shows it and ``--exit-when-done`` judges it: the stage counts,
the queue detail (waiting for a selection, backing off, runnable) and the recent
failures, exact without a pass over the queue in the loop.

- The stage counts are those of the last pass over the queue plus the stage changes
  of the dispatcher's own writes since that pass's snapshot (``SqlJobStore.moves``,
  counted as each write commits): exact at once, for the cost of a dict. So is
  ``runnable`` (queued with a selection: every job the dispatcher claims or hands
  back has one).
- A pass (counts.py's ``Passes``: the stage counts, the queue detail, the recent
  failures; the series without a selection after another program's commit) reads
  every queued row: 0.3 s at a million jobs. The dispatcher runs it off its loop
  (``ThreadPasses``: one thread, a read connection of its own; SQLite runs the
  queries without the GIL), pinning the pass's snapshot on the loop first, so it
  knows which of its own writes the pass has seen: those before the pin.
- A pass runs when another program committed (``PRAGMA data_version``, which reads
  no table), when one of our writes changed what only a pass can tell (a retry's
  backoff, a failure, a row another program took), when a backoff ran out, and every
  REFRESH_SECONDS as a safety net; at most one at a time, at most once a second (up
  to 5 s if a pass is slow: 4 % of a core). Claims and landings need none. A change
  seen inside the rate limit is sticky until a pass runs: it must not be forgotten.

The tests (and a dry run) run the passes at once on the store's own connection
(``InlinePasses``), so the core stays deterministic under a fake clock.

Also here: whether the queue looked empty at the last claim (no claim is tried again
until it may have changed), and the one log line per series without a selection.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping, Protocol

from shared.logfmt import kv
from shared.models import STAGE_DOWNLOADED, STAGE_FAILED, STAGE_QUEUED
from services.dispatcher.db_health import Database
from services.dispatcher.store import QueueReader, QueueTally, StoreUnavailable

log = logging.getLogger(__name__)
REFRESH_SECONDS = 300.0  # safety net; changes are seen at once
FAILURES_KEPT = 5  # recent_failures in the status (store.recent_failures' limit)


class Passes(Protocol):
    """Runs a pass over the queue: ``begin`` on the loop, the result collected later."""

    running: bool

    def begin(self, db: Database, now: float, with_without: bool) -> None:
        """Start a pass of the database as it is now; raises StoreUnavailable."""

    def result(self) -> QueueTally | None:
        """The finished pass, once (then ``running`` is False); raises StoreUnavailable
        if it failed."""

    def close(self) -> None: ...


class InlinePasses:
    """The pass at once, on the store's own connection (the tests, a dry run)."""

    running = False

    def __init__(self, perf_clock: Callable[[], float] = time.perf_counter) -> None:
        self._done: QueueTally | None = None
        self._perf = perf_clock
        self.seconds = 0.0  # what the last pass took

    def begin(self, db: Database, now: float, with_without: bool) -> None:
        store = db.store
        started = self._perf()
        counts = db.read(now, store.stage_counts)
        detail = db.read(now, store.queue_detail, now)
        failures = db.read(now, store.recent_failures)
        without = db.read(now, store.animes_without_selection) if with_without else None
        review = db.read(now, store.selection_review)
        self._done = QueueTally(counts, detail, failures, without, review)
        self.seconds = self._perf() - started

    def result(self) -> QueueTally | None:
        done, self._done = self._done, None
        return done

    def close(self) -> None:
        pass


class ThreadPasses:
    """The pass on a thread of its own, over a read connection of its own (QueueReader)."""

    def __init__(self, reader: QueueReader,
                 perf_clock: Callable[[], float] = time.perf_counter) -> None:
        self.reader = reader
        self.running = False
        self.seconds = 0.0
        self._perf = perf_clock
        self._job: tuple[float, bool] | None = None
        self._done: QueueTally | BaseException | None = None
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="queue-passes", daemon=True)
        self._thread.start()

    def begin(self, db: Database, now: float, with_without: bool) -> None:
        assert not self.running, "one pass at a time"
        db.read(now, self.reader.pin)  # the snapshot: our commits so far, no later ones
        with self._wake:
            self._job, self.running = (now, with_without), True
            self._wake.notify()

    def result(self) -> QueueTally | None:
        with self._wake:
            done, self._done = self._done, None
        if done is None:
            return None
        self.running = False
        if isinstance(done, BaseException):
            raise StoreUnavailable(str(done)) from done
        return done

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._job is None and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                now, with_without = self._job
                self._job = None
            started = self._perf()
            try:
                done: QueueTally | BaseException = self.reader.tally(now, with_without)
            except StoreUnavailable as exc:
                done = exc
            except Exception as exc:  # a bug: logged, the loop tries again later
                log.exception(kv("pass over the queue failed"))
                done = exc
            self.seconds = self._perf() - started
            with self._wake:
                self._done = done

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.reader.close()


class QueueCounts:
    def __init__(self, perf_clock: Callable[[], float] = time.perf_counter,
                 passes: Passes | None = None) -> None:
        self.passes: Passes = passes if passes is not None else InlinePasses(perf_clock)
        self.base: dict[str, int] = {}  # the stage counts of the last pass
        self.detail: dict = {}
        self.failures: list[dict] = []
        self.selection_review: list[dict] = []  # anime whose jobs failed on their selection
        self.counted_at = -1e18  # when the last pass's snapshot was taken
        self.queue_empty = False  # the last claim found nothing runnable
        self._claimed_for_retry: float | None = None  # the backoff end a claim was tried for
        self.no_selection_logged: set[int] = set()
        # The store's moves (SqlJobStore.moves: the dict itself, bound at each refresh, so
        # that a status request reads memory only), and their values at the last pass's
        # snapshot.
        self._moves: Mapping[str, int] = {}
        self._mark: dict[str, int] = {}
        self._pass_mark: dict[str, int] = {}  # ... at the running pass's
        self._pass_at = -1e18
        self._dirty = True
        self._external = False
        self._begun_at = -1e18
        # Our own failures, newest first, numbered: those after a pass's pin are shown on
        # top of its list (the pass did not see them), so the failures agree with the
        # counts at once.
        self._own_failures: list[tuple[int, dict]] = []
        self._mark_failure_seq = 0
        self._failure_seq = 0
        self._pass_failure_seq = 0

    def changed(self, requeued: bool = False, detail: bool = True) -> None:
        """Our own write changed the queue; ``requeued``: a job may be runnable again;
        ``detail``: what only a pass can tell may have changed (not for a claim or a
        landing: the stage counts follow our writes by themselves)."""
        if detail:
            self._dirty = True
        if requeued:
            self.queue_empty = False

    def failed(self, entry: dict) -> None:
        """One of our writes failed a job for good: ``entry`` as ``recent_failures`` has it."""
        self._failure_seq += 1
        self._own_failures.insert(0, (self._failure_seq, entry))
        del self._own_failures[FAILURES_KEPT:]
        self.failures = self._merged_failures(self.failures)

    def _merged_failures(self, failures: list[dict]) -> list[dict]:
        newer = [entry for seq, entry in self._own_failures if seq > self._mark_failure_seq]
        ids = {entry["id"] for entry in newer}
        return (newer + [f for f in failures if f["id"] not in ids])[:FAILURES_KEPT]

    # --- what the status shows ------------------------------------------------

    def stage_counts(self) -> dict[str, int]:
        """The last pass's counts and our own moves since its snapshot ({} before the
        first pass is in: not counted yet)."""
        if self.counted_at <= -1e18:
            return {}
        out = dict(self.base)
        for stage, n in self._moves.items():
            delta = n - self._mark.get(stage, 0)
            if delta:
                out[stage] = out.get(stage, 0) + delta
                if not out[stage]:
                    del out[stage]  # as GROUP BY says it: no row, no stage
        return out

    def queue_detail(self) -> dict:
        if not self.detail:
            return {}
        queued = self._moves.get(STAGE_QUEUED, 0) - self._mark.get(STAGE_QUEUED, 0)
        return dict(self.detail, runnable=self.detail["runnable"] + queued)

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

    # --- passes ---------------------------------------------------------------------

    def refresh(self, db: Database, now: float, force: bool = False) -> bool:
        """Collect a finished pass; begin one if due (``force``: now, unless one runs).
        False if the database could not be read (the old counts stay, and the next tick
        tries again)."""
        try:
            self._collect()
            self._external |= db.read(now, db.store.changed_elsewhere)
            if self.passes.running or not (force or self._due(now)):
                return True
            with_without = self._external or force
            self._moves = getattr(db.store, "moves", self._moves)
            mark = dict(self._moves)
            self.passes.begin(db, now, with_without)
        except StoreUnavailable:
            return False
        self._pass_mark, self._pass_at = mark, now
        self._pass_failure_seq = self._failure_seq
        self._dirty = self._external = False  # the pass's snapshot has them
        self._begun_at = now
        try:
            self._collect()  # at once when the pass ran inline
        except StoreUnavailable:
            return False
        return True

    def current(self, db: Database, now: float) -> bool:
        """Whether the counts are up to date now: a pass has been collected, none runs,
        nothing another program committed is unseen, and none of our writes changed what
        only a pass can tell (the stage counts follow our writes as they commit, but
        ``runnable`` does not: a cancelled job may never have been runnable, a revived
        one may have no selection). Begins a pass if one is needed."""
        if not self.refresh(db, now):
            return False
        if self.counted_at <= -1e18 or self._external or self._dirty:
            self.refresh(db, now, force=True)
        return (self.counted_at > -1e18 and not self.passes.running and not self._external
                and not self._dirty)

    def collect(self) -> None:
        """Take a finished pass, if any (a status request shows it at once)."""
        try:
            self._collect()
        except StoreUnavailable:
            pass  # marked for another pass

    def _collect(self) -> None:
        try:
            tally = self.passes.result()
        except StoreUnavailable:
            self._dirty = self._external = True  # what it was to see is still unseen
            raise
        if tally is None:
            return
        self.base, self.detail = tally.counts, tally.detail
        self._mark, self.counted_at = self._pass_mark, self._pass_at
        self._mark_failure_seq = self._pass_failure_seq
        self.failures = self._merged_failures(tally.failures)
        self.selection_review = tally.selection_review
        self.queue_empty = False
        if tally.without_selection is not None:
            self._log_without_selection(tally.without_selection)

    def _due(self, now: float) -> bool:
        cost = getattr(self.passes, "seconds", 0.0)
        if now - self._begun_at < min(5.0, max(1.0, 25 * cost)):
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
        return self.queue_detail()["runnable"] > 0

    def summary(self) -> dict:
        """The summary line's figures, from the last pass and our moves since."""
        counts = self.stage_counts()
        summary = {
            "downloaded": counts.get(STAGE_DOWNLOADED, 0),
            "failed": counts.get(STAGE_FAILED, 0),
            "waiting_for_selection": self.detail["waiting_for_selection"],
            "still_queued": counts.get(STAGE_QUEUED, 0),
        }
        if self.detail.get("waiting_for_release"):  # part of still_queued, not runnable
            summary["waiting_for_release"] = self.detail["waiting_for_release"]
        return summary

    @property
    def counts(self) -> dict[str, int]:
        """The stage counts as the status shows them."""
        return self.stage_counts()
