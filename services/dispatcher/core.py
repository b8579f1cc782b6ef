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
from typing import Callable

from shared import layout
from shared.config import Config
from shared.lifecycle import kv
from shared.models import STAGE_DOWNLOADED, STAGE_DOWNLOADING, STAGE_FAILED, STAGE_QUEUED
from shared.protocol import (REASON_DRY_RUN, REASON_ERROR,
                             REASON_INVALID, REASON_NO_SPACE, REASON_STORAGE, REASON_TIMEOUT,
                             DiskMeasure, DiskStateMsg, JobAck, JobAssign, JobCancel,
                             JobCommit, JobFailed, JobFinished, JobHeartbeat, JobLanded,
                             Message, WorkerBye, WorkerReady)
from shared.storage import StorageWatch
from services.dispatcher.admission import Admission, peak_factor
from services.dispatcher.store import ClaimedJob, SqlJobStore

log = logging.getLogger(__name__)

Outgoing = tuple[bytes, Message]
COUNTED_REASONS = (REASON_ERROR, REASON_TIMEOUT)
COUNTS_REFRESH_SECONDS = 300.0  # safety net; changes are seen at once (see _refresh_counts)


@dataclass
class Options:
    dry_run: bool = False
    anime_id: int | None = None
    exit_when_done: bool = False
    workers: int = 0  # workers started with it (the launcher's -w); 0: only those connected


@dataclass
class Lease:
    job: ClaimedJob
    owner: bytes
    deadline: float
    started_at: float
    bytes: int = 0
    percent: float | None = None
    speed_bps: float | None = None
    eta_seconds: float | None = None
    state: str = "downloading"
    committed_path: str | None = None  # set once JobCommit was sent

    @property
    def attempt(self) -> int:
        return self.job.attempt


@dataclass
class WorkerSeen:
    worker_id: str
    host: str
    last_seen: float
    state: str = "idle"


def owner_worker_id(identity: bytes) -> str:
    return identity.decode("utf-8", "replace").split("/", 1)[0]


def validate(job: ClaimedJob) -> str | None:
    """The reason a claimed row cannot be downloaded, or None."""
    if job.anime_title is None or not str(job.anime_title).strip():
        return "Invalid job: anime_title is empty"
    if job.episode is None or job.episode < 1:
        return f"Invalid job: episode must be 1 or more, got {job.episode}"
    if job.selected_index is None:
        return f"No cached selection for MAL ID {job.anime_id}"
    if job.selected_index < 1:
        return (f"Invalid selection for MAL ID {job.anime_id}: selected_index must be 1 or "
                f"more (1-based), got {job.selected_index}")
    return None


@dataclass
class Dispatcher:
    store: SqlJobStore
    config: Config
    options: Options = field(default_factory=Options)
    rng: random.Random = field(default_factory=random.Random)
    admission: Admission = field(init=False)
    storage: StorageWatch = field(init=False)  # identifies the storage if nobody did yet
    leases: dict[int, Lease] = field(default_factory=dict)
    idle: OrderedDict = field(default_factory=OrderedDict)  # identity -> (seq, seen_at)
    consumed_seq: dict[bytes, int] = field(default_factory=dict)
    workers: dict[bytes, WorkerSeen] = field(default_factory=dict)
    disk_requests: list[DiskMeasure] = field(default_factory=list)
    stopping: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)
    dry_run_done: int = 0
    failures: list[dict] = field(default_factory=list)
    landed_recent: deque = field(default_factory=lambda: deque(maxlen=10_000))
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

    # --- start-up -----------------------------------------------------------

    def start(self, now: float) -> None:
        """Re-adopt leases, settle landed files, sweep stale private dirs."""
        for size_row in reversed(self.store.recent_sizes()):
            self.admission.record_size(*size_row)
        for row in self.store.leases():
            landed = layout.find_landed(self.config.storage_dir, row.anime_id, row.episode or 0)
            job = self.store.get(row.id)
            claimed = ClaimedJob(row.id, row.anime_id, job.anime_title, row.episode, row.attempt,
                                 job.retry_count or 0, job.max_retries or 0, None, None, None)
            if landed is not None:
                self._settle_landed(claimed, landed, now, "found at start")
                continue
            owner = (row.owner or "unknown").encode()
            self.leases[row.id] = Lease(claimed, owner, now + self.config.queue.lease_seconds, now)
            self.admission.reserve(row.id, row.anime_id)
            log.info(kv("lease re-adopted, waiting for its worker", job_id=row.id,
                        anime_id=row.anime_id, episode=row.episode, owner=row.owner,
                        attempt=row.attempt))
        self.storage.poll(now)
        self._sweep_private_dirs()
        self._refresh_counts(now, force=True)

    def _sweep_private_dirs(self) -> None:
        root = layout.in_progress_root(self.config.storage_dir)
        if self.options.dry_run or not root.is_dir():
            return
        problem = self.storage.problem()  # another installation's private dirs are not stale
        if problem is not None:
            log.warning(kv("not sweeping private directories", why=problem))
            return
        live = self.store.live_job_ids()
        for path in root.iterdir():
            if path.name.startswith("."):
                continue  # .locks
            job_id = layout.job_id_of_dir(path)
            if job_id is None or job_id not in live:
                shutil.rmtree(path, ignore_errors=True)
                log.info(kv("removed stale private directory", path=path, job_id=job_id))

    # --- messages -----------------------------------------------------------

    def handle(self, identity: bytes, msg: Message, now: float) -> list[Outgoing]:
        self._seen(identity, msg, now)
        handler: Callable = {
            WorkerReady: self._on_ready,
            WorkerBye: self._on_bye,
            JobHeartbeat: self._on_heartbeat,
            JobFinished: self._on_finished,
            JobLanded: self._on_landed,
            JobFailed: self._on_failed,
        }.get(type(msg), self._on_unexpected)
        return handler(identity, msg, now)

    def _seen(self, identity: bytes, msg: Message, now: float) -> None:
        if isinstance(msg, (WorkerReady, WorkerBye, JobHeartbeat, JobFinished, JobLanded, JobFailed)):
            seen = self.workers.get(identity)
            if seen is None:
                seen = self.workers[identity] = WorkerSeen(msg.worker_id, getattr(msg, "host", ""), now)
                log.info(kv("worker connected", worker_id=msg.worker_id, owner=identity.decode()))
            seen.last_seen = now

    def _on_unexpected(self, identity: bytes, msg: Message, now: float) -> list[Outgoing]:
        log.warning(kv("dropped message not meant for the dispatcher", kind=msg.KIND,
                       owner=identity.decode("utf-8", "replace")))
        return []

    def _on_ready(self, identity: bytes, msg: WorkerReady, now: float) -> list[Outgoing]:
        self._lose_other_sessions(identity, now)
        self.workers[identity].state = "idle"
        if msg.seq <= self.consumed_seq.get(identity, -1):
            return []  # a repeat of a credit already used
        if identity not in self.idle:
            log.debug(kv("worker idle", worker_id=msg.worker_id, seq=msg.seq))
        self.idle[identity] = (msg.seq, now)
        return self._assign(now)

    def _lose_other_sessions(self, identity: bytes, now: float) -> None:
        """A worker that comes back as a new process has lost its old job."""
        worker_id = owner_worker_id(identity)
        for job_id, lease in list(self.leases.items()):
            if lease.owner != identity and owner_worker_id(lease.owner) == worker_id:
                self._lease_lost(lease, now, f"worker {worker_id} restarted during the download")
        for other in [i for i in self.workers if i != identity and owner_worker_id(i) == worker_id]:
            self.workers.pop(other, None)
            self.idle.pop(other, None)

    def _on_bye(self, identity: bytes, msg: WorkerBye, now: float) -> list[Outgoing]:
        self.idle.pop(identity, None)
        self.workers.pop(identity, None)
        log.info(kv("worker left", worker_id=msg.worker_id))
        return []

    def _holder(self, identity: bytes, job_id: int, attempt: int, now: float) -> Lease | None:
        """The lease if ``identity`` holds this attempt; re-adopts a job that went back
        to the queue but was not handed out again (e.g. across a dispatcher restart)."""
        lease = self.leases.get(job_id)
        if lease is not None:
            if lease.owner == identity and lease.attempt == attempt:
                return lease
            if lease.attempt == attempt and lease.owner.startswith(b"unknown"):
                lease.owner = identity
                return lease
            return None
        if self.options.dry_run:
            return None
        deadline = now + self.config.queue.lease_seconds
        job = self.store.readopt(job_id, attempt, identity.decode(), deadline)
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
        self.idle.pop(identity, None)
        self.workers[identity].state = msg.state
        lease.deadline = now + self.config.queue.lease_seconds
        lease.bytes, lease.percent = msg.bytes, msg.percent
        lease.speed_bps, lease.eta_seconds, lease.state = msg.speed_bps, msg.eta_seconds, msg.state
        self.admission.written(msg.job_id, msg.bytes)
        self.store.extend_lease(msg.job_id, lease.deadline)
        return []

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
        lease.deadline = now + self.config.queue.lease_seconds
        self.admission.written(msg.job_id, msg.size_bytes)
        return [(identity, JobCommit(job_id=msg.job_id, attempt=msg.attempt,
                                     video_path=str(target)))]

    def _on_landed(self, identity: bytes, msg: JobLanded, now: float) -> list[Outgoing]:
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        lease = self.leases.get(msg.job_id)
        if lease is None or lease.attempt != msg.attempt:
            row = self.store.get(msg.job_id)
            if row is not None and row.stage == STAGE_DOWNLOADED and row.video_path == msg.video_path:
                return ack  # a repeat after our commit
            landed = None
            if row is not None and row.stage in (STAGE_QUEUED, STAGE_DOWNLOADING):
                landed = layout.find_landed(self.config.storage_dir, row.anime_id, row.episode or 0)
            if landed is not None and str(landed) == msg.video_path:
                # Renamed after a commit, then our lease state was lost: settle it, and
                # take the job back from whoever holds a newer attempt (it gets JobCancel).
                if self.leases.pop(msg.job_id, None) is not None:
                    self.admission.release(msg.job_id, now)
                self.store.mark_downloaded(msg.job_id, row.attempt, msg.video_path,
                                           msg.size_bytes, msg.duration_seconds, now)
                self._counts_dirty = True
                log.warning(kv("settled a landed file without a second download",
                               job_id=msg.job_id, path=msg.video_path,
                               why="landed after its lease was lost"))
            return ack
        # No idle.pop here: a worker asks for its next job right behind its landing, so a
        # credit it holds now (a landing re-sent after its ready) is a real one.
        self._land(lease, msg.video_path, msg.size_bytes, msg.duration_seconds, now)
        return ack

    def _land(self, lease: Lease, video_path: str, size: int, duration: float | None,
              now: float) -> None:
        job = lease.job
        self.store.mark_downloaded(job.id, job.attempt, video_path, size, duration, now)
        self.leases.pop(job.id, None)
        self.admission.release(job.id, now)
        self.admission.record_size(job.anime_id, size)
        self.landed_recent.append((now, size))
        self._counts_dirty = True
        if not self.leases:
            # With downloads still running the disk-watcher re-measures at least once a
            # second anyway (one request per landing cost a measurement and a publication,
            # 25 a second at full speed); after the last one it would wait.
            self._request_measure("download landed", now)
        log.info(kv("downloaded", job_id=job.id, anime_id=job.anime_id, episode=job.episode,
                    worker_id=owner_worker_id(lease.owner), size=size, path=video_path,
                    seconds=round(now - lease.started_at, 3)))

    def _on_failed(self, identity: bytes, msg: JobFailed, now: float) -> list[Outgoing]:
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        lease = self.leases.get(msg.job_id)
        if lease is None or lease.owner != identity or lease.attempt != msg.attempt:
            return ack  # a repeat, or an attempt we already took back
        self.idle.pop(identity, None)
        context = dict(job_id=msg.job_id, anime_id=lease.job.anime_id, episode=lease.job.episode,
                       worker_id=msg.worker_id, reason=msg.reason)
        if msg.reason == REASON_DRY_RUN:
            self.leases.pop(msg.job_id)
            self.admission.reservations.pop(msg.job_id, None)
            self.store.requeue(msg.job_id, msg.attempt, False, None, lambda n: None)
            self.dry_run_done += 1
            log.info(kv("dry run: would run", argv=msg.argv, **context))
            return ack
        if msg.reason == REASON_INVALID:
            self._end_lease(lease, now)
            self.store.mark_failed(msg.job_id, msg.error, now)
            self._cleanup_private_dir(msg.job_id)
            log.error(kv("failed", error=msg.error, **context))
            return ack
        if msg.reason == REASON_NO_SPACE:
            self.admission.no_space_at = now
            self._request_measure("no space left on device", now)
        if msg.reason == REASON_STORAGE:  # not counted; hand out nothing until the watcher looked
            self.admission.storage_failed_at = now
            self._request_measure("a worker found the storage unavailable", now)
        count = msg.reason in COUNTED_REASONS
        self._requeue(lease, now, count, msg.error, context)
        return ack

    def _requeue(self, lease: Lease, now: float, count_retry: bool, error: str | None,
                 context: dict) -> None:
        self._end_lease(lease, now)
        stage = self.store.requeue(lease.job.id, lease.attempt, count_retry, error,
                                   self._backoff_at(now), now=now)
        if stage == STAGE_FAILED:
            self._cleanup_private_dir(lease.job.id)
            log.error(kv("failed after retries", error=error, **context))
        elif count_retry:
            log.warning(kv("retry scheduled", error=error, **context))
        else:
            log.info(kv("requeued without counting a retry", error=error, **context))

    def _end_lease(self, lease: Lease, now: float) -> None:
        self.leases.pop(lease.job.id, None)
        self.admission.release(lease.job.id, now)
        self._counts_dirty = True
        self._queue_empty = False

    def _backoff_at(self, now: float) -> Callable[[int], float | None]:
        base = self.config.downloader.retry_backoff_seconds
        cap = self.config.downloader.retry_backoff_max_seconds

        def at(retry_count: int) -> float | None:
            if base <= 0:
                return None
            delay = min(cap, base * 2 ** max(0, retry_count - 1))
            return now + min(cap, delay * self.rng.uniform(0.75, 1.25))  # the cap holds

        return at

    def _cleanup_private_dir(self, job_id: int) -> None:
        if not self.options.dry_run:
            shutil.rmtree(layout.job_dir(self.config.storage_dir, job_id), ignore_errors=True)

    def _lease_lost(self, lease: Lease, now: float, why: str) -> None:
        job = lease.job
        landed = layout.find_landed(self.config.storage_dir, job.anime_id, job.episode or 0)
        if landed is not None:
            self._settle_landed(job, landed, now, why)
            self.leases.pop(job.id, None)
            self.admission.release(job.id, now)
            return
        context = dict(job_id=job.id, anime_id=job.anime_id, episode=job.episode,
                       worker_id=owner_worker_id(lease.owner))
        self._requeue(lease, now, True, f"Lease lost: {why}", context)

    def _settle_landed(self, job: ClaimedJob, path: Path, now: float, why: str) -> None:
        size = path.stat().st_size
        self.store.mark_downloaded(job.id, job.attempt, str(path), size, None, now)
        self._counts_dirty = True
        log.warning(kv("settled a landed file without a second download", job_id=job.id,
                       anime_id=job.anime_id, episode=job.episode, path=path, why=why))
        self._cleanup_private_dir_if_free(job.id)

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
        self.idle.pop(identity, None)
        self.workers.pop(identity, None)
        if isinstance(msg, JobAssign):
            lease = self.leases.get(msg.job_id)
            if lease is not None and lease.owner == identity:
                self._requeue(lease, now, False, None, dict(
                    job_id=msg.job_id, anime_id=msg.anime_id, episode=msg.episode,
                    worker_id=owner_worker_id(identity), why="worker gone before the job reached it"))

    # --- disk ---------------------------------------------------------------

    def on_disk_state(self, msg: DiskStateMsg, now: float) -> list[Outgoing]:
        previous = self.admission.state.state if self.admission.state else None
        self.admission.on_disk_state(msg, now)
        if msg.state != previous:
            log.info(kv("disk state", state=msg.state, reason=msg.reason or None,
                        usage=msg.usage_bytes, free=msg.free_bytes, seq=msg.seq))
        return self._assign(now)

    def _request_measure(self, reason: str, now: float) -> None:
        self.disk_requests.append(DiskMeasure(reason=reason, requested_at=now))
        self._measure_requested_at = now

    # --- time ---------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        disk_stale = self.admission.state is not None and not self.admission.fresh(now)
        if disk_stale != self._disk_stale:  # workers stop asking too: say it here, once
            self._disk_stale = disk_stale
            if disk_stale:
                log.warning(kv("disk state is stale: handing out nothing until the disk-watcher "
                               "is back", age=round(now - self.admission.received_at, 1)))
            else:
                log.info(kv("disk state is fresh again"))
        for lease in [l for l in self.leases.values() if l.deadline < now]:
            self._lease_lost(lease, now, f"no heartbeat for {self.config.queue.lease_seconds:g}s")
        stale = now - self.config.queue.lease_seconds
        for identity in [i for i, w in self.workers.items() if w.last_seen < stale]:
            self.workers.pop(identity, None)
            self.idle.pop(identity, None)
            log.info(kv("worker silent, forgotten", worker_id=owner_worker_id(identity)))
        self._refresh_counts(now)
        self.storage.poll(now)
        return self._assign(now)

    def _assign(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        while self.idle and not self.stopping:
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
            identity, (seq, _) = next(iter(self.idle.items()))
            job = self.store.claim_next(identity.decode(), now + self.config.queue.lease_seconds, now)
            if job is None:
                self._queue_empty = True
                break
            self._counts_dirty = True
            if self._dispose_unrunnable(job, now):
                continue
            del self.idle[identity]
            self.consumed_seq[identity] = seq
            out.append((identity, self._lease(job, identity, now)))
        return out

    def _dispose_unrunnable(self, job: ClaimedJob, now: float) -> bool:
        problem = validate(job)
        if problem is not None:
            self.store.mark_failed(job.id, problem, now)
            log.error(kv("failed", job_id=job.id, anime_id=job.anime_id, episode=job.episode,
                         error=problem))
            return True
        landed = layout.find_landed(self.config.storage_dir, job.anime_id, job.episode or 0)
        if landed is not None and not self.options.dry_run:
            self._settle_landed(job, landed, now, "already at its final path")
            return True
        return False

    def _lease(self, job: ClaimedJob, identity: bytes, now: float) -> JobAssign:
        lease_seconds = self.config.queue.lease_seconds
        self.leases[job.id] = Lease(job, identity, now + lease_seconds, now)
        self.admission.reserve(job.id, job.anime_id)
        self.workers[identity].state = "downloading"
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
        return max(1, int(total / max(1, len(self.workers), self.options.workers)))

    # --- counts, status, completion -----------------------------------------

    def _refresh_counts(self, now: float, force: bool = False) -> None:
        # These queries pass over the whole queue (about 40 ms CPU at 100,000 jobs): only when
        # something changed (our writes, another connection's commit, a backoff running out),
        # at most once a second (up to 5 s if a pass is slow: 4 % of the loop's time), and
        # every COUNTS_REFRESH_SECONDS as a safety net.
        # Sticky until a pass runs: a commit seen inside the rate limit must not be forgotten.
        self._external_change |= self.store.changed_elsewhere()
        external = self._external_change
        if not force:
            if now - self._counts_at < min(5.0, max(1.0, 25 * self._refresh_cost)):
                return
            retry_due = (self.detail.get("next_retry_at") or float("inf")) <= now
            due = now - self._counts_at >= COUNTS_REFRESH_SECONDS
            if not (self._counts_dirty or external or retry_due or due):
                return
        started = time.perf_counter()
        self.counts = self.store.stage_counts()
        self.detail = self.store.queue_detail(now)
        self.failures = self.store.recent_failures()
        self._counts_at, self._counts_dirty, self._external_change = now, False, False
        self._queue_empty = False
        # Only new rows from another program can add a series without a selection.
        without = self.store.animes_without_selection() if (external or force) else []
        self._refresh_cost = time.perf_counter() - started
        for anime_id in without:
            if anime_id not in self._no_selection_logged:
                self._no_selection_logged.add(anime_id)
                log.error(kv(f"No cached selection for MAL ID {anime_id}", anime_id=anime_id))

    def runnable_left(self, now: float) -> int:
        self._refresh_counts(now, force=True)
        return self.detail["runnable"]

    def done(self, now: float) -> bool:
        """Nothing runnable is queued and nothing is in flight."""
        if self.leases:
            return False
        return self.runnable_left(now) <= 0

    def summary(self, now: float) -> dict:
        self._refresh_counts(now, force=True)
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

