"""The worker's decisions, with no sockets, processes or files: ``WorkerCore``.

Events go in (a message from the dispatcher, the disk state, a stop signal, the time,
what an action found out: ani-cli started or exited, the post step ended, the
landing failed); actions come out (services/worker/actions.py: messages to send,
things to do to the attempt). The loop (agent.py) only moves frames, polls fds and
carries out the actions, so tests drive the whole conversation with a fake clock.

The core decides when the worker asks for work, takes a job, hands it back and is
idle again; its parts decide the rest: held_job.py (the job it holds, from the
assignment to the report), verdict.py (how ani-cli's exit and the post step are
judged), reports.py (the messages that end an attempt, re-sent until answered),
disk_view.py (the disk and the storage as this worker sees them). It asks two
questions of its surroundings, both without effects: whether the storage is there
(``storage_problem``) and the progress figures of the running attempt (``figures``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Callable

from shared.config import Config
from shared.logfmt import kv
from shared.protocol import (REASON_DRY_RUN, REASON_HARD_LIMIT, REASON_INTERRUPTED, REASON_INVALID,
                             REASON_STORAGE, DiskStateMsg, JobAck, JobAssign, JobCancel, JobCommit,
                             JobFailed, Message, ProtocolError, WorkerBye, WorkerProbe, WorkerReady,
                             WorkerRefused)
from shared.timers import Timers
from services.worker import download, held_job, titles
from services.worker.actions import Action, Discard, Exit, ExitNow, Figures, Send, Start
from services.worker.disk_view import DiskView
from services.worker.held_job import HeldJob
from services.worker.reports import Reports

if TYPE_CHECKING:
    from services.worker.post_step import PostResult

log = logging.getLogger(__name__)
RECONNECT_RETRY_SECONDS = 0.1  # asking for work while the dispatcher is not connected
STOP_GRACE_SECONDS = 8.0  # well inside supervisord's stopwaitsecs
REFUSED_LOG_SECONDS = 60.0  # a refused worker keeps asking; it says why once a minute
BEAT, STOP = "beat", "stop"  # its timers (held_job.py and reports.py have their own)


class WorkerCore:
    def __init__(self, config: Config, worker_id: str, session: str, host: str,
                 storage_problem: Callable[[str], str | None],
                 figures: Callable[[str], Figures],
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.worker_id = worker_id
        self.session = session
        self.host = host
        self._storage_problem = storage_problem  # storage_id -> why it cannot be written
        self._figures = figures  # phase -> the running attempt's figures
        self._wall = wall_clock
        self.timers = Timers()
        self.timers.at(BEAT, -math.inf)
        self.reports = Reports(self.timers)
        self.disk = DiskView(storage_problem)
        self.attempt: HeldJob | None = None
        self.seq = 0  # grows with each idle period (WorkerReady)
        self.stopping = False
        self.refused_logged_at = -math.inf
        self._out: list[Action] = []

    @property
    def context(self) -> dict:
        return self.attempt.context if self.attempt is not None else {"worker_id": self.worker_id}

    @property
    def pending(self) -> Message | None:
        """The report of the current attempt that waits for its answer."""
        return self.reports.pending

    def _take(self) -> list[Action]:
        out = self._out[:]
        self._out.clear()  # the list itself is shared with the held job
        return out

    # --- the loop's questions -----------------------------------------------

    def finished(self, now: float) -> bool:
        """Whether the worker may exit: stopping, and nothing left to finish or out of time."""
        if not self.stopping:
            return False
        return (self.attempt is None and self.reports.empty) or self.timers.due(STOP, now)

    def wait_seconds(self, now: float) -> float:
        """How long the loop may sleep before something is due here."""
        return self.timers.soonest(now)

    def bye(self) -> Send:
        return Send(WorkerBye(worker_id=self.worker_id, session=self.session))

    # --- signals and the disk -----------------------------------------------

    def on_stop_signal(self, count: int, now: float) -> list[Action]:
        """``count``: the stop signals received so far."""
        if count >= 2:
            log.warning(kv("second stop signal: exiting now", **self.context))
            self._out.append(ExitNow())
        elif not self.stopping:
            self.stopping = True
            self.timers.start(STOP, now, STOP_GRACE_SECONDS)
            log.info(kv("stop requested: taking no more work", **self.context))
            if self.attempt is not None:
                self.attempt.stopping = True
                self.attempt.interrupt(REASON_INTERRUPTED, now)
        return self._take()

    def on_disk(self, msg: Message, now: float) -> list[Action]:
        if not isinstance(msg, DiskStateMsg):
            raise ProtocolError(f"unexpected {msg.KIND} on the disk state channel")
        was_ok = self.disk.ok(now)
        self.disk.heard(msg, now, self.context)
        a = self.attempt
        if a is None:
            if not was_ok:
                self.timers.at(BEAT, now)  # ask for work at once, not at the next heartbeat
        elif self.disk.unavailable:
            a.interrupt(REASON_STORAGE, now)
        elif msg.state == "hard_limit" and a.phase in ("downloading", "verifying"):
            a.interrupt(REASON_HARD_LIMIT, now)
        return self._take()

    # --- messages from the dispatcher ---------------------------------------

    def on_message(self, msg: Message, now: float) -> list[Action]:
        if isinstance(msg, JobAssign):
            self._on_assign(msg, now)
        elif isinstance(msg, JobCommit):
            if self._mine(msg.job_id, msg.attempt):
                self.attempt.commit(msg.video_path)
        elif isinstance(msg, JobCancel):
            self._on_cancel(msg, now)
        elif isinstance(msg, JobAck):
            self._on_ack(msg, now)
        elif isinstance(msg, WorkerRefused):
            if now - self.refused_logged_at >= REFUSED_LOG_SECONDS:
                self.refused_logged_at = now
                log.error(kv("the dispatcher refused this worker; asking again", why=msg.reason,
                             **self.context))
        elif not isinstance(msg, WorkerProbe):  # a probe: only its delivery counts
            log.warning(kv("dropped message not meant for a worker", kind=msg.KIND))
        return self._take()

    def _mine(self, job_id: int, attempt: int) -> bool:
        return self.attempt is not None and self.attempt.is_(job_id, attempt)

    def _on_assign(self, job: JobAssign, now: float) -> None:
        if self._mine(job.job_id, job.attempt):
            return
        if self.attempt is not None or self.stopping or not self.disk.ok(now):
            why = "worker busy" if self.attempt else "worker stopping or disk not available"
            self._out.append(Send(JobFailed(worker_id=self.worker_id, session=self.session,
                                            job_id=job.job_id, attempt=job.attempt,
                                            reason=REASON_INTERRUPTED, error=why)))
            return
        d = self.config.downloader
        query = titles.search_query(job.anime_title)
        argv = download.build_argv(d.command, job.selected_index, job.episode, d.extra_args, query)
        a = self.attempt = HeldJob(job, argv, self._wall(), self.config,
                                   dict(worker_id=self.worker_id, session=self.session),
                                   self.timers, self.reports, self._out, self._storage_problem,
                                   self.disk.why_unavailable)
        # The claim set the lease's deadline: the first heartbeat is due one period later.
        self.timers.start(BEAT, now, self._beat_period())
        if not query:
            a.fail(REASON_INVALID, f"Invalid job: the title {job.anime_title!r} has nothing "
                                   "ani-cli can search for (only characters it cannot carry); "
                                   "fix anime_title", now)
        elif job.dry_run:
            a.fail(REASON_DRY_RUN, "dry run", now, argv=argv)
            log.info(kv("dry run: would run", argv=argv, **self.context))
        else:
            self._out.append(Start(job, argv))

    def _on_cancel(self, msg: JobCancel, now: float) -> None:
        if not self._mine(msg.job_id, msg.attempt):
            return
        # The reason says who ended it: a lost lease, or an operator's control (cancel
        # deletes the partial files; pause --now and a new bandwidth limit keep them).
        log.warning(kv("lease lost: discarding this attempt", why=msg.reason,
                       partials="kept" if msg.keep_partials else "deleted", **self.context))
        self._out.append(Discard(keep_partials=msg.keep_partials))
        self._idle(now)

    def _on_ack(self, msg: JobAck, now: float) -> None:
        if self.reports.acked_landing(msg.job_id, msg.attempt):
            return
        if not self.reports.answers_pending(msg.job_id, msg.attempt):
            return
        a = self.attempt
        if a is not None and self._mine(msg.job_id, msg.attempt):
            self._out.append(Discard(keep_partials=not a.job.dry_run))  # a failure's partials may resume
        self._idle(now)

    def _idle(self, now: float) -> None:
        self.attempt = None
        self.reports.clear_pending()
        self.seq += 1
        for name in held_job.TIMERS:
            self.timers.cancel(name)
        self.timers.at(BEAT, now)

    # --- what the loop found out ----------------------------------------------

    def unsent(self, msg: Message, now: float) -> list[Action]:
        """A send found the dispatcher not connected (reports are re-sent anyway)."""
        if isinstance(msg, WorkerReady):
            # retry soon, but never spin while the dispatcher is away
            self.timers.start(BEAT, now, RECONNECT_RETRY_SECONDS)
        return []

    def _to_attempt(self, event: Callable[[HeldJob], None]) -> list[Action]:
        """Pass an event about the attempt on to the held job (none: it ended meanwhile)."""
        if self.attempt is not None:
            event(self.attempt)
        return self._take()

    def started(self, pid: int, now: float) -> list[Action]:
        return self._to_attempt(lambda a: a.started(pid, now))

    def start_failed(self, exc: Exception, now: float) -> list[Action]:
        return self._to_attempt(lambda a: a.start_failed(exc, now))

    def exited(self, exit: Exit, now: float) -> list[Action]:
        return self._to_attempt(lambda a: a.exited(exit, now))

    def post_done(self, post: PostResult, now: float) -> list[Action]:
        return self._to_attempt(lambda a: a.post_done(post, now))

    def land_failed(self, exc: OSError, now: float) -> list[Action]:
        return self._to_attempt(lambda a: a.land_failed(exc, now))

    def attempt_error(self, exc: Exception, now: float) -> list[Action]:
        """A bug while checking the attempt must not end the worker: fail the attempt."""
        return self._to_attempt(lambda a: a.broke(exc, now))

    def landed(self, now: float) -> list[Action]:
        """The file is in place: nothing of this attempt is needed any more. Idle now, so
        this loop turn asks for the next job right behind the landing (the dispatcher
        reads both in one wake-up and answers with the ack and the next job together)."""
        assert self.attempt is not None
        self.attempt.landed(now)
        self._out.append(Discard(keep_partials=False))
        self._idle(now)
        return self._take()

    # --- the time -------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        if self.attempt is not None:
            self.attempt.tick(now)
        for msg in self.reports.due(now):
            self._out.append(Send(msg))
        if self.timers.due(BEAT, now):
            self.timers.start(BEAT, now, self._beat_period())
            self._beat(now)
        return self._take()

    def _beat_period(self) -> float:
        """The configured heartbeat, but never slower than a third of the lease the
        dispatcher gave (a remote worker's own config may say otherwise)."""
        period = self.config.queue.heartbeat_seconds
        if self.attempt is not None and self.attempt.job.lease_seconds > 0:
            period = min(period, self.attempt.job.lease_seconds / 3)
        return period

    def _beat(self, now: float) -> None:
        if self.attempt is not None:
            beat = self.attempt.heartbeat(self._figures)
            if beat is not None:
                self._out.append(Send(beat))
        elif not self.stopping and self.disk.ok(now):
            self._out.append(Send(WorkerReady(worker_id=self.worker_id, session=self.session,
                                              seq=self.seq, host=self.host)))
