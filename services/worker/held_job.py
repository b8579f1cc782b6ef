"""The decisions about the one job a worker holds, from its assignment to its report.

An attempt goes through its phases::

    downloading -> verifying -> awaiting_commit -> reporting (JobLanded sent)
         \\------------\\--------------\\----------> reporting (JobFailed sent)

``HeldJob`` watches the running ani-cli on the core's timers (its deadline, the
SIGTERM and the SIGKILLs after it, the grace after an exit that looks like a stop),
has the exit and the post step judged (verdict.py), and reports the end (reports.py)
unless the storage is to blame. It appends its actions to the core's list; the core
(core.py) decides when a job is taken and when the worker is idle again.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Callable

from shared import failures
from shared.config import Config
from shared.logfmt import kv
from shared.protocol import (REASON_DRY_RUN, REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED,
                             REASON_NO_SPACE, REASON_STORAGE, REASON_TIMEOUT, JobAssign, JobFailed,
                             JobFinished, JobHeartbeat, JobLanded, Message)
from shared.timers import Timers
from services.worker import download, titles, verdict
from services.worker.actions import (Action, ClearPartials, Exit, Figures, Kill, Land, Reap, Send,
                                     StartPost, StopPost)
from services.worker.reports import Reports

if TYPE_CHECKING:
    from services.worker.post_step import PostResult

log = logging.getLogger(__name__)
KILL_GRACE_SECONDS = 3.0  # SIGTERM, then SIGKILL this much later (again until it ends)
# ani-cli's trap 'cleanup; exit 1' INT HUP TERM exits 1 without a message. A shutdown
# signals every process at once (systemd stopping the cgroup) and ani-cli may end before
# the worker hears its own signal: wait this long for it before judging the exit.
OUTSIDE_STOP_GRACE_SECONDS = 1.0
DEADLINE, KILL, OUTSIDE = "deadline", "kill", "outside"  # the timers of the running ani-cli
TIMERS = (DEADLINE, KILL, OUTSIDE)


class HeldJob:
    def __init__(self, job: JobAssign, argv: list[str], started_at: float, config: Config,
                 ids: dict, timers: Timers, reports: Reports, out: list[Action],
                 storage_problem: Callable[[str], str | None],
                 why_unavailable: Callable[[], str]) -> None:
        self.job = job
        self.argv = argv
        self.started_at = started_at  # wall clock, for the status
        self.config = config
        self.ids = ids  # worker_id and session, for every message
        self.timers, self.reports, self.out = timers, reports, out
        self._storage_problem = storage_problem
        self._why_unavailable = why_unavailable
        self.stopping = False  # the worker is asked to stop (the core says so)
        self.phase = "downloading"
        self.pid: int | None = None  # ani-cli runs (or ran)
        self.kill_reason: str | None = None
        self.exit: Exit | None = None
        self.site: tuple[str, str] | None = None  # (site title, episode) from the file's name
        self.title_mismatch = False
        self.post: PostResult | None = None
        self.video_path = ""  # the go-ahead's path

    @property
    def context(self) -> dict:
        j = self.job
        return dict(worker_id=self.ids["worker_id"], job_id=j.job_id, anime_id=j.anime_id,
                    episode=j.episode, attempt=j.attempt)

    @property
    def site_title(self) -> str | None:
        return self.site[0] if self.site else None

    def is_(self, job_id: int, attempt: int) -> bool:
        return self.job.job_id == job_id and self.job.attempt == attempt

    # --- ani-cli ---------------------------------------------------------------

    def started(self, pid: int, now: float) -> None:
        if self.phase != "downloading":
            return
        self.pid = pid
        self.timers.start(DEADLINE, now, self.config.downloader.timeout_seconds)
        j = self.job
        log.info(kv("ani-cli started", pid=pid, argv=self.argv, title=j.anime_title,
                    query=titles.search_query(j.anime_title),
                    rate_limit_bps=j.rate_limit_bps or None, **self.context))

    def start_failed(self, exc: Exception, now: float) -> None:
        """Locking the private directory (RuntimeError: another attempt holds it) or
        starting ani-cli (OSError) raised ``exc``."""
        if self.phase != "downloading":
            return
        if isinstance(exc, OSError):
            reason = REASON_NO_SPACE if download.is_no_space_error(exc) else REASON_ERROR
            self.fail(reason, f"could not start ani-cli: {exc}", now)
        else:
            self.fail(REASON_INTERRUPTED, str(exc), now)

    def tick(self, now: float) -> None:
        if self.phase != "downloading" or self.pid is None:
            return
        if self.exit is not None:
            if self.timers.due(OUTSIDE, now):
                self._judge_exit(now)
        elif self.kill_reason is None and self.timers.due(DEADLINE, now):
            self._kill(REASON_TIMEOUT, signal.SIGTERM, now)
        elif self.timers.due(KILL, now):
            self._kill(self.kill_reason or REASON_TIMEOUT, signal.SIGKILL, now)

    def _kill(self, reason: str, sig: int, now: float) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
            log.info(kv("stopping ani-cli", why=reason, pid=self.pid, **self.context))
        self.timers.cancel(DEADLINE)  # killed: a due deadline would keep the loop from sleeping
        self.timers.start(KILL, now, KILL_GRACE_SECONDS)
        self.out.append(Kill(sig))

    def exited(self, exit: Exit, now: float) -> None:
        if self.phase != "downloading" or self.exit is not None:
            return
        self.exit = exit
        self.timers.cancel(DEADLINE)
        self.timers.cancel(KILL)
        self._judge_exit(now)

    def _judge_exit(self, now: float) -> None:
        assert self.exit is not None
        found = verdict.after_exit(self.exit, self.job, self.config.downloader, self.kill_reason,
                                   self.stopping, self.timers.due(OUTSIDE, now))
        if isinstance(found, verdict.Wait):
            if not self.timers.armed(OUTSIDE):
                self.timers.start(OUTSIDE, now, OUTSIDE_STOP_GRACE_SECONDS)
                log.debug(kv("ani-cli exited as if stopped; waiting for a stop signal",
                             exit_code=self.exit.code, **self.context))
        elif isinstance(found, verdict.Verify):
            self.site, self.title_mismatch = found.site, found.title_mismatch
            if found.title_mismatch and self.config.downloader.on_title_mismatch == "warn":
                log.warning(kv("downloaded show is not the selected one", site_title=self.site_title,
                               selected_title=self.job.selected_title, **self.context))
            self.phase = "verifying"
            self.out.append(StartPost(found.name))
        else:
            self._end(found, now)

    def interrupt(self, reason: str, now: float) -> None:
        """Stop the attempt for a reason that is not the job's fault."""
        if self.phase == "downloading" and self.pid is not None:
            if self.kill_reason is None:  # once: a repeat would postpone the SIGKILL escalation
                self._kill(reason, signal.SIGTERM, now)
            if self.exit is not None:  # it had ended already (a stop from outside?): judge it now
                self._judge_exit(now)
        elif self.phase == "verifying":
            self.out.append(StopPost())  # kills its ffmpeg at once: a remux must not go on writing
            if reason == REASON_HARD_LIMIT:
                self._end(verdict.Failed(reason, verdict.HARD_LIMIT_ERROR, clear_partials=True), now)
            else:
                self.fail(reason, self._why_stopped(reason), now)
        elif self.phase == "awaiting_commit":
            self.fail(reason, self._why_stopped(reason), now)
        # reporting: the file landed or the failure is on its way; let it finish

    def _why_stopped(self, reason: str) -> str:
        if reason == REASON_STORAGE:
            return f"storage unavailable: {self._why_unavailable()}"
        return "stopped before landing"

    def broke(self, exc: Exception, now: float) -> None:
        """A bug while checking the attempt must not end the worker: fail the attempt."""
        if self.phase == "reporting":
            return
        if self.phase == "downloading" and self.pid is not None and self.exit is None:
            self.out.append(Reap())
        self.fail(REASON_ERROR, f"worker error while checking the download: {exc}", now)

    # --- the file ----------------------------------------------------------------

    def post_done(self, post: PostResult, now: float) -> None:
        if self.phase != "verifying":
            return
        failed = verdict.after_post(post)
        if failed is not None:
            self._end(failed, now)
            return
        self.post = post
        self.phase = "awaiting_commit"
        self._report(JobFinished(**self.ids, job_id=self.job.job_id, attempt=self.job.attempt,
                                 ext=post.ext, size_bytes=post.size,
                                 duration_seconds=post.duration, site_title=self.site_title,
                                 title_mismatch=self.title_mismatch), now)

    def commit(self, video_path: str) -> None:
        if self.phase != "awaiting_commit":
            return
        self.video_path = video_path
        self.out.append(Land(video_path, self.site_title, self.title_mismatch))

    def landed(self, now: float) -> None:
        assert self.post is not None
        log.info(kv("landed", path=self.video_path, size=self.post.size, **self.context))
        self.out.append(Send(self.reports.landed(JobLanded(
            **self.ids, job_id=self.job.job_id, attempt=self.job.attempt,
            video_path=self.video_path, size_bytes=self.post.size,
            duration_seconds=self.post.duration, site_title=self.site_title,
            title_mismatch=self.title_mismatch), now)))

    def land_failed(self, exc: OSError, now: float) -> None:
        reason = REASON_NO_SPACE if download.is_no_space_error(exc) else REASON_ERROR
        self.fail(reason, f"Failed to move video into place: {exc}", now)

    def heartbeat(self, figures: Callable[[str], Figures]) -> JobHeartbeat | None:
        if self.phase == "reporting" or self.reports.pending is not None:
            return None
        f = figures(self.phase) if self.pid is not None else Figures()
        return JobHeartbeat(**self.ids, job_id=self.job.job_id, attempt=self.job.attempt,
                            bytes=f.bytes, percent=f.percent, speed_bps=f.speed_bps,
                            eta_seconds=f.eta_seconds,
                            state="stopping" if self.stopping else self.phase,
                            started_at=self.started_at)

    # --- the end -----------------------------------------------------------------

    def _report(self, msg: Message, now: float) -> None:
        self.out.append(Send(self.reports.report(msg, now)))

    def _end(self, failed: verdict.Failed, now: float) -> None:
        if failed.clear_partials:
            self.out.append(ClearPartials())
        self.fail(failed.reason, failed.error, now)

    def fail(self, reason: str, error: str, now: float, argv: list[str] | None = None) -> None:
        reason, error = self._unless_storage(reason, error)
        self.phase = "reporting"
        for name in TIMERS:
            self.timers.cancel(name)
        level = logging.INFO if reason in (REASON_DRY_RUN, REASON_INTERRUPTED) else logging.WARNING
        found = failures.classify(reason, error)
        if reason != REASON_DRY_RUN:
            log.log(level, kv("attempt ended without a file", reason=reason,
                              failure_class=found.cls if found else None,
                              error=error.splitlines()[0] if error else None,
                              said=found.line if found else None, **self.context))
        self._report(JobFailed(**self.ids, job_id=self.job.job_id, attempt=self.job.attempt,
                               reason=reason, error=error, argv=argv or [],
                               failure_class=found.cls if found else ""), now)

    def _unless_storage(self, reason: str, error: str) -> tuple[str, str]:
        """A failure while the storage is not there (the failure may be its first sign) is
        not the job's fault: reported as such, so it counts no retry."""
        if reason not in (REASON_ERROR, REASON_TIMEOUT, REASON_NO_SPACE) \
                and self.kill_reason != REASON_STORAGE:
            return reason, error
        problem = self._storage_problem(self.job.storage_id)
        if problem is None:
            return reason, error
        return REASON_STORAGE, f"storage unavailable: {problem}"
