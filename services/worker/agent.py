"""The worker process: asks for a job when idle, runs it, reports it.

One thread runs the loop (a zmq poller over the dispatcher socket, the disk
state subscription, the stop signal and ani-cli's pipes); verification runs in
a helper thread so heartbeats continue. Every message that ends an attempt is
re-sent until the dispatcher answers, so a dispatcher restart loses nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import zmq

from shared import storage
from shared.config import Config
from shared.lifecycle import StopRequest, kv
from shared.protocol import (REASON_DRY_RUN, REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED,
                             REASON_INVALID, REASON_NO_SPACE, REASON_STORAGE, REASON_TIMEOUT,
                             DiskStateMsg, JobAck, JobAssign, JobCancel, JobCommit, JobFailed,
                             JobFinished, JobHeartbeat, JobLanded, Message, ProtocolError,
                             WorkerBye, WorkerProbe, WorkerReady, WorkerRefused, decode, encode)
from shared.sockets import Sockets, waiting
from services.worker import download, shims
from services.worker.attempt import Attempt

log = logging.getLogger(__name__)
DISK_STALE_SECONDS = 5.0
RESEND_SECONDS = 1.0
RECONNECT_RETRY_SECONDS = 0.1  # asking for work while the dispatcher is not connected
STOP_GRACE_SECONDS = 8.0  # well inside supervisord's stopwaitsecs
REFUSED_LOG_SECONDS = 60.0  # a refused worker keeps asking; it says why once a minute
# ani-cli ended by SIGTERM/SIGINT/SIGHUP before its trap was set: as a signal (Popen's
# negative codes) or as a shell's 128+N.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_EXIT_CODES = tuple(-s for s in STOP_SIGNALS) + tuple(128 + s for s in STOP_SIGNALS)
# ani-cli's trap 'cleanup; exit 1' INT HUP TERM: exit 1 and, unlike every failure of the
# script, no die() message. A shutdown signals every process at once (systemd stopping
# the cgroup) and ani-cli may end before the worker hears its own signal: wait this long
# for it before judging the exit.
OUTSIDE_STOP_GRACE_SECONDS = 1.0
# A stop from outside that the worker cannot confirm (no signal of its own) goes uncounted
# only while the job has had fewer uncounted attempts than this; then it counts as a
# failed attempt, so nothing that merely looks like a stop can loop for ever.
MAX_UNCOUNTED_ATTEMPTS = 3


class Worker:
    def __init__(self, config: Config, worker_id: str) -> None:
        self.config = config
        self.worker_id = worker_id
        # Not secrets (it loads OpenSSL, +3.5 MB RSS). 128 bits: the routing id is what the
        # ROUTER hands over to a new connection, so another machine must not guess it.
        self.session = os.urandom(16).hex()
        self.identity = f"{worker_id}/{self.session}".encode()
        self.sockets = Sockets(config)
        self.stop = StopRequest()
        self.attempt: Attempt | None = None
        self.pending: Message | None = None  # re-sent until answered
        self.pending_at = 0.0
        # Landings not yet acked, re-sent every RESEND_SECONDS while the next job may
        # already run: the worker asks for work right behind each (one exchange fewer
        # per job). Usually one; more only if the dispatcher dropped a landing it could
        # not record (a busy database) but handed out the next job.
        self.landings: dict[tuple[int, int], JobLanded] = {}
        self.landings_sent_at = 0.0
        self.seq = 0
        self.disk: DiskStateMsg | None = None
        self.disk_at = -1e9
        # The disk-watcher says the storage is there, but this worker cannot see it (another
        # machine whose NFS mount is gone): why, or None. It then asks for no work.
        self.storage_problem: str | None = None
        self.next_beat = 0.0
        self.stop_deadline: float | None = None
        self.host = socket.gethostname()
        self.refused_logged_at = -1e9
        self.tools = self._install_shims()

    def _install_shims(self) -> shims.Shims | None:
        try:
            return shims.install(self.config.run_dir)
        except OSError as exc:
            log.error(kv("cannot write the downloader wrappers: the bandwidth cap and exact "
                         "progress are off", error=exc, directory=self.config.run_dir,
                         worker_id=self.worker_id))
            return None

    @property
    def ctx(self) -> dict:
        return {"worker_id": self.worker_id, **(self.attempt.context if self.attempt else {})}

    # --- sockets ------------------------------------------------------------

    def _open(self) -> None:
        zc = self.config.zmq
        self.dealer = self.sockets.connect_dealer(zc.dispatcher, self.identity)
        self.sub = self.sockets.connect(zmq.SUB, zc.disk_state)
        self.sub.setsockopt(zmq.SUBSCRIBE, DiskStateMsg.KIND.encode())
        self.poller = zmq.Poller()
        for item in (self.dealer, self.sub, self.stop.wakeup_fd):
            self.poller.register(item, zmq.POLLIN)
        self.polled_pipes: list[int] = []

    def send(self, msg: Message) -> bool:
        try:
            self.dealer.send_multipart(encode(msg), zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (IMMEDIATE): the caller retries later
            return False

    def report(self, msg: Message) -> None:
        """Send a message that must be answered; it is re-sent until it is."""
        self.pending = msg
        self.pending_at = time.monotonic()
        self.send(msg)

    # --- the loop -----------------------------------------------------------

    def run(self) -> int:
        self._open()
        log.info(kv("worker started", worker_id=self.worker_id, session=self.session,
                    endpoint=self.config.zmq.dispatcher))
        try:
            while not self._finished():
                self._poll_once()
            self.send(WorkerBye(worker_id=self.worker_id, session=self.session))
            return 0
        finally:
            if self.attempt and self.attempt.proc and self.attempt.proc.returncode is None:
                download.reap(self.attempt.proc)
            self.sockets.close()
            log.info(kv("worker stopped", worker_id=self.worker_id))

    def _finished(self) -> bool:
        if not self.stop.requested:
            return False
        if self.attempt is None and self.pending is None and not self.landings:
            return True
        return self.stop_deadline is not None and time.monotonic() > self.stop_deadline

    def _poll_once(self) -> None:
        fds = self._poll_pipes()
        events = dict(self.poller.poll(self._poll_timeout_ms()))
        if self.stop.wakeup_fd in events:
            self.stop.drain()
            self._on_stop_signal()
        if self.attempt and any(fd in events for fd in fds):
            self.attempt.read_pipes()
        if self.sub in events:
            self._drain(self.sub, self._on_disk)
        if self.dealer in events:
            self._drain(self.dealer, self._on_dispatcher)
        self._timers()

    def _poll_pipes(self) -> list[int]:
        """Keep the poller's set of the attempt's fds (ani-cli's pipes, then the post step's
        wake-up) in step with the attempt; the sockets stay registered."""
        fds = self.attempt.pipes() if self.attempt else []
        if fds != self.polled_pipes:
            for fd in self.polled_pipes:
                self.poller.unregister(fd)
            for fd in fds:
                self.poller.register(fd, zmq.POLLIN)
            self.polled_pipes = fds
        return fds

    def _poll_timeout_ms(self) -> float:
        """250 ms while an attempt runs (its deadline, the kill grace, a child holding the
        pipes); idle, sleep until the next heartbeat: an idle worker wakes about once a
        second (the disk state), not four times."""
        if self.attempt is not None:
            return min(250, self.attempt.seconds_to_read() * 1000 + 1)
        if self.pending is not None or self.landings:
            return 250
        return max(0.0, min(self.next_beat - time.monotonic(), 5.0)) * 1000

    def _drain(self, sock: zmq.Socket, handler) -> None:
        for frames in waiting(sock, 100):
            try:
                handler(decode(frames))
            except ProtocolError as exc:
                log.warning(kv("dropped malformed message", error=exc, worker_id=self.worker_id))
            except Exception:
                log.exception(kv("error while handling a message; dropped it", **self.ctx))

    # --- signals and disk ---------------------------------------------------

    def _on_stop_signal(self) -> None:
        if self.stop.count >= 2:
            log.warning(kv("second stop signal: exiting now", **self.ctx))
            if self.attempt and self.attempt.proc:
                download.kill_group(self.attempt.proc)
            os._exit(1)
        if self.stop_deadline is None:
            self.stop_deadline = time.monotonic() + STOP_GRACE_SECONDS
            log.info(kv("stop requested: taking no more work", **self.ctx))
            if self.attempt is not None:
                self._interrupt(REASON_INTERRUPTED)

    def _disk_ok(self) -> bool:
        fresh = time.monotonic() - self.disk_at <= DISK_STALE_SECONDS
        return (fresh and self.disk is not None and self.disk.state != "hard_limit"
                and self.storage_problem is None)

    def _on_disk(self, msg: Message) -> None:
        if not isinstance(msg, DiskStateMsg):
            raise ProtocolError(f"unexpected {msg.KIND} on the disk state channel")
        was_ok = self._disk_ok()
        if self.disk is None or msg.state != self.disk.state:
            log.info(kv("disk state", state=msg.state, reason=msg.reason or None, **self.ctx))
        self.disk, self.disk_at = msg, time.monotonic()
        self._check_own_storage(msg)
        if not was_ok and self.attempt is None:
            self.next_beat = 0.0  # ask for work at once, not at the next heartbeat
        a = self.attempt
        if a is None:
            return
        if msg.state == "unavailable" or self.storage_problem is not None:
            self._interrupt(REASON_STORAGE)
        elif msg.state == "hard_limit" and a.phase in ("downloading", "verifying"):
            self._interrupt(REASON_HARD_LIMIT)

    def _check_own_storage(self, msg: DiskStateMsg) -> None:
        """Where the disk-watcher sees the storage, look for it here too (its marker)."""
        problem = None
        if msg.state != "unavailable" and msg.storage_id:
            problem = storage.problem(self.config.storage_dir, msg.storage_id)
        if problem != self.storage_problem:
            if problem is not None:
                log.warning(kv("storage unavailable on this machine; asking for no work",
                               reason=problem, **self.ctx))
            else:
                log.info(kv("storage available on this machine again", **self.ctx))
            self.storage_problem = problem

    def _interrupt(self, reason: str) -> None:
        """Stop the current attempt for a reason that is not the job's fault."""
        a = self.attempt
        assert a is not None
        if a.phase == "downloading" and a.proc is not None:
            if a.kill_reason is None:  # once: a repeat would postpone the SIGKILL escalation
                a.kill(reason, signal.SIGTERM)
        elif a.phase == "verifying":
            a.stop_post()  # kills its ffmpeg at once: a remux must not go on writing
            if reason == REASON_HARD_LIMIT:
                a.clear_partials()
                self._fail(reason, "aborted: disk usage reached hard_limit_gb")
            else:
                self._fail(reason, self._why_stopped(reason))
        elif a.phase == "awaiting_commit":
            self._fail(reason, self._why_stopped(reason))
        # reporting: the file landed or the failure is on its way; let it finish

    def _why_stopped(self, reason: str) -> str:
        if reason == REASON_STORAGE:
            return f"storage unavailable: {self._storage_reason()}"
        return "stopped before landing"

    def _storage_reason(self) -> str:
        disk = self.disk
        return (disk.reason if disk is not None and disk.state == "unavailable" else "") \
            or self.storage_problem or "the storage is not there"

    # --- messages from the dispatcher ---------------------------------------

    def _on_dispatcher(self, msg: Message) -> None:
        if isinstance(msg, JobAssign):
            self._on_assign(msg)
        elif isinstance(msg, JobCommit):
            self._on_commit(msg)
        elif isinstance(msg, JobCancel):
            self._on_cancel(msg)
        elif isinstance(msg, JobAck):
            self._on_ack(msg)
        elif isinstance(msg, WorkerRefused):
            if time.monotonic() - self.refused_logged_at >= REFUSED_LOG_SECONDS:
                self.refused_logged_at = time.monotonic()
                log.error(kv("the dispatcher refused this worker; asking again", why=msg.reason,
                             **self.ctx))
        elif isinstance(msg, WorkerProbe):
            pass  # the dispatcher only learns that this session is still connected
        else:
            log.warning(kv("dropped message not meant for a worker", kind=msg.KIND))

    def _mine(self, job_id: int, attempt: int) -> bool:
        a = self.attempt
        return a is not None and a.job.job_id == job_id and a.job.attempt == attempt

    def _on_assign(self, job: JobAssign) -> None:
        if self._mine(job.job_id, job.attempt):
            return
        if self.attempt is not None or self.stop.requested or not self._disk_ok():
            why = "worker busy" if self.attempt else "worker stopping or disk not available"
            self.send(JobFailed(worker_id=self.worker_id, session=self.session, job_id=job.job_id,
                                attempt=job.attempt, reason=REASON_INTERRUPTED, error=why))
            return
        self.attempt = Attempt(job, self.config, worker_id=self.worker_id, tools=self.tools)
        # The claim set the lease's deadline: the first heartbeat is due one period later.
        self.next_beat = time.monotonic() + self._beat_period()
        if not self.attempt.query:
            self._fail(REASON_INVALID, f"Invalid job: the title {job.anime_title!r} has nothing "
                                       "ani-cli can search for (only characters it cannot "
                                       "carry); fix anime_title")
            return
        if job.dry_run:
            self._fail(REASON_DRY_RUN, "dry run", argv=self.attempt.argv())
            log.info(kv("dry run: would run", argv=self.attempt.argv(),
                        **self.ctx))
            return
        try:
            self.attempt.prepare()
            self.attempt.spawn()
        except OSError as exc:
            reason = REASON_NO_SPACE if download.is_no_space_error(exc) else REASON_ERROR
            self._fail(reason, f"could not start ani-cli: {exc}")
        except RuntimeError as exc:
            self._fail(REASON_INTERRUPTED, str(exc))

    def _on_commit(self, msg: JobCommit) -> None:
        a = self.attempt
        if not self._mine(msg.job_id, msg.attempt) or a.phase != "awaiting_commit":
            return
        try:
            a.land(msg.video_path)
        except OSError as exc:
            reason = REASON_NO_SPACE if download.is_no_space_error(exc) else REASON_ERROR
            self._fail(reason, f"Failed to move video into place: {exc}")
            return
        log.info(kv("landed", path=msg.video_path, size=a.post.size, **self.ctx))
        landed = JobLanded(worker_id=self.worker_id, session=self.session, job_id=msg.job_id,
                           attempt=msg.attempt, video_path=msg.video_path,
                           size_bytes=a.post.size, duration_seconds=a.post.duration,
                           site_title=a.site[0] if a.site else None,
                           title_mismatch=a.title_mismatch)
        self.landings[(msg.job_id, msg.attempt)] = landed
        self.landings_sent_at = time.monotonic()
        self.send(landed)
        # The file is in place: nothing of this attempt is needed any more. Idle now, so
        # this loop turn asks for the next job right behind the landing (the dispatcher
        # reads both in one wake-up and answers with the ack and the next job together).
        a.discard(keep_partials=False)
        self._idle()

    def _on_cancel(self, msg: JobCancel) -> None:
        if not self._mine(msg.job_id, msg.attempt):
            return
        a = self.attempt
        log.warning(kv("lease lost: discarding this attempt", why=msg.reason, **self.ctx))
        if a.proc is not None and a.proc.returncode is None:
            download.reap(a.proc)
        a.discard(keep_partials=True)
        self._idle()

    def _on_ack(self, msg: JobAck) -> None:
        if self.landings.pop((msg.job_id, msg.attempt), None) is not None:
            return
        p = self.pending
        if p is None or (p.job_id, p.attempt) != (msg.job_id, msg.attempt):
            return
        a = self.attempt
        if a is not None and self._mine(msg.job_id, msg.attempt):
            a.discard(keep_partials=not a.job.dry_run)  # a failure's partials may resume
        self._idle()

    def _idle(self) -> None:
        self.attempt = None
        self.pending = None
        self.seq += 1
        self.next_beat = 0.0

    # --- timers -------------------------------------------------------------

    def _timers(self) -> None:
        now = time.monotonic()
        a = self.attempt
        if a is not None:
            try:
                self._check_attempt(a, now)
            except Exception as exc:  # a bug judging one attempt must not end the worker
                log.exception(kv("error while checking the attempt", **self.ctx))
                if self.attempt is a and a.phase != "reporting":
                    if a.proc is not None and a.proc.returncode is None:
                        download.reap(a.proc)
                    self._fail(REASON_ERROR, f"worker error while checking the download: {exc}")
        if self.pending is not None and now - self.pending_at >= RESEND_SECONDS:
            self.pending_at = now
            self.send(self.pending)
        if self.landings and now - self.landings_sent_at >= RESEND_SECONDS:
            self.landings_sent_at = now
            for landed in self.landings.values():
                self.send(landed)
        if now >= self.next_beat:
            self.next_beat = now + self._beat_period()
            self._beat()

    def _beat_period(self) -> float:
        """The configured heartbeat, but never slower than a third of the lease the
        dispatcher gave (a remote worker's own config may say otherwise)."""
        period = self.config.queue.heartbeat_seconds
        if self.attempt is not None and self.attempt.job.lease_seconds > 0:
            period = min(period, self.attempt.job.lease_seconds / 3)
        return period

    def _beat(self) -> None:
        a = self.attempt
        if a is None:
            if not self.stop.requested and self._disk_ok():
                if not self.send(WorkerReady(worker_id=self.worker_id, session=self.session,
                                             seq=self.seq, host=self.host)):
                    # not connected yet: retry soon, but never spin while the dispatcher is away
                    self.next_beat = time.monotonic() + RECONNECT_RETRY_SECONDS
            return
        if a.phase == "reporting" or self.pending is not None:
            return
        percent, speed_bps, eta_seconds = a.progress()
        self.send(JobHeartbeat(
            worker_id=self.worker_id, session=self.session, job_id=a.job.job_id,
            attempt=a.job.attempt, bytes=a.bytes_written() if a.proc else 0,
            percent=percent, speed_bps=speed_bps, eta_seconds=eta_seconds,
            state="stopping" if self.stop.requested else a.phase, started_at=a.started_at))

    def _check_attempt(self, a: Attempt, now: float) -> None:
        if a.phase == "downloading" and a.proc is not None:
            if a.kill_reason is None and now > a.deadline:
                a.kill(REASON_TIMEOUT, signal.SIGTERM)
            elif a.kill_sent_at is not None and now - a.kill_sent_at > download.KILL_GRACE_SECONDS:
                a.kill(a.kill_reason or REASON_TIMEOUT, signal.SIGKILL)
            code = a.exited()
            if code is not None:
                self._after_ani_cli(a, code, now)
        elif a.phase == "verifying" and a.post is not None:
            self._after_post(a)

    def _after_ani_cli(self, a: Attempt, code: int, now: float) -> None:
        tail = a.output_tail()
        if a.kill_reason == REASON_TIMEOUT:
            self._fail(REASON_TIMEOUT, f"ani-cli timed out after "
                       f"{self.config.downloader.timeout_seconds:g}s and was killed\n{tail}".rstrip())
        elif a.kill_reason == REASON_HARD_LIMIT:
            a.clear_partials()
            self._fail(REASON_HARD_LIMIT, "aborted: disk usage reached hard_limit_gb")
        elif a.kill_reason == REASON_INTERRUPTED or self.stop.requested:
            self._fail(REASON_INTERRUPTED, "interrupted by a stop request")
        elif code in STOP_EXIT_CODES or (code == 1 and not a.died):
            self._stopped_from_outside(a, code, now)
        else:
            self._judge(a, code, tail)

    def _stopped_from_outside(self, a: Attempt, code: int, now: float) -> None:
        """ani-cli ended as a stop ends it (a signal, or its trap's silent exit 1) without
        the worker asking: wait a moment for the worker's own stop signal (a shutdown);
        without one, do not count it, up to MAX_UNCOUNTED_ATTEMPTS times per job."""
        if a.exit_seen_at is None:
            a.exit_seen_at = now
            log.debug(kv("ani-cli exited as if stopped; waiting for a stop signal",
                         exit_code=code, **self.ctx))
        if now - a.exit_seen_at < OUTSIDE_STOP_GRACE_SECONDS:
            return  # checked again at the next turn of the loop
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if code == 1:
            how += " without an error message, as its INT/HUP/TERM trap exits"
        uncounted = a.job.attempt - 1 - a.job.retry_count
        if uncounted < MAX_UNCOUNTED_ATTEMPTS:
            self._fail(REASON_INTERRUPTED, f"ani-cli was stopped from outside ({how})")
        else:
            self._fail(REASON_ERROR, f"ani-cli was stopped from outside ({how}) after "
                       f"{uncounted} attempts that counted no retry: counting this one"
                       f"\n{a.output_tail()}".rstrip())

    def _judge(self, a: Attempt, code: int, tail: str) -> None:
        outcome = download.judge(code, a.download_dir, tail, a.destination())
        if outcome.no_space:
            a.clear_partials()
            self._fail(REASON_NO_SPACE, "Failed to write video file: No space left on device")
        elif outcome.file is None:
            self._fail(REASON_ERROR, outcome.error or "unknown error")
        elif self._title_accepted(a, outcome.file):
            a.start_post(outcome.file)

    def _title_accepted(self, a: Attempt, file) -> bool:
        """Compare the site's title (in the file's name) with the selected one and apply
        [downloader] on_title_mismatch; False when the attempt ended here."""
        a.check_title(file)
        policy = self.config.downloader.on_title_mismatch
        if not a.title_mismatch or policy == "ignore":
            return True
        site = a.site[0] if a.site else None
        if policy == "fail":
            a.clear_partials()
            self._fail(REASON_INVALID, f"Downloaded show is not the selected one: the site "
                       f"calls it {site!r}, selected_title is {a.job.selected_title!r} "
                       "([downloader] on_title_mismatch = \"fail\")")
            return False
        log.warning(kv("downloaded show is not the selected one", site_title=site,
                       selected_title=a.job.selected_title, **self.ctx))
        return True

    def _after_post(self, a: Attempt) -> None:
        post = a.post
        if post.error is not None:
            if post.no_space:
                a.clear_partials()
            reason = (REASON_NO_SPACE if post.no_space else REASON_TIMEOUT if post.timed_out
                      else REASON_INTERRUPTED if post.stopped else REASON_ERROR)
            self._fail(reason, post.error)
            return
        a.phase = "awaiting_commit"
        self.report(JobFinished(worker_id=self.worker_id, session=self.session,
                                job_id=a.job.job_id, attempt=a.job.attempt, ext=post.ext,
                                size_bytes=post.size, duration_seconds=post.duration,
                                site_title=a.site[0] if a.site else None,
                                title_mismatch=a.title_mismatch))

    def _fail(self, reason: str, error: str, argv: list[str] | None = None) -> None:
        a = self.attempt
        assert a is not None
        reason, error = self._unless_storage(a, reason, error)
        a.phase = "reporting"
        level = logging.INFO if reason in (REASON_DRY_RUN, REASON_INTERRUPTED) else logging.WARNING
        if reason != REASON_DRY_RUN:
            log.log(level, kv("attempt ended without a file", reason=reason,
                              error=error.splitlines()[0] if error else None, **self.ctx))
        self.report(JobFailed(worker_id=self.worker_id, session=self.session, job_id=a.job.job_id,
                              attempt=a.job.attempt, reason=reason, error=error, argv=argv or []))

    def _unless_storage(self, a: Attempt, reason: str, error: str) -> tuple[str, str]:
        """A failure while the storage is not there (the failure may be its first sign) is
        not the job's fault: reported as such, so it counts no retry."""
        if reason not in (REASON_ERROR, REASON_TIMEOUT, REASON_NO_SPACE) \
                and a.kill_reason != REASON_STORAGE:
            return reason, error
        problem = a.storage_problem()
        if problem is None:
            return reason, error
        return REASON_STORAGE, f"storage unavailable: {problem}"
