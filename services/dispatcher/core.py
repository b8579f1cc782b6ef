"""The dispatcher's logic, with no sockets and no file-system or clock of its own:
``handle(identity, msg, now)`` and ``tick(now)`` return the messages to send, so tests
drive it with a fake clock; the database is the injected store, the storage the
injected effects (effects.py).

Invariants:
- A job is handed out only to a worker that said it is idle (a credit), only
  while the disk admits it, and always as a lease (owner, attempt, deadline).
- Only the lease holder's attempt may land a file: ``JobFinished`` from anyone
  else is answered with ``JobCancel`` and the worker discards its file.
- A lease that expires, or whose worker comes back as a new process, returns
  the job to the queue and counts a retry; unless the episode is already at
  its final path, which settles the job as downloaded without a second download.
- Memory follows the database, never the other way round (endings.py): a write
  that cannot be done now leaves memory as it was and is tried again; only the
  holder of a lease is answered, and only once its write has committed.
- One worker id, one live session (sessions.py).
- A stop hands out nothing more and waits, for a few seconds at most, for the
  hand-backs of the workers that stop with it (stopping.py).

The rooms: leases.py (the lease table), sessions.py (workers, credits),
handout.py (claims and assignments), reports.py (what a worker says of its job),
endings.py (the write, then memory), stopping.py (the stop's grace),
settlement.py (landed files, private directories), retries.py (backoff),
counts.py (the cached counts, completion), disk_hooks.py + admission.py (the disk),
recent.py (the last hour), snapshot.py (what the status sees).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

from shared.config import Config
from shared.logfmt import kv
from shared.protocol import (DiskStateMsg, ControlReply, JobAssign, JobFailed, JobFinished,
                             JobHeartbeat, JobLanded, Message, WorkerBye, WorkerReady)
from services.dispatcher.admission import Admission, peak_factor
from services.dispatcher.controls import Controls
from services.dispatcher.counts import Passes, QueueCounts
from services.dispatcher.db_health import Database
from services.dispatcher.disk_hooks import DiskHooks
from services.dispatcher.effects import Effects
from services.dispatcher.endings import Endings
from services.dispatcher.handout import Handout
from services.dispatcher.leases import REQUEUE, Ending, LeaseTable, owner_worker_id
from services.dispatcher.recent import HOUR, Recent
from services.dispatcher.reports import Reports
from services.dispatcher.retries import RetryPolicy
from services.dispatcher.sessions import Sessions, always_connected
from services.dispatcher.settlement import Settlement
from services.dispatcher.snapshot import StatusSnapshot
from services.dispatcher.stopping import Stopping
from services.dispatcher.store import STATE_MANUAL_PAUSE, SqlJobStore, StoreUnavailable

log = logging.getLogger(__name__)

Outgoing = tuple[bytes, Message]
# Claims in one go after a disk state or a tick; more wait for the next turn of the loop.
ASSIGN_CHUNK = 10
WORKER_MESSAGES = (WorkerReady, WorkerBye, JobHeartbeat, JobFinished, JobLanded, JobFailed)


@dataclass
class Options:
    dry_run: bool = False
    anime_id: int | None = None
    exit_when_done: bool = False
    workers: int = 0  # workers started with it (the launcher's -w); 0: only those connected


class Dispatcher:
    def __init__(self, store: SqlJobStore, effects: Effects, config: Config,
                 options: Options | None = None, rng: random.Random | None = None,
                 connected: Callable[[bytes], bool] = always_connected,
                 passes: Passes | None = None) -> None:
        """``passes``: where the passes over the whole queue run (counts.py); by default
        at once on the store's connection, the server gives them a thread."""
        self.config = config
        self.options = options or Options()
        self.effects = effects
        self.db = Database(store)
        self.leases = LeaseTable()
        self.sessions = Sessions(config.queue.lease_seconds, connected)
        self.admission = Admission(config.disk, peak_factor=peak_factor(config.downloader),
                                   ignore_storage=self.options.dry_run,
                                   dry_run=self.options.dry_run)
        self.disk = DiskHooks(self.admission)
        self.counts = QueueCounts(passes=passes)
        self.recent = Recent()
        self.settlement = Settlement(effects, config.storage_dir)
        self.retries = RetryPolicy(config.downloader, rng or random.Random())
        self.endings = Endings(self.db, self.leases, self.admission, self.counts, self.retries,
                               self.settlement, self.recent, self.disk)
        self.handout = Handout(config, self.options.dry_run, self.options.workers, self.db,
                               self.leases, self.sessions, self.disk, self.counts,
                               self.settlement, self.endings, effects, self.retries.holds)
        self.reports = Reports(config.queue.lease_seconds, self.options.dry_run, self.db,
                               self.leases, self.sessions, self.disk, self.retries,
                               self.settlement, self.endings, self.handout, self.recent)
        self.stop = Stopping(self.leases, self.sessions)
        self.controls = Controls(self.options.dry_run, self.db, self.leases, self.counts,
                                 self.retries, self.settlement, self.endings, self.handout)
        self.started = False

    @property
    def store(self) -> SqlJobStore:
        return self.db.store

    @store.setter
    def store(self, store: SqlJobStore) -> None:
        self.db.store = store

    @property
    def lease_seconds(self) -> float:
        return self.config.queue.lease_seconds

    # --- start-up -----------------------------------------------------------

    def start(self, now: float) -> None:
        """Open the database, re-adopt leases, settle landed files, sweep stale private dirs.

        Raises StoreUnavailable while the database is locked, having changed nothing:
        every read comes before the first change of memory, so calling again is safe."""
        store = self.store
        dirs = self.settlement.private_dirs()
        try:
            store.open()
            sizes = store.recent_sizes()
            landings = store.landings_since(now - HOUR)
            rows = store.leases()
            jobs = {row.id: store.get(row.id) for row in rows}
            live = (store.live_job_ids_among(i for _, i in dirs if i is not None)
                    if dirs is not None else set())
            pause = store.get_state(STATE_MANUAL_PAUSE)
        except StoreUnavailable as exc:
            self.db.health.failed(exc, now, quiet=True)  # the server says it waits, once
            raise
        self.db.health.busy_since, self.db.health.error = None, None
        self.controls.load(pause, now)
        for size_row in reversed(sizes):
            self.admission.record_size(*size_row)
        self.recent.landed_before(landings)  # the last hour counts from the database
        self.handout.readopt_at_start(rows, jobs, now)
        self.effects.poll_storage(now)
        if dirs is not None:
            self.settlement.sweep(dirs, live | set(self.leases))
        self.started = True
        self.counts.refresh(self.db, now, force=True)

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
            JobHeartbeat: self.reports.heartbeat,
            JobFinished: self.reports.finished,
            JobLanded: self.reports.landed,
            JobFailed: self.reports.failed,
        }.get(type(msg), self._on_unexpected)
        try:
            out = handler(identity, msg, now)
        except StoreUnavailable:
            out = []  # nothing changed; the worker re-sends what needs an answer
        return out + self.endings.take_outbox()

    def _on_unexpected(self, identity: bytes, msg: Message, now: float) -> list[Outgoing]:
        log.warning(kv("dropped message not meant for the dispatcher", kind=msg.KIND,
                       owner=identity.decode("utf-8", "replace")))
        return []

    def _admit(self, identity: bytes, key: str, msg: Message, now: float) -> str | None:
        """Why ``identity`` may not speak for its worker id, or None (see sessions.py)."""
        refusal, gone = self.sessions.admit(identity, key, msg, now, self.leases.running_owners)
        for other in gone:
            self._session_gone(other, now, f"worker {owner_worker_id(identity)} restarted "
                                           "during the download")
        return refusal

    def _session_gone(self, identity: bytes, now: float, why: str) -> None:
        """A session that is not coming back: its leases go back to the queue."""
        for lease in self.leases.running_of(identity):
            self.endings.lose(lease, now, why)
        self._forget(identity)

    def _forget(self, identity: bytes) -> None:
        self.sessions.forget(identity, self.leases.worker_owners())

    def _on_ready(self, identity: bytes, msg: WorkerReady, now: float) -> list[Outgoing]:
        if self.sessions.credit(identity, msg, now):
            return self.handout.assign(now, self.holding, ASSIGN_CHUNK)
        return []

    def _on_bye(self, identity: bytes, msg: WorkerBye, now: float) -> list[Outgoing]:
        self._forget(identity)
        log.info(kv("worker left", worker_id=msg.worker_id))
        return []

    def undeliverable(self, identity: bytes, msg: Message, now: float) -> None:
        """A message the ROUTER could not route: its worker is gone."""
        self._forget(identity)
        if isinstance(msg, JobAssign):
            lease = self.leases.get(msg.job_id)
            if lease is not None and lease.owner == identity and lease.ending is None:
                lease.ending = Ending(REQUEUE, reason="worker gone before the job reached it")
                self.endings.end(lease, now)

    # --- the disk, time, stopping ---------------------------------------------

    def on_disk_state(self, msg: DiskStateMsg, now: float) -> list[Outgoing]:
        self.disk.on_state(msg, now)
        return self.assign_more(now)

    def assign_more(self, now: float) -> list[Outgoing]:
        """Up to ASSIGN_CHUNK jobs for the credits waiting; ``more_to_assign`` then says
        whether credits were left (the server calls again after serving status requests)."""
        return self.handout.assign(now, self.holding, ASSIGN_CHUNK) + self.endings.take_outbox()

    @property
    def more_to_assign(self) -> bool:
        return self.handout.more

    def stalled(self, seconds: float, now: float) -> None:
        """The loop could not run for ``seconds`` (blocked, or the machine suspended): the
        workers' heartbeats of that time may still wait in the socket, so no lease runs
        out for it."""
        log.warning(kv("dispatcher loop was stalled: lease deadlines moved on by as much",
                       seconds=round(seconds, 2), leases=len(self.leases)))
        self.leases.stalled(seconds)

    def tick(self, now: float) -> list[Outgoing]:
        self.disk.watch_staleness(now)
        self._write_deadlines(now)
        for lease in self.leases.ending():
            if not self.endings.end(lease, now):
                break  # the database is unavailable: the others wait for the next tick
        for lease in self.leases.expired(now):
            self.endings.lose(lease, now, f"no heartbeat for {self.lease_seconds:g}s")
        for identity in self.sessions.silent(now):
            self._forget(identity)
            log.info(kv("worker silent, forgotten", worker_id=owner_worker_id(identity)))
        self.counts.refresh(self.db, now)
        self.effects.poll_storage(now)
        if self.started:
            self.controls.tick(now)
        return self.assign_more(now)

    def _write_deadlines(self, now: float) -> None:
        """The deadlines heartbeats extended, in one short transaction per tick rather than
        one write per heartbeat; a row that is no longer ours is left to its new owner."""
        dirty = self.leases.dirty()
        if not dirty or self.options.dry_run:
            return
        try:
            lost = set(self.db.write(now, self.store.extend_leases,
                                     [(l.job.id, l.attempt, l.deadline) for l in dirty]))
        except StoreUnavailable:
            return
        for lease in dirty:
            lease.deadline_dirty = False
            if lease.job.id in lost:
                self.endings.changed_elsewhere(lease, now)

    @property
    def stopping(self) -> bool:
        return self.stop.requested

    @property
    def holding(self) -> bool:
        """Hand out nothing: not started yet, stopping, or paused by the operator."""
        return self.stopping or not self.started or self.controls.paused

    # --- the operator's controls ------------------------------------------------

    def control(self, msg: Message, now: float) -> tuple[ControlReply, list[Outgoing]]:
        """An operator's request (controls.py): its reply, and what to send to workers
        (a JobCancel once an ending it decided is written, jobs handed out after a resume
        or a retry)."""
        if not self.started:
            reply = ControlReply(ok=False, message="the dispatcher is starting (waiting for "
                                 "the database); try again", result={"error": "unavailable"})
            return reply, []
        reply = self.controls.handle(msg, now)
        sent = self.endings.take_outbox()
        return reply, sent + self.handout.assign(now, self.holding, ASSIGN_CHUNK) + \
            self.endings.take_outbox()

    def begin_stop(self, now: float, everyone_stops: bool) -> None:
        """A stop was requested: hand out nothing more (see stopping.py)."""
        self.stop.begin(now, everyone_stops)

    def may_exit(self, now: float) -> bool:
        return self.stop.may_exit(now)

    # --- counts, status, completion -------------------------------------------

    def done(self, now: float) -> bool:
        """Nothing runnable is queued and nothing is in flight (or waiting to be written)."""
        if self.leases or not self.started:
            return False
        if self.options.dry_run and not self.counts.refresh(self.db, now, force=True):
            return False  # its claims write nothing: only a pass (inline) says what is left
        if not self.counts.current(self.db, now):
            return False  # asked for a pass if one is needed
        return not self.counts.runnable_left()

    def summary(self, now: float) -> dict:
        """Raises StoreUnavailable when the counts cannot be read now."""
        if not self.counts.current(self.db, now):
            raise self.db.unavailable()
        result = self.counts.summary()
        if self.options.dry_run:
            result["dry_run_would_download"] = self.recent.dry_run_done
        return result

    def drained(self) -> bool:
        """No lease is left and the last claim found the queue empty (then a done check
        is worth making at once)."""
        return not self.leases and self.counts.queue_empty

    def snapshot(self, now: float) -> StatusSnapshot:
        self.counts.collect()
        by_owner = self.leases.by_owner()
        workers = sorted(self.sessions.workers.items(), key=lambda item: item[1].worker_id)
        health = self.db.health
        return StatusSnapshot(
            now=now, dry_run=self.options.dry_run, anime_id=self.options.anime_id,
            stopping=self.stopping, counts=self.counts.stage_counts(),
            detail=self.counts.queue_detail(),
            counted_at=self.counts.counted_at, failures=self.counts.failures,
            workers=[(seen, by_owner.get(identity)) for identity, seen in workers],
            disk_config=self.config.disk, disk_state=self.admission.state,
            disk_fresh=self.admission.fresh(now), reserved_bytes=self.admission.reserved_bytes(),
            refusal=self.controls.refusal(now) or self.admission.explain(now),
            last_hour=self.recent.last_hour(now),
            title_mismatches=list(self.recent.title_mismatches),
            db_busy_since=health.busy_since, db_error=health.error,
            pending_writes=self.leases.pending_writes() if health.busy_since is not None else 0,
            manual_pause=self.controls.status(now), priorities=list(self.controls.priorities),
            bandwidth=self.controls.bandwidth(),
            failure_classes=self.recent.failure_classes(now),
            selection_review=list(self.counts.selection_review),
            holds=self.retries.holds.active(now))
