"""Ending leases: the write first, then memory, then the answer.

A lease that is to end carries its ``Ending`` (leases.py) until the guarded write
recording it has committed; only then do the lease table, the reservations, the
counts and the retry streaks change, and only then is the worker answered (it
re-sends until it is). A write that finds the row changed by another program
leaves the row to it: the lease is dropped, and a worker still downloading it is
told to stop (``JobCancel`` in the outbox).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from shared import failures
from shared.logfmt import kv
from shared.models import STAGE_DOWNLOADED, STAGE_DOWNLOADING, STAGE_FAILED, STAGE_QUEUED
from shared.protocol import JobCancel, JobLanded, Message
from services.dispatcher.admission import Admission
from services.dispatcher.counts import QueueCounts
from services.dispatcher.db_health import Database
from services.dispatcher.disk_hooks import DiskHooks
from services.dispatcher.leases import (CANCEL, DISPATCHER, FAIL, LAND, REQUEUE, Ending, Lease,
                                        LeaseTable, owner_worker_id)
from services.dispatcher.recent import Recent
from services.dispatcher.retries import RetryPolicy
from services.dispatcher.settlement import Settlement
from services.dispatcher.store import JobRow, StoreUnavailable

log = logging.getLogger(__name__)
Outgoing = tuple[bytes, Message]
CHANGED_ELSEWHERE = "job changed by another program"
STOPPED_KEPT = 10_000


def context(lease: Lease) -> dict:
    """The log context of a lease."""
    job = lease.job
    return dict(job_id=job.id, anime_id=job.anime_id, episode=job.episode,
                worker_id=owner_worker_id(lease.owner) if lease.owner != DISPATCHER else None)


class Endings:
    def __init__(self, db: Database, leases: LeaseTable, admission: Admission,
                 counts: QueueCounts, retries: RetryPolicy, settlement: Settlement,
                 recent: Recent, disk: DiskHooks) -> None:
        self.db, self.leases, self.admission, self.counts = db, leases, admission, counts
        self.retries, self.settlement, self.recent, self.disk = retries, settlement, recent, disk
        self.outbox: list[Outgoing] = []  # JobCancel to workers whose row another program took
        # Attempts the dispatcher stopped itself (an operator's control), job id -> attempt:
        # a heartbeat of such an attempt still on its way must not re-adopt the requeued row.
        self.stopped: OrderedDict[int, int] = OrderedDict()

    def take_outbox(self) -> list[Outgoing]:
        out, self.outbox = self.outbox, []
        return out

    # --- how a lease comes to end -----------------------------------------------

    def lose(self, lease: Lease, now: float, why: str) -> None:
        """The lease ran out or its session is gone: back to the queue with a retry,
        unless its episode is at its final path already."""
        landed = self.settlement.landed(lease.job)
        if landed is not None:
            self.settle(lease, landed, now, why)
            return
        lease.ending = Ending(REQUEUE, error=f"Lease lost: {why}", count_retry=True)
        self.end(lease, now)

    def settle(self, lease: Lease, path: Path, now: float, why: str) -> None:
        """The episode is at its final path already: record it, without a second download."""
        lease.ending = self.settlement.ending_for_file(path, why)
        self.end(lease, now)

    # --- the write, then memory ---------------------------------------------------

    def end(self, lease: Lease, now: float) -> bool:
        """Write the lease's ending; True once it is done (memory then follows), False
        while the database is unavailable (memory unchanged; tried again on a later tick)."""
        e = lease.ending
        assert e is not None
        job, store = lease.job, self.db.store
        stage: str | None = None  # a requeue's new stage (queued, or failed after retries)
        try:
            if e.kind == LAND:
                ok = self.db.write(now, store.mark_downloaded, job.id, job.attempt,
                                   e.video_path, e.size, e.duration, now, e.stages)
            elif e.kind == FAIL:
                ok = self.db.write(now, store.mark_failed, job.id, job.attempt,
                                   e.error or "failed", now, e.failure_class)
            elif e.kind == CANCEL:
                ok = self.db.write(now, store.mark_cancelled, job.id, job.attempt, now)
            elif e.failure_class == failures.NOT_RELEASED:
                stage = self.db.write(now, store.await_release, job.id, job.attempt,
                                      self.retries.release_wait(e.error or "", now), now,
                                      e.failure_class)
                ok = stage is not None
            else:
                not_before = self.retries.not_before(job.id, e, now)
                if e.hold_seconds > 0:
                    not_before = max(not_before or 0.0, now + e.hold_seconds)
                stage = self.db.write(now, store.requeue, job.id, job.attempt, e.count_retry,
                                      e.error, self.retries.backoff_for(e, now), now, not_before,
                                      e.failure_class)
                ok = stage is not None
        except StoreUnavailable:
            return False
        if not ok:
            self.changed_elsewhere(lease, now)
            return True
        self._drop(lease, now)
        {LAND: self._landed, FAIL: self._failed, REQUEUE: self._requeued,
         CANCEL: self._cancelled}[e.kind](lease, stage, now)
        if e.stop_worker is not None and lease.owner != DISPATCHER and not lease.unowned:
            self.outbox.append((lease.owner, JobCancel(job_id=job.id, attempt=job.attempt,
                                                       reason=e.stop_worker,
                                                       keep_partials=e.keep_partials)))
            self.stopped[job.id] = job.attempt
            while len(self.stopped) > STOPPED_KEPT:
                self.stopped.popitem(last=False)
        return True

    def was_stopped(self, job_id: int, attempt: int) -> bool:
        """Whether the dispatcher told this attempt to stop (it may not be re-adopted)."""
        return self.stopped.get(job_id) == attempt

    def _drop(self, lease: Lease, now: float) -> None:
        self.leases.pop(lease.job.id, None)
        self.admission.release(lease.job.id, now)
        kind = lease.ending.kind if lease.ending is not None else None
        # A landing changes only the stage counts, which follow the store's moves.
        self.counts.changed(requeued=kind in (None, REQUEUE), detail=kind != LAND)

    def _landed(self, lease: Lease, stage: str | None, now: float) -> None:
        e, job = lease.ending, lease.job
        assert e is not None
        self.retries.forget(job.id)
        if e.settled is not None:
            log.warning(kv("settled a landed file without a second download", job_id=job.id,
                           anime_id=job.anime_id, episode=job.episode, path=e.video_path,
                           why=e.settled))
            if e.video_path is not None:
                self.settlement.listed(job, Path(e.video_path))
            self.settlement.cleanup_if_free(job.id)
            return
        self.admission.record_size(job.anime_id, e.size)
        self.recent.landing(now, e.size)
        if not self.leases:
            # With downloads still running the disk-watcher re-measures at least once a
            # second anyway (one request per landing cost a measurement and a publication,
            # 25 a second at full speed); after the last one it would wait.
            self.disk.request_measure("download landed", now)
        log.info(kv("downloaded", **context(lease), size=e.size, path=e.video_path,
                    seconds=round(now - lease.started_at, 3)))

    def _failed(self, lease: Lease, stage: str | None, now: float) -> None:
        assert lease.ending is not None
        self._record_failure(lease, lease.ending.error or "failed", lease.ending.failure_class, now)
        self.retries.forget(lease.job.id)
        self.settlement.cleanup(lease.job.id)
        self.recent.failure(now, lease.ending.failure_class)
        log.error(kv("failed", **context(lease), error=lease.ending.error,
                     failure_class=lease.ending.failure_class))

    def _cancelled(self, lease: Lease, stage: str | None, now: float) -> None:
        """Cancelled by the operator: the worker deletes its partial files (JobCancel);
        a directory no attempt holds any more is removed here."""
        self.retries.forget(lease.job.id)
        self.settlement.cleanup_if_free(lease.job.id)
        log.warning(kv("cancelled", **context(lease), source=lease.ending.source or None))

    def _requeued(self, lease: Lease, stage: str | None, now: float) -> None:
        e, job = lease.ending, lease.job
        assert e is not None
        self.retries.requeued(job.id, e, stage)
        self.recent.failure(now, e.failure_class)
        ctx = dict(context(lease), reason=e.reason or None, source=e.source or None,
                   failure_class=e.failure_class)
        if e.failure_class == failures.NOT_RELEASED:
            self._unreleased(lease, stage, ctx, now)
        elif stage == STAGE_FAILED:
            if e.error is not None:  # else the row keeps its last error: the next pass says it
                self._record_failure(lease, e.error, e.failure_class, now)
            self.settlement.cleanup(job.id)
            log.error(kv("failed after retries", error=e.error, **ctx))
        elif e.count_retry:
            log.warning(kv("retry scheduled", error=e.error, **ctx))
        else:
            log.info(kv("requeued without counting a retry", error=e.error, **ctx))

    def _record_failure(self, lease: Lease, error: str, failure_class: str | None,
                        now: float) -> None:
        """Shown in the status's recent failures at once (counts.py), as the count is."""
        if not getattr(self.db.store, "writes", True):
            return  # a dry run records no failure
        job = lease.job
        self.counts.failed({"id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
                            "episode": job.episode, "error": error, "at": now,
                            "failure_class": failure_class})

    def _unreleased(self, lease: Lease, stage: str | None, ctx: dict, now: float) -> None:
        assert lease.ending is not None
        if stage == STAGE_FAILED:
            error = f"{lease.ending.error or ''}\n{self.retries.gave_up_note()}"  # as retries.py writes it
            self._record_failure(lease, error, failures.NOT_RELEASED, now)
            self.settlement.cleanup(lease.job.id)
            log.error(kv("failed: the episode was never released", error=error, **ctx))
        else:
            # ani-cli died before any download: nothing in its private directory is worth
            # keeping for hours (and the job cannot be handed out before its re-check).
            self.settlement.cleanup(lease.job.id)
            log.info(kv("not released yet: waiting for a re-check, no retry counted",
                        said=(lease.ending.error or "?").splitlines()[-1],
                        recheck_hours=self.retries.recheck_seconds / 3600, **ctx))

    def changed_elsewhere(self, lease: Lease, now: float) -> None:
        """The row is not the attempt we hold any more: another program changed it. It is
        left as it is, to its new owner; the worker (if any) is told to stop."""
        job = lease.job
        try:
            row = self.db.read(now, self.db.store.get, job.id)
        except StoreUnavailable:
            row = None
        log.warning(kv(f"{CHANGED_ELSEWHERE}: left to it", **context(lease),
                       attempt=job.attempt, stage=getattr(row, "stage", None),
                       row_attempt=getattr(row, "attempt", None),
                       wanted=lease.ending.kind if lease.ending else "lease"))
        self._drop(lease, now)
        self.counts.changed(requeued=True)  # the other program may have queued it again
        self.retries.forget(job.id)
        # A worker still downloading is told to stop; one waiting for an answer gets its ack.
        if lease.ending is None and lease.owner != DISPATCHER and not lease.unowned:
            self.outbox.append((lease.owner, JobCancel(job_id=job.id, attempt=job.attempt,
                                                       reason=CHANGED_ELSEWHERE)))

    # --- a landing of a lease we no longer hold -------------------------------------

    def late_landing(self, msg: JobLanded, row: JobRow, lease: Lease | None, now: float) -> bool:
        """A landing of an attempt we hold no lease for: a repeat after our commit, or a file
        renamed after its lease was lost (then the job is settled from the file, and taken
        back from whoever holds a newer attempt). True: answer it (recorded, or nothing to
        record); False: not now (the worker re-sends)."""
        if row.stage == STAGE_DOWNLOADED and row.video_path == msg.video_path:
            return True  # a repeat after our commit
        if row.stage not in (STAGE_QUEUED, STAGE_DOWNLOADING) or not 1 <= msg.attempt <= row.attempt:
            return True
        if not self.settlement.is_episode_file(row.anime_id, row.episode, msg.video_path):
            return True
        if lease is not None and lease.ending is not None:
            return False  # the newer attempt is ending already; the worker re-sends
        if not self.db.write(now, self.db.store.mark_downloaded, msg.job_id, row.attempt,
                             msg.video_path, msg.size_bytes, msg.duration_seconds, now,
                             (STAGE_DOWNLOADING, STAGE_QUEUED)):
            return False  # changed meanwhile: look again at the re-send
        if self.leases.pop(msg.job_id, None) is not None:
            self.admission.release(msg.job_id, now)
        self.counts.changed()
        log.warning(kv("settled a landed file without a second download", job_id=msg.job_id,
                       path=msg.video_path, why="landed after its lease was lost"))
        return True
