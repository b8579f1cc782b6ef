"""The dispatcher's logic, with no sockets: ``handle(identity, msg, now)`` and
``tick(now)`` return the messages to send, so tests drive it with a fake clock.

Invariants:
- A job is handed out only to a worker that said it is idle (a credit), only
  while the disk admits it, and always as a lease (owner, attempt, deadline).
- Only the lease holder's attempt may land a file: ``JobFinished`` from anyone
  else is answered with ``JobCancel`` and the worker discards its file.
- A lease that expires, or whose worker comes back as a new process, returns
  the job to the queue and counts a retry; unless the episode is already at
  its final path, which settles the job as downloaded without a second download.
- Memory follows the database, never the other way round. The database is
  shared with neighbours that hold its write lock for seconds: a write that
  cannot be done now (``StoreUnavailable``) leaves memory as it was and is tried
  again. A lease that is to end keeps its ``ending`` until the write commits;
  only then do the lease table, the reservations and the counts change, and only
  then is the worker answered (it re-sends until it is). Every write is guarded
  by id, attempt and stage: a row a neighbour changed is left to it.
- One worker id, one live session (see sessions.py): a second live session of an
  id in use, or one from another CURVE key, is refused with ``WorkerRefused``; a
  session that is really gone loses its lease at once, so restarts stay fast.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from shared import layout
from shared.config import Config
from shared.lifecycle import kv
from shared.models import STAGE_DOWNLOADED, STAGE_DOWNLOADING, STAGE_FAILED, STAGE_QUEUED
from shared.protocol import (REASON_DRY_RUN, REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED,
                             REASON_INVALID, REASON_NO_SPACE, REASON_STORAGE, REASON_TIMEOUT,
                             DiskMeasure, DiskStateMsg, JobAck, JobAssign, JobCancel,
                             JobCommit, JobFailed, JobFinished, JobHeartbeat, JobLanded,
                             Message, WorkerBye, WorkerReady)
from shared.storage import StorageWatch
from services.dispatcher.admission import Admission, peak_factor
from services.dispatcher.db_health import DbHealth
from services.dispatcher.leases import (DISPATCHER, FAIL, LAND, REQUEUE, Ending, Lease,
                                        owner_worker_id, validate)
from services.dispatcher.sessions import Sessions
from services.dispatcher.store import ClaimedJob, SqlJobStore, StoreUnavailable

log = logging.getLogger(__name__)

Outgoing = tuple[bytes, Message]
T = TypeVar("T")
COUNTED_REASONS = (REASON_ERROR, REASON_TIMEOUT)
UNCOUNTED_REASONS = (REASON_INTERRUPTED, REASON_NO_SPACE, REASON_HARD_LIMIT)
COUNTS_REFRESH_SECONDS = 300.0  # safety net; changes are seen at once (see _refresh_counts)
# Requeues that count no retry (interrupted, no space, hard limit) of one job in a row:
# from the second on the job waits 1 s, 2 s, 4 s ... (at most 60 s) so that it cannot
# spin (e.g. its private directory still locked by a live attempt) while others run;
# the INTERRUPTED_CAP-th interruption in a row counts a retry, so it cannot loop for ever.
UNCOUNTED_BACKOFF_FIRST = 1.0
UNCOUNTED_BACKOFF_MAX = 60.0
INTERRUPTED_CAP = 5
STREAKS_KEPT = 10_000
CHANGED_ELSEWHERE = "job changed by another program"
WORKER_MESSAGES = (WorkerReady, WorkerBye, JobHeartbeat, JobFinished, JobLanded, JobFailed)


@dataclass
class Options:
    dry_run: bool = False
    anime_id: int | None = None
    exit_when_done: bool = False
    workers: int = 0  # workers started with it (the launcher's -w); 0: only those connected


@dataclass
class Dispatcher:
    store: SqlJobStore
    config: Config
    options: Options = field(default_factory=Options)
    rng: random.Random = field(default_factory=random.Random)
    admission: Admission = field(init=False)
    sessions: Sessions = field(init=False)
    storage: StorageWatch = field(init=False)  # identifies the storage if nobody did yet
    leases: dict[int, Lease] = field(default_factory=dict)
    disk_requests: list[DiskMeasure] = field(default_factory=list)
    stopping: bool = False
    started: bool = False
    db: DbHealth = field(default_factory=DbHealth)
    counts: dict[str, int] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    dry_run_done: int = 0
    failures: list[dict] = field(default_factory=list)
    landed_recent: deque = field(default_factory=lambda: deque(maxlen=10_000))
    title_mismatches: deque = field(default_factory=lambda: deque(maxlen=5))  # for the status
    _outbox: list[Outgoing] = field(default_factory=list)
    _streaks: OrderedDict = field(default_factory=OrderedDict)  # job id -> uncounted requeues
    _counts_at: float = -1e18
    _counts_dirty: bool = True
    _no_selection_logged: set[int] = field(default_factory=set)
    _refresh_cost: float = 0.0  # seconds the last pass took
    _external_change: bool = False
    _queue_empty: bool = False
    _last_refusal: str | None = None
    _measure_requested_at: float = -1e18
    _disk_stale: bool = False

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.disk, peak_factor=peak_factor(self.config.downloader),
                                   ignore_storage=self.options.dry_run)
        self.storage = StorageWatch(self.config.root_dir, self.config.storage_dir,
                                    create=self.config.create_storage_dir,
                                    claim=not self.options.dry_run)
        self.sessions = Sessions(self.config.queue.lease_seconds)

    # --- the database ---------------------------------------------------------

    def _write(self, now: float, call: Callable[..., T], *args: object, **kwargs: object) -> T:
        """One store write. While the database refuses writes they are not even tried
        for DB_RETRY_SECONDS, so no message waits behind one busy timeout after another."""
        if not self.db.usable(now):
            raise StoreUnavailable(self.db.error or "database busy")
        try:
            result = call(*args, **kwargs)
        except StoreUnavailable as exc:
            self.db.failed(exc, now)
            raise
        self.db.succeeded(now)
        return result

    def _read(self, now: float, call: Callable[..., T], *args: object) -> T:
        """One store read (in WAL mode reads do not wait for writers; a failure is rare)."""
        try:
            return call(*args)
        except StoreUnavailable as exc:
            self.db.failed(exc, now)
            raise

    def pending_writes(self) -> int:
        """Writes that wait for the database: lease endings and lease deadlines."""
        return sum(1 for lease in self.leases.values() if lease.ending or lease.deadline_dirty)

    # --- start-up -----------------------------------------------------------

    def start(self, now: float) -> None:
        """Open the database, re-adopt leases, settle landed files, sweep stale private dirs.

        Raises StoreUnavailable while the database is locked, having changed nothing:
        every read comes before the first change of memory, so calling again is safe."""
        try:
            self.store.open()
            sizes = self.store.recent_sizes()
            rows = self.store.leases()
            jobs = {row.id: self.store.get(row.id) for row in rows}
            live = self.store.live_job_ids() if self._sweeping() else set()
        except StoreUnavailable as exc:
            self.db.failed(exc, now, quiet=True)  # the server says it waits, once
            raise
        self.db.busy_since, self.db.error = None, None
        for size_row in reversed(sizes):
            self.admission.record_size(*size_row)
        for row in rows:
            job = jobs[row.id]
            if job is None:
                continue  # deleted by another program between the two reads
            landed = layout.find_landed(self.config.storage_dir, row.anime_id, row.episode or 0)
            claimed = ClaimedJob(row.id, row.anime_id, job.anime_title, row.episode, row.attempt,
                                 job.retry_count or 0, job.max_retries or 0, None, None, None)
            owner = (row.owner or "unknown").encode()
            lease = self.leases[row.id] = Lease(claimed, owner, now + self.config.queue.lease_seconds, now)
            if landed is not None:
                self._settle_landed(lease, landed, now, "found at start")
                continue
            self.admission.reserve(row.id, row.anime_id)
            log.info(kv("lease re-adopted, waiting for its worker", job_id=row.id,
                        anime_id=row.anime_id, episode=row.episode, owner=row.owner,
                        attempt=row.attempt))
        self.storage.poll(now)
        if self._sweeping():
            self._sweep_private_dirs(live | set(self.leases))
        self.started = True
        self._refresh_counts(now, force=True)

    def _sweeping(self) -> bool:
        return not self.options.dry_run and layout.in_progress_root(self.config.storage_dir).is_dir()

    def _sweep_private_dirs(self, live: set[int]) -> None:
        problem = self.storage.problem()  # another installation's private dirs are not stale
        if problem is not None:
            log.warning(kv("not sweeping private directories", why=problem))
            return
        for path in layout.in_progress_root(self.config.storage_dir).iterdir():
            if path.name.startswith("."):
                continue  # .locks
            job_id = layout.job_id_of_dir(path)
            if job_id is None or job_id not in live:
                shutil.rmtree(path, ignore_errors=True)
                log.info(kv("removed stale private directory", path=path, job_id=job_id))

    # --- messages -----------------------------------------------------------

    def handle(self, identity: bytes, msg: Message, now: float, key: str = "") -> list[Outgoing]:
        """``key``: the CURVE public key that authenticated the connection ("" for local)."""
        if isinstance(msg, WORKER_MESSAGES):
            refusal = self._admit(identity, key, msg, now)
            if refusal is not None:
                return self.sessions.refuse(identity, msg, refusal, now)
            self.sessions.workers[identity].last_seen = now
        handler: Callable = {
            WorkerReady: self._on_ready,
            WorkerBye: self._on_bye,
            JobHeartbeat: self._on_heartbeat,
            JobFinished: self._on_finished,
            JobLanded: self._on_landed,
            JobFailed: self._on_failed,
        }.get(type(msg), self._on_unexpected)
        try:
            out = handler(identity, msg, now)
        except StoreUnavailable:
            out = []  # nothing changed; the worker re-sends what needs an answer
        return self._flush_outbox(out)

    def _flush_outbox(self, out: list[Outgoing]) -> list[Outgoing]:
        if self._outbox:
            out, self._outbox = out + self._outbox, []
        return out

    def _on_unexpected(self, identity: bytes, msg: Message, now: float) -> list[Outgoing]:
        log.warning(kv("dropped message not meant for the dispatcher", kind=msg.KIND,
                       owner=identity.decode("utf-8", "replace")))
        return []

    # --- sessions -------------------------------------------------------------

    def _admit(self, identity: bytes, key: str, msg: Message, now: float) -> str | None:
        """Why ``identity`` may not speak for its worker id, or None (see sessions.py)."""
        def running() -> list[bytes]:
            return [l.owner for l in self.leases.values() if l.owner != DISPATCHER and l.ending is None]

        refusal, gone = self.sessions.admit(identity, key, msg, now, running)
        for other in gone:
            self._session_gone(other, now, f"worker {owner_worker_id(identity)} restarted "
                                           "during the download")
        return refusal

    def _session_gone(self, identity: bytes, now: float, why: str) -> None:
        """A session that is not coming back: its leases go back to the queue."""
        for lease in [l for l in self.leases.values() if l.owner == identity and l.ending is None]:
            self._lease_lost(lease, now, why)
        self._forget(identity)

    def _forget(self, identity: bytes) -> None:
        self.sessions.forget(identity, [l.owner for l in self.leases.values()
                                        if l.owner != DISPATCHER])

    # --- worker messages ------------------------------------------------------

    def _on_ready(self, identity: bytes, msg: WorkerReady, now: float) -> list[Outgoing]:
        self.sessions.workers[identity].state = "idle"
        if msg.seq <= self.sessions.consumed_seq.get(identity, -1):
            return []  # a repeat of a credit already used
        if identity not in self.sessions.idle:
            log.debug(kv("worker idle", worker_id=msg.worker_id, seq=msg.seq))
        self.sessions.idle[identity] = (msg.seq, now)
        return self._assign(now)

    def _on_bye(self, identity: bytes, msg: WorkerBye, now: float) -> list[Outgoing]:
        self._forget(identity)
        log.info(kv("worker left", worker_id=msg.worker_id))
        return []

    def _holder(self, identity: bytes, job_id: int, attempt: int, now: float) -> Lease | None:
        """The lease if ``identity`` holds this attempt; re-adopts a job that went back
        to the queue but was not handed out again (e.g. across a dispatcher restart)."""
        lease = self.leases.get(job_id)
        if lease is not None:
            if lease.ending is not None and lease.ending.kind != LAND:
                return None  # taken back; the write of that waits for the database
            if lease.owner == identity and lease.attempt == attempt:
                return lease
            if lease.attempt == attempt and lease.unowned:
                lease.owner = identity
                return lease
            return None
        if self.options.dry_run:
            return None
        deadline = now + self.config.queue.lease_seconds
        job = self._write(now, self.store.readopt, job_id, attempt, identity.decode(), deadline)
        if job is None:
            return None
        lease = self.leases[job_id] = Lease(job, identity, deadline, now)
        self.admission.reserve(job_id, job.anime_id)
        self._counts_dirty = True
        log.info(kv("lease re-adopted from heartbeat", job_id=job_id, attempt=attempt,
                    worker_id=owner_worker_id(identity)))
        return lease

    def _cancel(self, identity: bytes, job_id: int, attempt: int, reason: str) -> list[Outgoing]:
        log.warning(kv("refused a worker that does not hold the lease", job_id=job_id,
                       attempt=attempt, worker_id=owner_worker_id(identity), reason=reason))
        return [(identity, JobCancel(job_id=job_id, attempt=attempt, reason=reason))]

    def _on_heartbeat(self, identity: bytes, msg: JobHeartbeat, now: float) -> list[Outgoing]:
        lease = self._holder(identity, msg.job_id, msg.attempt, now)
        if lease is None:
            return self._cancel(identity, msg.job_id, msg.attempt, "lease lost")
        self.sessions.idle.pop(identity, None)
        self.sessions.workers[identity].state = msg.state
        self._alive(lease, now)
        lease.bytes, lease.percent = msg.bytes, msg.percent
        lease.speed_bps, lease.eta_seconds, lease.state = msg.speed_bps, msg.eta_seconds, msg.state
        self.admission.written(msg.job_id, msg.bytes)
        return []

    def _alive(self, lease: Lease, now: float) -> None:
        """The holder was heard: its lease runs on (written in the next batch, see tick)."""
        lease.deadline = now + self.config.queue.lease_seconds
        lease.deadline_dirty = True

    def _on_finished(self, identity: bytes, msg: JobFinished, now: float) -> list[Outgoing]:
        lease = self._holder(identity, msg.job_id, msg.attempt, now)
        if lease is None:
            return self._cancel(identity, msg.job_id, msg.attempt, "lease lost before landing")
        job = lease.job
        landed = layout.find_landed(self.config.storage_dir, job.anime_id, job.episode or 0)
        target = layout.episode_path(self.config.storage_dir, job.anime_id, job.episode or 0, msg.ext)
        if landed is not None and landed != target:
            return self._cancel(identity, msg.job_id, msg.attempt, f"episode already at {landed}")
        lease.committed_path = str(target)
        self._alive(lease, now)
        self.admission.written(msg.job_id, msg.size_bytes)
        return [(identity, JobCommit(job_id=msg.job_id, attempt=msg.attempt,
                                     video_path=str(target)))]

    def _on_landed(self, identity: bytes, msg: JobLanded, now: float) -> list[Outgoing]:
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        lease = self.leases.get(msg.job_id)
        if lease is None or lease.attempt != msg.attempt:
            return self._landed_without_lease(identity, msg, lease, now)
        why = self._landing_refusal(lease, identity, msg)
        if why is not None:
            log.error(kv("refused a landing", job_id=msg.job_id, attempt=msg.attempt,
                         worker_id=owner_worker_id(identity), path=msg.video_path, why=why))
            return ack  # nothing recorded; the lease runs out, then the file is looked for
        # No idle.pop here: a worker asks for its next job right behind its landing, so a
        # credit it holds now (a landing re-sent after its ready) is a real one.
        if lease.ending is None or lease.ending.kind != LAND:  # a landed file beats a requeue
            lease.ending = Ending(LAND, video_path=msg.video_path, size=msg.size_bytes,
                                  duration=msg.duration_seconds)
            if msg.title_mismatch:
                from services.dispatcher.status_view import mismatch_entry

                self.title_mismatches.appendleft(mismatch_entry(lease.job, msg.site_title, now))
        self._alive(lease, now)
        return ack if self._end(lease, now) else []

    def _landing_refusal(self, lease: Lease, identity: bytes, msg: JobLanded) -> str | None:
        """Why a landing of the lease's attempt is not believed, or None: it must come from
        the holder, at the path the commit gave (or, after a restart of the dispatcher,
        the job's episode path, where the file must be)."""
        if lease.owner != identity and not (lease.unowned and lease.ending is None):
            return "sender does not hold the lease"
        if lease.committed_path is not None:
            return None if msg.video_path == lease.committed_path else (
                f"not the path of its commit ({lease.committed_path})")
        job = lease.job
        landed = layout.find_landed(self.config.storage_dir, job.anime_id, job.episode or 0)
        return None if landed is not None and str(landed) == msg.video_path else (
            "no such file at the job's episode path")

    def _landed_without_lease(self, identity: bytes, msg: JobLanded, lease: Lease | None,
                              now: float) -> list[Outgoing]:
        """A landing of an attempt we hold no lease for: a repeat after our commit, or a file
        renamed after its lease was lost (then the job is settled from the file)."""
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        row = self._read(now, self.store.get, msg.job_id)
        if row is None:
            return ack
        if row.stage == STAGE_DOWNLOADED and row.video_path == msg.video_path:
            return ack  # a repeat after our commit
        if row.stage not in (STAGE_QUEUED, STAGE_DOWNLOADING) or not 1 <= msg.attempt <= row.attempt:
            return ack
        landed = layout.find_landed(self.config.storage_dir, row.anime_id, row.episode or 0)
        if landed is None or str(landed) != msg.video_path:
            return ack
        if lease is not None and lease.ending is not None:
            return []  # the newer attempt is ending already; the worker re-sends
        # Renamed after a commit, then our lease state was lost: settle it, and take the job
        # back from whoever holds a newer attempt (it gets JobCancel).
        if not self._write(now, self.store.mark_downloaded, msg.job_id, row.attempt,
                           msg.video_path, msg.size_bytes, msg.duration_seconds, now,
                           (STAGE_DOWNLOADING, STAGE_QUEUED)):
            return []  # changed meanwhile: look again at the re-send
        if self.leases.pop(msg.job_id, None) is not None:
            self.admission.release(msg.job_id, now)
        self._counts_dirty = True
        log.warning(kv("settled a landed file without a second download", job_id=msg.job_id,
                       path=msg.video_path, why="landed after its lease was lost"))
        return ack

    def _on_failed(self, identity: bytes, msg: JobFailed, now: float) -> list[Outgoing]:
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        lease = self.leases.get(msg.job_id)
        if lease is None or lease.owner != identity or lease.attempt != msg.attempt:
            return ack  # a repeat, or an attempt we already took back
        self.sessions.idle.pop(identity, None)
        if msg.reason == REASON_DRY_RUN:  # nothing to write (the store writes nothing)
            self.leases.pop(msg.job_id)
            self.admission.reservations.pop(msg.job_id, None)  # nothing written: nothing settles
            self.dry_run_done += 1
            log.info(kv("dry run: would run", argv=msg.argv, **self._context(lease)))
            return ack
        if lease.ending is None:
            lease.ending = self._failure_ending(lease, msg, now)
        if lease.ending.kind != LAND:
            self._alive(lease, now)  # it is waiting for our answer, not silent
        return ack if self._end(lease, now) else []

    def _failure_ending(self, lease: Lease, msg: JobFailed, now: float) -> Ending:
        if msg.reason == REASON_INVALID:
            return Ending(FAIL, error=msg.error, reason=msg.reason)
        if msg.reason == REASON_NO_SPACE:
            self.admission.no_space_at = now
            self._request_measure("no space left on device", now)
        if msg.reason == REASON_STORAGE:  # not counted; hand out nothing until the watcher looked
            self.admission.storage_failed_at = now
            self._request_measure("a worker found the storage unavailable", now)
        count = msg.reason in COUNTED_REASONS
        error = msg.error
        streak = self._streaks.get(lease.job.id, 0)
        if msg.reason == REASON_INTERRUPTED and streak + 1 >= INTERRUPTED_CAP:
            count = True
            error = f"{msg.error} (interrupted {streak + 1} times in a row: counted as a retry)"
        return Ending(REQUEUE, error=error, count_retry=count, reason=msg.reason)

    # --- ending leases: the write first, then memory ----------------------------

    def _end(self, lease: Lease, now: float) -> bool:
        """Write the lease's ending; True once it is done (memory then follows), False
        while the database is unavailable (memory unchanged; tried again on a later tick)."""
        e = lease.ending
        assert e is not None
        job = lease.job
        stage: str | None = None  # a requeue's new stage (queued, or failed after retries)
        try:
            if e.kind == LAND:
                ok = self._write(now, self.store.mark_downloaded, job.id, job.attempt,
                                 e.video_path, e.size, e.duration, now, e.stages)
            elif e.kind == FAIL:
                ok = self._write(now, self.store.mark_failed, job.id, job.attempt,
                                 e.error or "failed", now)
            else:
                stage = self._write(now, self.store.requeue, job.id, job.attempt, e.count_retry,
                                    e.error, self._backoff_at(now), now,
                                    self._not_before(job.id, e, now))
                ok = stage is not None
        except StoreUnavailable:
            return False
        if not ok:
            self._changed_elsewhere(lease, now)
            return True
        self._drop(lease, now)
        after = {LAND: self._after_land, FAIL: self._after_fail, REQUEUE: self._after_requeue}
        after[e.kind](lease, stage, now)
        return True

    def _drop(self, lease: Lease, now: float) -> None:
        self.leases.pop(lease.job.id, None)
        self.admission.release(lease.job.id, now)
        self._counts_dirty = True
        if lease.ending is None or lease.ending.kind == REQUEUE:
            self._queue_empty = False  # the job may be back in the queue

    def _context(self, lease: Lease) -> dict:
        job = lease.job
        return dict(job_id=job.id, anime_id=job.anime_id, episode=job.episode,
                    worker_id=owner_worker_id(lease.owner) if lease.owner != DISPATCHER else None)

    def _after_land(self, lease: Lease, stage: str | None, now: float) -> None:
        e, job = lease.ending, lease.job
        assert e is not None
        self._streaks.pop(job.id, None)
        if e.settled is not None:
            log.warning(kv("settled a landed file without a second download", job_id=job.id,
                           anime_id=job.anime_id, episode=job.episode, path=e.video_path,
                           why=e.settled))
            self._cleanup_private_dir_if_free(job.id)
            return
        self.admission.record_size(job.anime_id, e.size)
        self.landed_recent.append((now, e.size))
        if not self.leases:
            # With downloads still running the disk-watcher re-measures at least once a
            # second anyway (one request per landing cost a measurement and a publication,
            # 25 a second at full speed); after the last one it would wait.
            self._request_measure("download landed", now)
        log.info(kv("downloaded", **self._context(lease), size=e.size, path=e.video_path,
                    seconds=round(now - lease.started_at, 3)))

    def _after_fail(self, lease: Lease, stage: str | None, now: float) -> None:
        self._streaks.pop(lease.job.id, None)
        self._cleanup_private_dir(lease.job.id)
        log.error(kv("failed", **self._context(lease), error=lease.ending.error))

    def _after_requeue(self, lease: Lease, stage: str | None, now: float) -> None:
        e, job = lease.ending, lease.job
        assert e is not None
        context = dict(self._context(lease), reason=e.reason or None)
        if stage == STAGE_FAILED:
            self._streaks.pop(job.id, None)
            self._cleanup_private_dir(job.id)
            log.error(kv("failed after retries", error=e.error, **context))
        elif e.count_retry:
            self._streaks.pop(job.id, None)
            log.warning(kv("retry scheduled", error=e.error, **context))
        else:
            if e.reason in UNCOUNTED_REASONS:
                self._streaks[job.id] = self._streaks.pop(job.id, 0) + 1
                while len(self._streaks) > STREAKS_KEPT:
                    self._streaks.popitem(last=False)
            log.info(kv("requeued without counting a retry", error=e.error, **context))

    def _changed_elsewhere(self, lease: Lease, now: float) -> None:
        """The row is not the attempt we hold any more: another program changed it. It is
        left as it is, to its new owner; the worker (if any) is told to stop."""
        job = lease.job
        try:
            row = self._read(now, self.store.get, job.id)
        except StoreUnavailable:
            row = None
        log.warning(kv(f"{CHANGED_ELSEWHERE}: left to it", **self._context(lease),
                       attempt=job.attempt, stage=getattr(row, "stage", None),
                       row_attempt=getattr(row, "attempt", None),
                       wanted=lease.ending.kind if lease.ending else "lease"))
        self._drop(lease, now)
        self._queue_empty = False  # the other program may have queued it again
        self._streaks.pop(job.id, None)
        # A worker still downloading is told to stop; one waiting for an answer gets its ack.
        if lease.ending is None and lease.owner != DISPATCHER and not lease.unowned:
            self._outbox.append((lease.owner, JobCancel(job_id=job.id, attempt=job.attempt,
                                                        reason=CHANGED_ELSEWHERE)))

    def _backoff_at(self, now: float) -> Callable[[int], float | None]:
        base = self.config.downloader.retry_backoff_seconds
        cap = self.config.downloader.retry_backoff_max_seconds

        def at(retry_count: int) -> float | None:
            if base <= 0:
                return None
            delay = min(cap, base * 2 ** max(0, retry_count - 1))
            return now + min(cap, delay * self.rng.uniform(0.75, 1.25))  # the cap holds

        return at

    def _not_before(self, job_id: int, e: Ending, now: float) -> float | None:
        """The hold of a requeue that counts no retry: none the first time in a row."""
        streak = self._streaks.get(job_id, 0)
        if e.count_retry or streak == 0 or e.reason not in UNCOUNTED_REASONS:
            return None
        delay = min(UNCOUNTED_BACKOFF_MAX, UNCOUNTED_BACKOFF_FIRST * 2 ** (streak - 1))
        return now + delay * self.rng.uniform(0.75, 1.25)

    def _cleanup_private_dir(self, job_id: int) -> None:
        if not self.options.dry_run:
            shutil.rmtree(layout.job_dir(self.config.storage_dir, job_id), ignore_errors=True)

    def _lease_lost(self, lease: Lease, now: float, why: str) -> None:
        job = lease.job
        landed = layout.find_landed(self.config.storage_dir, job.anime_id, job.episode or 0)
        if landed is not None:
            self._settle_landed(lease, landed, now, why)
            return
        lease.ending = Ending(REQUEUE, error=f"Lease lost: {why}", count_retry=True)
        self._end(lease, now)

    def _settle_landed(self, lease: Lease, path: Path, now: float, why: str) -> None:
        """The episode is at its final path already: record it, without a second download."""
        try:
            size = path.stat().st_size
        except OSError:  # gone again (a transcriber moved it): look again next time
            lease.ending = Ending(REQUEUE, error=f"Lease lost: {why}", count_retry=True)
        else:
            lease.ending = Ending(LAND, video_path=str(path), size=size,
                                  stages=(STAGE_DOWNLOADING, STAGE_QUEUED), settled=why)
        self._end(lease, now)

    def _cleanup_private_dir_if_free(self, job_id: int) -> None:
        """Remove a settled job's private directory unless a worker still holds its lock
        (that worker gets JobCancel or JobAck and removes it itself)."""
        lock = layout.job_dir(self.config.storage_dir, job_id) / ".lock"
        if self.options.dry_run or not lock.parent.is_dir():
            return
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        finally:
            os.close(fd)
        self._cleanup_private_dir(job_id)

    def undeliverable(self, identity: bytes, msg: Message, now: float) -> None:
        """A message the ROUTER could not route: its worker is gone."""
        self._forget(identity)
        if isinstance(msg, JobAssign):
            lease = self.leases.get(msg.job_id)
            if lease is not None and lease.owner == identity and lease.ending is None:
                lease.ending = Ending(REQUEUE, reason="worker gone before the job reached it")
                self._end(lease, now)

    # --- disk ---------------------------------------------------------------

    def on_disk_state(self, msg: DiskStateMsg, now: float) -> list[Outgoing]:
        previous = self.admission.state.state if self.admission.state else None
        self.admission.on_disk_state(msg, now)
        if msg.state != previous:
            log.info(kv("disk state", state=msg.state, reason=msg.reason or None,
                        usage=msg.usage_bytes, free=msg.free_bytes, seq=msg.seq))
        return self._flush_outbox(self._assign(now))

    def _request_measure(self, reason: str, now: float) -> None:
        self.disk_requests.append(DiskMeasure(reason=reason, requested_at=now))
        self._measure_requested_at = now

    # --- time ---------------------------------------------------------------

    def stalled(self, seconds: float, now: float) -> None:
        """The loop could not run for ``seconds`` (blocked, or the machine suspended): the
        workers' heartbeats of that time may still wait in the socket, so no lease runs
        out for it."""
        log.warning(kv("dispatcher loop was stalled: lease deadlines moved on by as much",
                       seconds=round(seconds, 2), leases=len(self.leases)))
        for lease in self.leases.values():
            lease.deadline += seconds

    def tick(self, now: float) -> list[Outgoing]:
        disk_stale = self.admission.state is not None and not self.admission.fresh(now)
        if disk_stale != self._disk_stale:  # workers stop asking too: say it here, once
            self._disk_stale = disk_stale
            if disk_stale:
                log.warning(kv("disk state is stale: handing out nothing until the disk-watcher "
                               "is back", age=round(now - self.admission.received_at, 1)))
            else:
                log.info(kv("disk state is fresh again"))
        self._write_deadlines(now)
        for lease in [l for l in self.leases.values() if l.ending is not None]:
            if not self._end(lease, now):
                break  # the database is unavailable: the others wait for the next tick
        for lease in [l for l in self.leases.values() if l.deadline < now and l.ending is None]:
            self._lease_lost(lease, now, f"no heartbeat for {self.config.queue.lease_seconds:g}s")
        for identity in self.sessions.silent(now):
            self._forget(identity)
            log.info(kv("worker silent, forgotten", worker_id=owner_worker_id(identity)))
        self._refresh_counts(now)
        self.storage.poll(now)
        return self._flush_outbox(self._assign(now))

    def _write_deadlines(self, now: float) -> None:
        """The deadlines heartbeats extended, in one short transaction per tick rather than
        one write per heartbeat; a row that is no longer ours is left to its new owner."""
        dirty = [l for l in self.leases.values() if l.deadline_dirty and l.ending is None]
        if not dirty or self.options.dry_run:
            return
        try:
            lost = set(self._write(now, self.store.extend_leases,
                                   [(l.job.id, l.attempt, l.deadline) for l in dirty]))
        except StoreUnavailable:
            return
        for lease in dirty:
            lease.deadline_dirty = False
            if lease.job.id in lost:
                self._changed_elsewhere(lease, now)

    def _assign(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        while self.sessions.idle and not self.stopping and self.started:
            refusal = self.admission.refusal(now)
            if refusal != self._last_refusal:
                if refusal:
                    log.info(kv("not handing out work", why=refusal))
                elif self._last_refusal:
                    log.info(kv("handing out work again"))
                self._last_refusal = refusal
            if refusal:
                if self.admission.measurement_too_old(now) and now - self._measure_requested_at > 1:
                    self._request_measure("admission against an old measurement", now)
                break
            if self._queue_empty:
                retry_at = self.detail.get("next_retry_at")
                if retry_at is None or now < retry_at:
                    break
                self._queue_empty = False  # a backoff ran out since the queue looked empty
                self.detail["next_retry_at"] = None
            identity, (seq, _) = next(iter(self.sessions.idle.items()))
            try:
                job = self._write(now, self.store.claim_next, identity.decode(),
                                  now + self.config.queue.lease_seconds, now)
            except StoreUnavailable:
                break  # the credit stays; tried again on a later tick
            if job is None:
                self._queue_empty = True
                break
            self._counts_dirty = True
            if self._dispose_unrunnable(job, now):
                continue
            del self.sessions.idle[identity]
            self.sessions.consumed_seq[identity] = seq
            out.append((identity, self._lease(job, identity, now)))
        return out

    def _dispose_unrunnable(self, job: ClaimedJob, now: float) -> bool:
        """End a claimed row that is not to be downloaded; the dispatcher holds it (as a
        lease of its own) until that write has committed."""
        problem = validate(job)
        landed = None
        if problem is None and not self.options.dry_run:
            landed = layout.find_landed(self.config.storage_dir, job.anime_id, job.episode or 0)
        if problem is None and landed is None:
            return False
        lease = self.leases[job.id] = Lease(job, DISPATCHER, float("inf"), now)
        if problem is not None:
            lease.ending = Ending(FAIL, error=problem, reason=REASON_INVALID)
            self._end(lease, now)
        else:
            self._settle_landed(lease, landed, now, "already at its final path")
        return True

    def _lease(self, job: ClaimedJob, identity: bytes, now: float) -> JobAssign:
        lease_seconds = self.config.queue.lease_seconds
        self.leases[job.id] = Lease(job, identity, now + lease_seconds, now)
        self.admission.reserve(job.id, job.anime_id)
        self.sessions.workers[identity].state = "downloading"
        # DEBUG: the worker logs the start ("ani-cli started"), this log keeps the outcomes
        log.debug(kv("assigned", job_id=job.id, anime_id=job.anime_id, episode=job.episode,
                    worker_id=owner_worker_id(identity), attempt=job.attempt,
                    reserved=self.admission.reservations[job.id].bytes))
        return JobAssign(job_id=job.id, attempt=job.attempt, anime_id=job.anime_id,
                         anime_title=str(job.anime_title), episode=int(job.episode or 0),
                         selected_index=int(job.selected_index or 0),
                         selected_title=str(job.selected_title or ""),
                         confidence=str(job.confidence or ""), lease_seconds=lease_seconds,
                         rate_limit_bps=self._rate_share(), dry_run=self.options.dry_run,
                         retry_count=int(job.retry_count or 0),
                         storage_id=self.storage.storage_id)

    def _rate_share(self) -> int:
        """A worker's share of total_bandwidth_mbps, in bytes/s, fixed for the whole attempt.

        Divided among the workers connected, and at least among the workers started with
        the dispatcher: they connect one by one, and the first jobs handed out must not
        take the whole of it (4 workers would otherwise draw 1 + 1/2 + 1/3 + 1/4 of it).
        """
        total = self.config.downloader.total_bandwidth_mbps * 1_000_000 / 8
        if total <= 0:
            return 0
        return max(1, int(total / max(1, len(self.sessions.workers), self.options.workers)))

    # --- counts, status, completion -----------------------------------------

    def _refresh_counts(self, now: float, force: bool = False) -> bool:
        """Refresh the counts if due; False if the database could not be read (the old
        counts stay, and the next tick tries again)."""
        # These queries pass over the whole queue (about 40 ms CPU at 100,000 jobs): only when
        # something changed (our writes, another connection's commit, a backoff running out),
        # at most once a second (up to 5 s if a pass is slow: 4 % of the loop's time), and
        # every COUNTS_REFRESH_SECONDS as a safety net.
        # Sticky until a pass runs: a commit seen inside the rate limit must not be forgotten.
        try:
            self._external_change |= self._read(now, self.store.changed_elsewhere)
            external = self._external_change
            if not force:
                if now - self._counts_at < min(5.0, max(1.0, 25 * self._refresh_cost)):
                    return True
                retry_due = (self.detail.get("next_retry_at") or float("inf")) <= now
                due = now - self._counts_at >= COUNTS_REFRESH_SECONDS
                if not (self._counts_dirty or external or retry_due or due):
                    return True
            started = time.perf_counter()
            counts = self._read(now, self.store.stage_counts)
            detail = self._read(now, self.store.queue_detail, now)
            failures = self._read(now, self.store.recent_failures)
            # Only new rows from another program can add a series without a selection.
            without = (self._read(now, self.store.animes_without_selection)
                       if (external or force) else None)
        except StoreUnavailable:
            return False
        self.counts, self.detail, self.failures = counts, detail, failures
        self._counts_at, self._counts_dirty, self._external_change = now, False, False
        self._queue_empty = False
        self._refresh_cost = time.perf_counter() - started
        if without is not None:
            # Kept to the series still without a selection: bounded, and a series that
            # loses its selection again is logged again.
            self._no_selection_logged &= set(without)
            for anime_id in without:
                if anime_id not in self._no_selection_logged:
                    self._no_selection_logged.add(anime_id)
                    log.error(kv(f"No cached selection for MAL ID {anime_id}", anime_id=anime_id))
        return True

    def done(self, now: float) -> bool:
        """Nothing runnable is queued and nothing is in flight (or waiting to be written)."""
        if self.leases or not self.started:
            return False
        if not self._refresh_counts(now, force=True):
            return False
        return self.detail["runnable"] <= 0

    def summary(self, now: float) -> dict:
        """Raises StoreUnavailable when the counts cannot be read now."""
        if not self._refresh_counts(now, force=True):
            raise StoreUnavailable(self.db.error or "database busy")
        result = {
            "downloaded": self.counts.get(STAGE_DOWNLOADED, 0),
            "failed": self.counts.get(STAGE_FAILED, 0),
            "waiting_for_selection": self.detail["waiting_for_selection"],
            "still_queued": self.counts.get(STAGE_QUEUED, 0),
        }
        if self.options.dry_run:
            result["dry_run_would_download"] = self.dry_run_done
        return result

    def status(self, now: float) -> dict:
        from services.dispatcher.status_view import build_status

        return build_status(self, now)
