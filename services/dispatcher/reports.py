"""A worker's reports on the job it holds: heartbeats, ``job.finished`` (asking to
land), ``job.landed`` and ``job.failed``, each answered only for the lease holder.

- Fencing: a report of an attempt its sender does not hold gets ``JobCancel`` (or
  just its ack, for a final report: nothing is recorded). A job that went back to the
  queue but was not handed out again is re-adopted by the sender of its attempt.
- ``job.finished`` gets ``JobCommit`` with the final path, unless another file of the
  episode is there already; only a landing at that path is recorded.
- A final report (landed, failed) is acked once its write has committed (endings.py);
  until then the worker re-sends it and hears nothing.
"""

from __future__ import annotations

import logging

from shared import failures
from shared.logfmt import kv
from shared.protocol import (REASON_DRY_RUN, REASON_NO_SPACE, REASON_STORAGE, JobAck,
                             JobCancel, JobCommit, JobFailed, JobFinished, JobHeartbeat,
                             JobLanded, Message)
from services.dispatcher.db_health import Database
from services.dispatcher.disk_hooks import DiskHooks
from services.dispatcher.endings import Endings, context
from services.dispatcher.handout import Handout
from services.dispatcher.leases import LAND, Ending, Lease, LeaseTable, owner_worker_id
from services.dispatcher.recent import Recent
from services.dispatcher.retries import RetryPolicy
from services.dispatcher.sessions import Sessions
from services.dispatcher.settlement import Settlement

log = logging.getLogger(__name__)
Outgoing = tuple[bytes, Message]


class Reports:
    def __init__(self, lease_seconds: float, dry_run: bool, db: Database, leases: LeaseTable,
                 sessions: Sessions, disk: DiskHooks, retries: RetryPolicy,
                 settlement: Settlement, endings: Endings, handout: Handout,
                 recent: Recent) -> None:
        self.lease_seconds, self.dry_run = lease_seconds, dry_run
        self.db, self.leases, self.sessions, self.disk = db, leases, sessions, disk
        self.retries, self.settlement, self.endings = retries, settlement, endings
        self.handout, self.recent = handout, recent

    def _holder(self, identity: bytes, job_id: int, attempt: int, now: float) -> Lease | None:
        """The lease if ``identity`` holds this attempt; re-adopts a job that went back
        to the queue but was not handed out again (e.g. across a dispatcher restart)."""
        if job_id in self.leases:
            return self.leases.held(identity, job_id, attempt)
        if self.dry_run:
            return None
        return self.handout.readopt(identity, job_id, attempt, now)

    def _cancel(self, identity: bytes, job_id: int, attempt: int, reason: str) -> list[Outgoing]:
        log.warning(kv("refused a worker that does not hold the lease", job_id=job_id,
                       attempt=attempt, worker_id=owner_worker_id(identity), reason=reason))
        return [(identity, JobCancel(job_id=job_id, attempt=attempt, reason=reason))]

    def heartbeat(self, identity: bytes, msg: JobHeartbeat, now: float) -> list[Outgoing]:
        lease = self._holder(identity, msg.job_id, msg.attempt, now)
        if lease is None:
            return self._cancel(identity, msg.job_id, msg.attempt, "lease lost")
        self.sessions.busy(identity, msg.state)
        self.leases.alive(lease, now, self.lease_seconds)
        lease.bytes, lease.percent = msg.bytes, msg.percent
        lease.speed_bps, lease.eta_seconds, lease.state = msg.speed_bps, msg.eta_seconds, msg.state
        self.disk.admission.written(msg.job_id, msg.bytes)
        return []

    def finished(self, identity: bytes, msg: JobFinished, now: float) -> list[Outgoing]:
        lease = self._holder(identity, msg.job_id, msg.attempt, now)
        if lease is None:
            return self._cancel(identity, msg.job_id, msg.attempt, "lease lost before landing")
        landed = self.settlement.landed(lease.job)
        target = self.settlement.target(lease.job, msg.ext)
        if landed is not None and landed != target:
            return self._cancel(identity, msg.job_id, msg.attempt, f"episode already at {landed}")
        lease.committed_path = str(target)
        self.leases.alive(lease, now, self.lease_seconds)
        self.disk.admission.written(msg.job_id, msg.size_bytes)
        return [(identity, JobCommit(job_id=msg.job_id, attempt=msg.attempt,
                                     video_path=str(target)))]

    def landed(self, identity: bytes, msg: JobLanded, now: float) -> list[Outgoing]:
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        lease = self.leases.get(msg.job_id)
        if lease is None or lease.attempt != msg.attempt:
            row = self.db.read(now, self.db.store.get, msg.job_id)
            if row is None or self.endings.late_landing(msg, row, lease, now):
                return ack
            return []
        why = self.settlement.landing_refusal(lease, identity, msg)
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
                self.recent.title_mismatch(lease.job, msg.site_title, now)
            self.retries.holds.landed(self._host(identity))
        self.leases.alive(lease, now, self.lease_seconds)
        return ack if self.endings.end(lease, now) else []

    def failed(self, identity: bytes, msg: JobFailed, now: float) -> list[Outgoing]:
        ack = [(identity, JobAck(job_id=msg.job_id, attempt=msg.attempt))]
        lease = self.leases.get(msg.job_id)
        if lease is None or lease.owner != identity or lease.attempt != msg.attempt:
            return ack  # a repeat, or an attempt we already took back
        self.sessions.idle.pop(identity, None)
        if msg.reason == REASON_DRY_RUN:  # nothing to write (the store writes nothing)
            self.leases.pop(msg.job_id)
            self.disk.admission.discard(msg.job_id)  # nothing written: nothing settles
            self.recent.dry_run_done += 1
            log.info(kv("dry run: would run", argv=msg.argv, **context(lease)))
            return ack
        if lease.ending is None:
            lease.ending = self._failure_ending(lease, msg, now)
        if lease.ending.kind != LAND:
            self.leases.alive(lease, now, self.lease_seconds)  # it waits for our answer
        return ack if self.endings.end(lease, now) else []

    def _failure_ending(self, lease: Lease, msg: JobFailed, now: float) -> Ending:
        if msg.reason == REASON_NO_SPACE:
            self.disk.no_space(now)
        if msg.reason == REASON_STORAGE:
            self.disk.storage_failed(now)
        ending = self.retries.failure_ending(lease.job.id, msg)
        if ending.failure_class == failures.CLOUDFLARE:
            host = self._host(lease.owner)
            ending.hold_until = self.retries.holds.block(host, now)
            if ending.hold_until is not None:
                log.warning(kv("blocked by Cloudflare: no new download starts on this host "
                               "until the hold ends", host=host or None,
                               hold_seconds=round(ending.hold_until - now, 1),
                               worker_id=owner_worker_id(lease.owner), job_id=lease.job.id))
        return ending

    def _host(self, identity: bytes) -> str:
        seen = self.sessions.workers.get(identity)
        return seen.host if seen is not None else ""
