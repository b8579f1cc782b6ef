"""Handing out work: a claim for each credit while the disk admits it, as a lease.

A claimed row that is not to be downloaded (invalid, or its episode already at its
final path) is ended by the dispatcher itself, which holds it as a lease of its own
until that write has committed. At start every lease in the database is re-adopted,
waiting for its worker; a job that went back to the queue but was not handed out
again is re-adopted by the worker still downloading it (its heartbeat says so), so
a restart of the dispatcher never costs a second download.
"""

from __future__ import annotations

import logging

from shared.config import Config
from shared.logfmt import kv
from shared.protocol import REASON_INVALID, JobAssign, Message
from services.dispatcher.counts import QueueCounts
from services.dispatcher.db_health import Database
from services.dispatcher.disk_hooks import DiskHooks
from services.dispatcher.effects import Effects
from services.dispatcher.endings import Endings
from services.dispatcher.holds import HostHolds
from services.dispatcher.leases import (DISPATCHER, FAIL, Ending, Lease, LeaseTable,
                                        owner_worker_id, validate)
from services.dispatcher.sessions import Sessions
from services.dispatcher.settlement import Settlement
from services.dispatcher.store import ClaimedJob, JobRow, LeaseRow, StoreUnavailable

log = logging.getLogger(__name__)
Outgoing = tuple[bytes, Message]


class Handout:
    def __init__(self, config: Config, dry_run: bool, workers_started: int, db: Database,
                 leases: LeaseTable, sessions: Sessions, disk: DiskHooks, counts: QueueCounts,
                 settlement: Settlement, endings: Endings, effects: Effects,
                 holds: HostHolds | None = None) -> None:
        self.config, self.dry_run, self.workers_started = config, dry_run, workers_started
        self.holds = holds  # hosts whose workers get no job for now (a Cloudflare block)
        self.db, self.leases, self.sessions, self.disk = db, leases, sessions, disk
        self.admission = disk.admission
        self.counts, self.settlement, self.endings, self.effects = counts, settlement, endings, effects
        # total_bandwidth_mbps now: the config's, until an operator changes it (controls.py)
        self.total_bandwidth_mbps = config.downloader.total_bandwidth_mbps
        self.more = False  # the last assign stopped at its limit with credits left

    @property
    def lease_seconds(self) -> float:
        return self.config.queue.lease_seconds

    def assign(self, now: float, hold: bool, limit: int | None = None) -> list[Outgoing]:
        """One JobAssign per credit while there is work and room; ``hold``: hand out
        nothing (not started yet, or stopping). ``limit``: claims at most, then ``more``
        says whether credits were left waiting (a hundred idle workers after a pause are
        a hundred claims: the loop serves status requests between its chunks)."""
        out: list[Outgoing] = []
        claims = 0
        self.more = False
        while self.sessions.idle and not hold:
            if self.disk.refusal(now) or self.counts.nothing_to_claim(now):
                break
            if limit is not None and claims >= limit:
                self.more = True
                break
            picked = self._next_idle(now)
            if picked is None:
                break  # every idle worker is on a host held after a Cloudflare block
            claims += 1
            identity, seq = picked
            try:
                job = self.db.write(now, self.db.store.claim_next, identity.decode(),
                                    now + self.lease_seconds, now)
            except StoreUnavailable:
                break  # the credit stays; tried again on a later tick
            if job is None:
                self.counts.queue_empty = True
                break
            # No counts.changed(): the store counts the claim's move (counts.py).
            if self._dispose_unrunnable(job, now):
                continue
            self.sessions.used(identity, seq)
            out.append((identity, self._lease(job, identity, now)))
        return out

    def _next_idle(self, now: float) -> tuple[bytes, int] | None:
        """The first idle worker whose host is not held (holds.py), and its credit's seq."""
        for identity, (seq, _) in self.sessions.idle.items():
            seen = self.sessions.workers.get(identity)
            if self.holds is None or not self.holds.held(seen.host if seen else "", now):
                return identity, seq
        return None

    def _dispose_unrunnable(self, job: ClaimedJob, now: float) -> bool:
        """End a claimed row that is not to be downloaded; the dispatcher holds it (as a
        lease of its own) until that write has committed."""
        problem = validate(job)
        landed = None
        if problem is None and not self.dry_run:
            landed = self.settlement.landed(job)
        if problem is None and landed is None:
            return False
        lease = self.leases[job.id] = Lease(job, DISPATCHER, float("inf"), now)
        if problem is not None:
            lease.ending = Ending(FAIL, error=problem, reason=REASON_INVALID)
            self.endings.end(lease, now)
        else:
            assert landed is not None
            self.endings.settle(lease, landed, now, "already at its final path")
        return True

    def _lease(self, job: ClaimedJob, identity: bytes, now: float) -> JobAssign:
        rate = self.rate_share()
        self.leases[job.id] = Lease(job, identity, now + self.lease_seconds, now, rate_bps=rate)
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
                         confidence=str(job.confidence or ""), lease_seconds=self.lease_seconds,
                         rate_limit_bps=rate, dry_run=self.dry_run,
                         retry_count=int(job.retry_count or 0),
                         storage_id=self.effects.storage_id)

    def rate_share(self) -> int:
        """A worker's share of total_bandwidth_mbps, in bytes/s, fixed for the whole attempt.

        Divided among the workers connected, and at least among the workers started with
        the dispatcher: they connect one by one, and the first jobs handed out must not
        take the whole of it (4 workers would otherwise draw 1 + 1/2 + 1/3 + 1/4 of it).
        """
        total = self.total_bandwidth_mbps * 1_000_000 / 8
        if total <= 0:
            return 0
        return max(1, int(total / max(1, len(self.sessions.workers), self.workers_started)))

    def readopt(self, identity: bytes, job_id: int, attempt: int, now: float) -> Lease | None:
        """Give a queued job back to the worker still downloading its last attempt (its
        heartbeat or its report came in); None if the row is not that any more."""
        if self.endings.was_stopped(job_id, attempt):
            return None  # the operator stopped it: its heartbeat was on its way
        deadline = now + self.lease_seconds
        job = self.db.write(now, self.db.store.readopt, job_id, attempt, identity.decode(), deadline)
        if job is None:
            return None
        lease = self.leases[job_id] = Lease(job, identity, deadline, now)
        self.admission.reserve(job_id, job.anime_id)
        self.counts.changed()
        log.info(kv("lease re-adopted from heartbeat", job_id=job_id, attempt=attempt,
                    worker_id=owner_worker_id(identity)))
        return lease

    def readopt_at_start(self, rows: list[LeaseRow], jobs: dict[int, JobRow | None],
                         now: float) -> None:
        """The leases the database holds at start: each waits for its worker (a heartbeat
        or a report of that attempt), or is settled at once if its episode has landed."""
        for row in rows:
            job = jobs[row.id]
            if job is None:
                continue  # deleted by another program between the two reads
            claimed = ClaimedJob(row.id, row.anime_id, job.anime_title, row.episode, row.attempt,
                                 job.retry_count or 0, job.max_retries or 0, None, None, None)
            owner = (row.owner or "unknown").encode()
            lease = self.leases[row.id] = Lease(claimed, owner, now + self.lease_seconds, now)
            landed = self.settlement.landed(claimed)
            if landed is not None:
                self.endings.settle(lease, landed, now, "found at start")
                continue
            self.admission.reserve(row.id, row.anime_id)
            log.info(kv("lease re-adopted, waiting for its worker", job_id=row.id,
                        anime_id=row.anime_id, episode=row.episode, owner=row.owner,
                        attempt=row.attempt))
