"""The operator's controls (anime-ctl, anime-web): pause, resume, retry, cancel,
priority, bandwidth. Each request is answered with one ``ControlReply``.

Like the rest of the dispatcher: no I/O of its own (the store and the clock are
injected), the write first and then memory (a write the database refuses now changes
nothing and is answered "database busy, try again"; an ending decided for a running
lease waits on the lease as any other and is written by a later tick), and every
update guarded by the stage and attempt it expects (store.py).

- A manual pause is a row of ``downloader_state`` (key ``manual_pause``, JSON), read at
  start: it survives a restart and a kill -9 of the dispatcher. While it holds no job is
  handed out; with ``until`` it ends by itself at the first tick past it.
- ``pause --now`` and a new bandwidth limit end the running attempts with a requeue that
  counts no retry; the worker is told (``JobCancel`` with ``keep_partials``) only once
  that is written, and the next attempt resumes from the partial files. A new limit
  cannot reach a running yt-dlp (its ``--limit-rate`` is fixed for the process), so
  restarting the attempt is the one way to apply it to a running download; it is held
  back for ``RESTART_HOLD_SECONDS`` so the old attempt has let go of its directory.
- A cancel is the terminal stage ``cancelled``: no claim, readoption or landing
  guard accepts it, so a cancelled job never comes back.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable

from shared.logfmt import kv
from shared.models import STAGE_CANCELLED, STAGE_FAILED, STAGE_QUEUED
from shared.protocol import (ControlBandwidth, ControlCancel, ControlPause, ControlPriority,
                             ControlReply, ControlResume, ControlRetry, Message)
from services.controls import MAX_JOB_IDS, priority_name
from services.dispatcher.counts import QueueCounts
from services.dispatcher.db_health import Database
from services.dispatcher.endings import Endings
from services.dispatcher.handout import Handout
from services.dispatcher.leases import CANCEL, DISPATCHER, REQUEUE, Ending, Lease, LeaseTable
from services.dispatcher.retries import RetryPolicy
from services.dispatcher.settlement import Settlement
from services.dispatcher.store import STATE_MANUAL_PAUSE, StoreUnavailable
from services.status_text import clock, human_bytes

log = logging.getLogger(__name__)
RESTART_HOLD_SECONDS = 1.0  # a restarted attempt waits this long before it is handed out
PRIORITIES_SECONDS = 10.0  # how often the status's list of priorities is read again
REASON_OPERATOR = "operator"  # the Ending reason of a requeue an operator asked for
BAD, NOT_FOUND, CONFLICT, UNAVAILABLE = "bad_argument", "not_found", "conflict", "unavailable"
_AFTER_DOWNLOAD = ("verifying", "awaiting_commit", "reporting")


@dataclass(frozen=True)
class ManualPause:
    """The operator's pause, as kept in ``downloader_state``."""
    since: float
    by: str
    until: float | None = None
    now: bool = False  # the running downloads were interrupted too

    def over(self, now: float) -> bool:
        return self.until is not None and now >= self.until

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> ManualPause | None:
        """The pause of a stored value; a value that is not one (another program wrote
        it) counts as a pause since an unknown time: a pause is never lost by a typo."""
        if text is None:
            return None
        try:
            raw = json.loads(text)
            since, until = float(raw.get("since", 0.0)), raw.get("until")
            return cls(since=since, by=str(raw.get("by", "")),
                       until=None if until is None else float(until), now=bool(raw.get("now")))
        except (ValueError, TypeError, AttributeError):
            return cls(since=0.0, by="unreadable downloader_state value")

    def describe(self, now: float) -> str:
        text = "paused by the operator"
        if self.until is not None:
            text += f" until {clock(self.until, now)}"
        return text


def _reply(ok: bool, message: str, **result: object) -> ControlReply:
    return ControlReply(ok=ok, message=message, result=result)


def _fail(error: str, message: str, **result: object) -> ControlReply:
    return _reply(False, message, error=error, **result)


def _mbps(mbps: float) -> str:
    return "unlimited" if mbps <= 0 else f"{mbps:g} Mbps"


class Controls:
    def __init__(self, dry_run: bool, db: Database, leases: LeaseTable, counts: QueueCounts,
                 retries: RetryPolicy, settlement: Settlement, endings: Endings,
                 handout: Handout) -> None:
        self.dry_run, self.db, self.leases, self.counts = dry_run, db, leases, counts
        self.retries, self.settlement, self.endings, self.handout = retries, settlement, endings, handout
        self.pause: ManualPause | None = None
        self.configured_mbps = handout.total_bandwidth_mbps
        self.priorities: list[dict] = []
        self._priorities_at = -math.inf

    # --- what the rest of the dispatcher asks ---------------------------------

    def load(self, stored: str | None, now: float) -> None:
        """The pause found in the database at start."""
        self.pause = ManualPause.from_json(stored)
        if self.pause is not None:
            log.warning(kv("paused by the operator (kept from before the restart)",
                           since=self.pause.since, until=self.pause.until, by=self.pause.by))

    @property
    def paused(self) -> bool:
        return self.pause is not None

    def refusal(self, now: float) -> str | None:
        return self.pause.describe(now) if self.pause is not None else None

    def tick(self, now: float) -> None:
        """A pause whose time is over ends (once its row is gone); the priorities are read
        again now and then (upstream tools may set them too)."""
        if self.pause is not None and self.pause.over(now):
            try:
                self.db.write(now, self.db.store.set_state, STATE_MANUAL_PAUSE, None, now)
            except StoreUnavailable:
                pass  # still paused; the next tick tries again
            else:
                log.info(kv("manual pause over: resuming", by=self.pause.by,
                            until=self.pause.until))
                self.pause = None
        if now - self._priorities_at >= PRIORITIES_SECONDS:
            self._read_priorities(now)

    def _read_priorities(self, now: float) -> None:
        if self.dry_run:
            return
        try:
            self.priorities = self.db.read(now, self.db.store.priorities)
            self._priorities_at = now
        except StoreUnavailable:
            pass

    def status(self, now: float) -> dict:
        p = self.pause
        return {"paused": p is not None, "at": p.since if p else None, "until": p.until if p else None,
                "by": p.by if p else None, "interrupted": p.now if p else False}

    def bandwidth(self) -> dict:
        now_mbps = self.handout.total_bandwidth_mbps
        return {"total_mbps": now_mbps, "configured_mbps": self.configured_mbps,
                "changed": now_mbps != self.configured_mbps,
                "per_download_bps": self.handout.rate_share()}

    # --- requests -------------------------------------------------------------

    def handle(self, msg: Message, now: float) -> ControlReply:
        """Carry out one request; StoreUnavailable (nothing changed) is answered here."""
        handler: Callable[[Message, float], ControlReply] | None = {
            ControlPause: self._pause, ControlResume: self._resume, ControlRetry: self._retry,
            ControlCancel: self._cancel, ControlPriority: self._priority,
            ControlBandwidth: self._bandwidth,
        }.get(type(msg))
        if handler is None:
            return _fail(BAD, f"{msg.KIND} is not a control request")
        if self.dry_run:
            return _fail(CONFLICT, "dry run: the controls change nothing (the database is "
                                   "not written)")
        try:
            return handler(msg, now)
        except StoreUnavailable as exc:
            log.warning(kv("control not carried out: database busy", kind=msg.KIND,
                           source=getattr(msg, "source", None), error=exc))
            return _fail(UNAVAILABLE, f"database busy ({exc}); nothing changed, try again")

    def _pause(self, msg: ControlPause, now: float) -> ControlReply:
        if msg.duration_seconds is not None and not (0 < msg.duration_seconds < 10 * 365 * 86400):
            return _fail(BAD, f"duration_seconds: must be more than 0 and less than ten "
                              f"years, got {msg.duration_seconds!r}")
        until = None if msg.duration_seconds is None else now + msg.duration_seconds
        since = self.pause.since if self.pause is not None else now
        pause = ManualPause(since=since, by=msg.source, until=until,
                            now=msg.now or (self.pause is not None and self.pause.now))
        self.db.write(now, self.db.store.set_state, STATE_MANUAL_PAUSE, pause.to_json(), now)
        self.pause = pause
        interrupted = self._interrupt(now, msg.source) if msg.now else []
        log.warning(kv("paused by the operator", source=msg.source, until=until,
                       now=msg.now or None, interrupted=len(interrupted) if msg.now else None))
        text = "paused" + (f" until {clock(until, now)}" if until is not None else
                           " until resumed")
        if msg.now:
            text += f"; {len(interrupted)} running download{'s' if len(interrupted) != 1 else ''} " \
                    "interrupted (back in the queue, no retry counted)"
        else:
            running = sum(1 for lease in self.leases.values() if lease.running)
            if running:
                text += f"; {running} running download{'s' if running != 1 else ''} finish"
        return _reply(True, text, paused=True, until=until, interrupted=interrupted)

    def _interrupt(self, now: float, source: str) -> list[int]:
        """pause --now: every running download back to the queue, no retry counted."""
        stopped = []
        for lease in list(self.leases.values()):
            if not self._restartable(lease, downloading_only=False):
                continue
            lease.ending = Ending(REQUEUE, count_retry=False, reason=REASON_OPERATOR,
                                  stop_worker="paused by the operator (pause --now)",
                                  keep_partials=True, source=source)
            self.endings.end(lease, now)  # not written now: a tick writes it, then tells the worker
            stopped.append(lease.job.id)
        return sorted(stopped)

    @staticmethod
    def _restartable(lease: Lease, downloading_only: bool) -> bool:
        """A worker runs it and has not been told to land it (a landing is not undone)."""
        if not lease.running or lease.committed_path is not None or lease.unowned:
            return False
        return not downloading_only or lease.state not in (*_AFTER_DOWNLOAD, "stopping")

    def _resume(self, msg: ControlResume, now: float) -> ControlReply:
        if self.pause is None:
            return _reply(True, "not paused by the operator: nothing to resume", paused=False)
        self.db.write(now, self.db.store.set_state, STATE_MANUAL_PAUSE, None, now)
        was = self.pause
        self.pause = None
        log.warning(kv("resumed by the operator", source=msg.source, paused_by=was.by,
                       paused_seconds=round(now - was.since, 1)))
        return _reply(True, "resumed (the disk budget still applies)", paused=False)

    def _retry(self, msg: ControlRetry, now: float) -> ControlReply:
        if sum((msg.failed, bool(msg.job_ids), msg.anime_id is not None)) != 1:
            return _fail(BAD, "give exactly one of failed: true, job_ids or anime_id")
        named: dict[int, str] = {}
        if len(msg.job_ids) > MAX_JOB_IDS:
            return _fail(BAD, f"job_ids: at most {MAX_JOB_IDS} at once, got {len(msg.job_ids)}")
        if msg.job_ids:
            named = self.db.read(now, self.db.store.job_stages, list(msg.job_ids))
            missing = sorted(set(msg.job_ids) - set(named))
            if missing:
                return _fail(NOT_FOUND, f"no job {', '.join(map(str, missing))} in the database",
                             job_ids=missing)
        revived, hurried = self.db.write(now, self.db.store.retry_jobs, now, msg.failed,
                                         list(msg.job_ids), msg.anime_id)
        for job_id, anime_id, episode, error in revived:
            self.retries.forget(job_id)
            log.warning(kv("retried by the operator: failed job back in the queue",
                           source=msg.source, job_id=job_id, anime_id=anime_id, episode=episode,
                           previous_error=error))
        for job_id in hurried:
            self.retries.forget(job_id)
            log.info(kv("retried by the operator: backoff ended", source=msg.source, job_id=job_id))
        if revived or hurried:
            self.counts.changed(requeued=True)
        result = {"requeued": [r[0] for r in revived], "hurried": hurried}
        what = f"{len(revived)} failed job{'s' if len(revived) != 1 else ''} back in the queue"
        if hurried:
            what += f", {len(hurried)} backing off retried now"
        done = {r[0] for r in revived} | set(hurried)
        skipped = {job_id: stage for job_id, stage in named.items() if job_id not in done}
        if skipped:
            result["not_retried"] = {str(k): v for k, v in sorted(skipped.items())}
            why = "not retried: " + ", ".join(f"job {k} is {v}" for k, v in sorted(skipped.items()))
            if not done:
                return _fail(CONFLICT, f"{why} (only failed jobs and jobs backing off are "
                                       "retried)", **result)
            what += f"; {why}"
        if msg.anime_id is not None:
            what += f" (MAL ID {msg.anime_id})"
        return _reply(True, what, **result)

    def _cancel(self, msg: ControlCancel, now: float) -> ControlReply:
        lease = self.leases.get(msg.job_id)
        if lease is not None:
            return self._cancel_running(lease, msg, now)
        row = self.db.read(now, self.db.store.get, msg.job_id)
        if row is None:
            return _fail(NOT_FOUND, f"no job {msg.job_id} in the database", job_id=msg.job_id)
        if row.stage == STAGE_CANCELLED:
            return _reply(True, f"job {msg.job_id} is cancelled already", job_id=msg.job_id,
                          stage=STAGE_CANCELLED)
        if row.stage not in (STAGE_QUEUED, STAGE_FAILED):
            return _fail(CONFLICT, f"job {msg.job_id} is {row.stage}: only queued, downloading "
                                   "or failed jobs are cancelled", job_id=msg.job_id, stage=row.stage)
        if not self.db.write(now, self.db.store.cancel_queued, msg.job_id, row.stage, now):
            return _fail(CONFLICT, f"job {msg.job_id} changed meanwhile; look again",
                         job_id=msg.job_id)
        self.retries.forget(msg.job_id)
        self.settlement.cleanup_if_free(msg.job_id)  # partial files of an earlier attempt
        self.counts.changed()
        log.warning(kv("cancelled", source=msg.source, job_id=msg.job_id, anime_id=row.anime_id,
                       episode=row.episode, was=row.stage))
        return _reply(True, f"cancelled job {msg.job_id} ({row.anime_title or row.anime_id} "
                            f"ep {row.episode}, was {row.stage})", job_id=msg.job_id,
                      stage=STAGE_CANCELLED)

    def _cancel_running(self, lease: Lease, msg: ControlCancel, now: float) -> ControlReply:
        job = lease.job
        if lease.ending is not None and lease.ending.kind == CANCEL:
            return _reply(True, f"job {job.id} is being cancelled (waiting for the database)",
                          job_id=job.id, stage="downloading")
        if lease.ending is not None or lease.committed_path is not None or lease.owner == DISPATCHER:
            return _fail(CONFLICT, f"job {job.id} is ending now (its file is landing or it is "
                                   "going back to the queue); cancel it again in a moment",
                         job_id=job.id)
        lease.ending = Ending(CANCEL, reason=REASON_OPERATOR, stop_worker="cancelled by the operator",
                              keep_partials=False, source=msg.source)
        name = f"{job.anime_title or job.anime_id} ep {job.episode}"
        if not self.endings.end(lease, now):
            return _reply(True, f"cancelling job {job.id} ({name}): waiting for the database, "
                                "then its download stops", job_id=job.id, stage="downloading")
        return _reply(True, f"cancelled job {job.id} ({name}): its download is stopped and its "
                            "partial files deleted", job_id=job.id, stage=STAGE_CANCELLED)

    def _priority(self, msg: ControlPriority, now: float) -> ControlReply:
        if (msg.anime_id is None) == (msg.job_id is None):
            return _fail(BAD, "give exactly one of anime_id or job_id")
        if not -1_000_000 <= msg.priority <= 1_000_000:
            return _fail(BAD, f"priority: must be between -1000000 and 1000000, got {msg.priority}")
        changed = self.db.write(now, self.db.store.set_priority, msg.priority, msg.anime_id,
                                msg.job_id)
        what = f"MAL ID {msg.anime_id}" if msg.anime_id is not None else f"job {msg.job_id}"
        if not changed:
            return _fail(NOT_FOUND, f"no job of {what} in the database")
        self.counts.changed()  # queue.by_anime shows priorities: only a pass reads them
        self._read_priorities(now)
        name = priority_name(msg.priority)
        log.warning(kv("priority set by the operator", source=msg.source, anime_id=msg.anime_id,
                       job_id=msg.job_id, priority=msg.priority, jobs=changed))
        label = name if name == str(msg.priority) else f"{name} ({msg.priority})"
        return _reply(True, f"{what}: {changed} job{'s' if changed != 1 else ''} at priority {label}",
                      priority=msg.priority, jobs=changed)

    def _bandwidth(self, msg: ControlBandwidth, now: float) -> ControlReply:
        if not (msg.mbps >= 0 and math.isfinite(msg.mbps)):
            return _fail(BAD, f"mbps: must be 0 (unlimited) or more, got {msg.mbps!r}")
        was = self.handout.total_bandwidth_mbps
        self.handout.total_bandwidth_mbps = msg.mbps
        share = self.handout.rate_share()
        restarted = []
        for lease in list(self.leases.values()):
            if lease.rate_bps == share or not self._restartable(lease, downloading_only=True):
                continue
            lease.ending = Ending(REQUEUE, count_retry=False, reason=REASON_OPERATOR,
                                  stop_worker="bandwidth limit changed: restarting at the new rate",
                                  keep_partials=True, hold_seconds=RESTART_HOLD_SECONDS,
                                  source=msg.source)
            self.endings.end(lease, now)
            restarted.append(lease.job.id)
        log.warning(kv("bandwidth changed by the operator", source=msg.source, was_mbps=was,
                       mbps=msg.mbps, per_download_bps=share or None,
                       restarted=len(restarted) or None))
        text = f"total bandwidth {_mbps(msg.mbps)} (was {_mbps(was)}) until the dispatcher restarts"
        if share:
            text += f", {human_bytes(share)}/s per download"
        if restarted:
            text += (f"; {len(restarted)} running download{'s' if len(restarted) != 1 else ''} "
                     "restarted at the new rate, resuming from the partial files")
        return _reply(True, text, total_mbps=msg.mbps, was_mbps=was, per_download_bps=share,
                      restarted=sorted(restarted))
