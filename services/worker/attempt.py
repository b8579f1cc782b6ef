"""One job attempt on a worker: the private directory, ani-cli, the staged file.

The worker's loop drives an ``Attempt`` through its phases::

    downloading -> verifying -> awaiting_commit -> reporting (JobLanded sent)
         \\------------\\--------------\\----------> reporting (JobFailed sent)

Files: ``<storage>/.in_progress/job-<id>/dl/`` is ani-cli's download directory
(kept across retries so a resuming downloader resumes), ``job-<id>/`` itself
ani-cli's private history directory, ``.lock`` the attempt's lock (holding the
process group of its ani-cli, for a worker that was killed), and
``ready-a<attempt>.<ext>`` the verified file waiting for the dispatcher's
go-ahead. Only after ``JobCommit`` is it hard-linked to its final name (never
replacing an existing episode) and the private directory removed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from shared import layout, storage
from shared.config import Config
from shared.lifecycle import kv
from shared.protocol import JobAssign
from services.worker import download, rename, shims, titles
from services.worker.progress import OutputTail, Progress, ProgressParser

if TYPE_CHECKING:  # video is imported when a post step starts: an idle worker stays small
    from services.worker.video import RemuxError, Stopper

log = logging.getLogger(__name__)
# With a pidfd for its exit, ani-cli's output is read at most this often: every write
# of a progress line woke the worker at once (and a woken worker preempts the writer on
# a busy machine). 64 KiB of pipe buffer holds far more than a tenth of a second of it.
OUTPUT_READ_SECONDS = 0.1
BIG_READ = 32 * 1024  # a read this large: read again at once, the writer is chatty
LOCK_FILE = ".lock"  # flock of the attempt; holds "<pgid> <start time>" of its ani-cli
# ani-cli's die(): "\33[2K\r\033[1;31m<message>\033[0m" on stderr. Every failure of the
# script prints it; its INT/HUP/TERM trap exits 1 without it.
DIE_MARK = b"\x1b[1;31m"

_warned_no_ffmpeg = False


@dataclass
class PostResult:
    """What verification and remuxing produced."""
    staged: Path | None = None
    ext: str = ""
    size: int = 0
    duration: float | None = None
    error: str | None = None
    no_space: bool = False
    timed_out: bool = False  # the check or remux ran out of time: the file is kept for a retry
    stopped: bool = False  # stop_post() ended it: no verdict


@dataclass
class Attempt:
    job: JobAssign
    config: Config
    phase: str = "downloading"
    proc: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.time)
    deadline: float = 0.0  # monotonic
    kill_reason: str | None = None
    kill_sent_at: float | None = None
    # One parser and tail per stream: interleaving two streams' partial lines garbles both.
    parsers: dict[str, ProgressParser] = field(default_factory=lambda: {
        "stdout": ProgressParser(), "stderr": ProgressParser()})
    tails: dict[str, OutputTail] = field(default_factory=lambda: {
        "stdout": OutputTail(), "stderr": OutputTail()})
    latest: Progress | None = None
    # Running max of this download's percent: yt-dlp's HLS percent swings with its estimated
    # total (-N 16 finishes fragments out of order), a progress bar must not go backwards.
    max_percent: float | None = None
    _new_download: bool = False  # the last figure ended a download; the next one starts another
    post: PostResult | None = None
    post_thread: threading.Thread | None = None
    post_wakeup: tuple[int, int] | None = None  # pipe: the thread writes a byte when done
    post_stopper: Stopper | None = None  # ends the post step's tools (stop_post)
    _post_running: bool = False  # guarded by _post_lock, as is post_wakeup once the thread runs
    _post_orphaned: bool = False  # the attempt let go of a thread that has not ended: it closes the pipe
    _post_lock: threading.Lock = field(default_factory=threading.Lock)
    lock_fd: int | None = None
    exit_fd: int | None = None  # pidfd of ani-cli: readable once it has exited
    read_due: float = 0.0  # monotonic time from which ani-cli's output is polled again
    worker_id: str = ""  # for the log lines
    tools: shims.Shims | None = None  # the downloader wrappers (None: ani-cli's own PATH)
    died: bool = False  # ani-cli printed a die() message
    _stderr_edge: bytes = b""  # the last bytes of stderr, for a mark split across reads
    site: tuple[str, str] | None = None  # (site title, episode) from the file's name
    title_mismatch: bool = False
    exit_seen_at: float | None = None  # monotonic: ani-cli's exit looked like a stop
    _exit_code: int | None = None

    @cached_property
    def private_dir(self) -> Path:
        return layout.job_dir(self.config.storage_dir, self.job.job_id)

    @cached_property
    def download_dir(self) -> Path:
        return self.private_dir / "dl"

    @property
    def context(self) -> dict:
        j = self.job
        return dict(worker_id=self.worker_id or None, job_id=j.job_id, anime_id=j.anime_id,
                    episode=j.episode, attempt=j.attempt)

    @cached_property
    def query(self) -> str:
        """The title made search-safe (services/worker/titles.py)."""
        return titles.search_query(self.job.anime_title)

    def argv(self) -> list[str]:
        d = self.config.downloader
        return download.build_argv(d.command, self.job.selected_index, self.job.episode,
                                   d.extra_args, self.query)

    # --- starting -----------------------------------------------------------

    def prepare(self) -> None:
        """Create and lock the private directory. One that was there already belongs to an
        earlier attempt: kill what a killed worker left running in it, drop staged files.
        (Few files per job: on ext4 every inode freed slows the next allocations.)
        Nothing is created unless storage_dir is the storage the dispatcher named."""
        self.require_storage()
        fresh = _make_dir(self.private_dir)
        os.makedirs(self.download_dir, exist_ok=True)
        fd = os.open(self.private_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError("private directory is in use by another attempt") from None
        self.lock_fd = fd
        if not fresh:
            _kill_orphan(fd, self.private_dir)
            for stale in self.private_dir.glob("ready-a*"):
                stale.unlink(missing_ok=True)

    def spawn(self) -> None:
        d = self.config.downloader
        argv = self.argv()
        env = download.build_env(_base_env(), self.download_dir, self.private_dir,
                                 self.job.rate_limit_bps, self.tools)
        try:
            self.proc = download.start(argv, self.download_dir, env)
        except FileNotFoundError as exc:
            if exc.filename != argv[0]:
                raise
            raise FileNotFoundError(f"ani-cli not found: {argv[0]!r} (set [downloader] command)") from None
        self.exit_fd = download.exit_fd(self.proc)
        _record_group(self.lock_fd, self.proc.pid)
        self.deadline = time.monotonic() + d.timeout_seconds
        log.info(kv("ani-cli started", pid=self.proc.pid, argv=argv, title=self.job.anime_title,
                    query=self.query, rate_limit_bps=self.job.rate_limit_bps or None,
                    **self.context))

    # --- while running ------------------------------------------------------

    def pipes(self) -> list[int]:
        """The fds the worker's poller waits on: ani-cli's output and its exit (a pidfd), then
        the end of the post step (without these the loop would see either only at its next
        250 ms poll timeout)."""
        if self.phase == "verifying" and self.post_wakeup is not None:
            return [self.post_wakeup[0]]
        if self.proc is None:
            return []
        fds = []
        if self.exit_fd is None or time.monotonic() >= self.read_due:
            fds = [p.fileno() for p in (self.proc.stdout, self.proc.stderr) if p and not p.closed]
        if self.exit_fd is not None and self.proc.returncode is None:
            fds.append(self.exit_fd)
        return fds

    def seconds_to_read(self) -> float:
        """How long the worker's poll may sleep before ani-cli's output is due (infinite
        while its pipes are polled: then a write wakes the poll)."""
        left = self.read_due - time.monotonic()
        if self.exit_fd is None or self.phase != "downloading" or left <= 0:
            return float("inf")
        return left

    def read_pipes(self) -> None:
        if self.proc is None:
            return
        got = 0
        for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            if pipe is None or pipe.closed:
                continue
            while True:
                try:
                    chunk = os.read(pipe.fileno(), 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    pipe.close()
                    break
                got += len(chunk)
                self.feed(name, chunk)
        self.read_due = time.monotonic() + (0.0 if got >= BIG_READ else OUTPUT_READ_SECONDS)
        if self.exit_fd is None and all(p is None or p.closed for p in (self.proc.stdout, self.proc.stderr)):
            try:  # no pidfd; both pipes at EOF: it is exiting; reap it now, not at the next poll
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass

    def feed(self, stream: str, chunk: bytes) -> None:
        """Account a chunk of ani-cli's ``stream`` ("stdout" or "stderr"): its own parser
        and tail (two streams' partial lines never mix), the latest figure, the running max."""
        for figure in self.parsers[stream].feed(chunk):
            if self._new_download:
                self.max_percent, self._new_download = None, False
            self.latest = figure
            if figure.percent is not None:
                self.max_percent = max(self.max_percent or 0.0, figure.percent)
            self._new_download = figure.done
        self.tails[stream].feed(chunk)
        if stream == "stderr" and not self.died:
            seen = self._stderr_edge + chunk
            self.died = DIE_MARK in seen
            self._stderr_edge = seen[-(len(DIE_MARK) - 1):]

    def destination(self) -> str | None:
        """Where the downloader said it writes (yt-dlp's ``[download] Destination:``)."""
        return self.parsers["stdout"].destination or self.parsers["stderr"].destination

    def check_title(self, file: Path) -> None:
        """Read the site's title from the file's name and compare it with the selection."""
        self.site = titles.site_title(str(file.relative_to(self.download_dir)))
        selected = self.job.selected_title
        self.title_mismatch = bool(self.site and selected
                                   and not titles.same_show(selected, self.site[0]))

    def progress(self) -> tuple[float | None, float | None, float | None]:
        """(percent, speed_bps, eta_seconds) for the heartbeat. The percent is the running max
        of the current download, None while the latest figure has none (ffmpeg's never does);
        without an ETA from the tool (yt-dlp's HLS says Unknown) one from its estimated total."""
        p = self.latest
        if p is None:
            return None, None, None
        eta = p.eta_seconds
        if eta is None and p.total_bytes and p.downloaded_bytes is not None and p.speed_bps:
            eta = round(max(0, p.total_bytes - p.downloaded_bytes) / p.speed_bps, 1)
        return (self.max_percent if p.percent is not None else None), p.speed_bps, eta

    def output_tail(self) -> str:
        """The last lines of stderr (what the spec's error message carries), else stdout."""
        return self.tails["stderr"].text() or self.tails["stdout"].text()

    def kill(self, reason: str, sig: int) -> None:
        if self.proc is None:
            return
        if self.kill_reason is None:
            self.kill_reason = reason
            log.info(kv("stopping ani-cli", why=reason, pid=self.proc.pid, **self.context))
        self.kill_sent_at = time.monotonic()
        download.kill_group(self.proc, sig)

    def exited(self) -> int | None:
        """ani-cli's exit code once it ended (its pipes drained), else None."""
        if self._exit_code is not None:
            return self._exit_code
        if self.proc is None or self.proc.poll() is None:
            return None
        # Whatever it left running in its group (a stray child holding our pipes) goes too.
        download.kill_group(self.proc)
        self.read_pipes()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe and not pipe.closed:
                pipe.close()
        self._exit_code = self.proc.returncode
        return self._exit_code

    def bytes_written(self) -> int:
        """What the attempt occupies: the download, and while verifying the remux's copy."""
        latest = self.latest
        on_disk = download.bytes_in(self.download_dir)
        if self.phase == "verifying":
            on_disk += self._staged_bytes()
        if latest is not None and latest.downloaded_bytes:
            return max(latest.downloaded_bytes, on_disk)
        return on_disk

    def _staged_bytes(self) -> int:
        total = 0
        for staged in self.private_dir.glob(f"ready-a{self.job.attempt}*"):
            try:
                total += staged.stat().st_size
            except OSError:
                continue
        return total

    # --- the storage --------------------------------------------------------

    def storage_problem(self) -> str | None:
        """Why the storage cannot be written now (shared/storage.py), or None."""
        return storage.problem(self.config.storage_dir, self.job.storage_id)

    def require_storage(self) -> None:
        """Checked before every write phase: the disk-watcher's word is up to a second old."""
        storage.require(self.config.storage_dir, self.job.storage_id,
                        self.config.create_storage_dir)

    # --- after ani-cli ------------------------------------------------------

    def start_post(self, file: Path) -> None:
        """Verify and remux in a thread, so heartbeats go on during a long check;
        ``stop_post()`` ends it (and its ffmpeg) at once."""
        from services.worker import video

        self.phase = "verifying"
        self.post_wakeup = os.pipe()
        self.post_stopper = video.Stopper(on_start=lambda pid: _record_group(self.lock_fd, pid))
        self._post_running = True
        self.post_thread = threading.Thread(target=self._post, args=(file,), daemon=True)
        self.post_thread.start()

    def _post(self, file: Path) -> None:
        from services.worker import video

        try:
            self.post = self._verify_and_stage(file)
        except video.Stopped:
            self.post = PostResult(error="post-processing stopped", stopped=True)
        except OSError as exc:
            self.post = PostResult(error=f"Failed to write video file: {exc.strerror or exc}",
                                   no_space=download.is_no_space_error(exc))
        except Exception as exc:  # a bug here must fail the attempt, not hang it
            log.exception(kv("post-processing failed", **self.context))
            self.post = PostResult(error=f"post-processing failed: {exc}")
        finally:
            with self._post_lock:
                self._post_running = False
                if self._post_orphaned:
                    self._close_post_pipe()
                else:
                    os.write(self.post_wakeup[1], b"\0")  # wakes the worker's poller

    def stop_post(self, wait_seconds: float = 5.0) -> None:
        """End the post step: kill the ffmpeg it runs, wait for its thread, close its pipe.
        Idempotent; harmless when no post step ran. (A thread that does not end in time
        closes the pipe itself when it does.)"""
        if self.post_stopper is not None:
            self.post_stopper.stop()
        thread = self.post_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_seconds)
        with self._post_lock:
            if self._post_running:
                self._post_orphaned = True
            else:
                self._close_post_pipe()

    def _close_post_pipe(self) -> None:
        if self.post_wakeup is not None:
            for fd in self.post_wakeup:
                os.close(fd)
            self.post_wakeup = None

    def _verify_and_stage(self, file: Path) -> PostResult:
        """Verify, remux to MKV, stage. What it returns keeps the download unless the file
        is bad: a time-out or a full disk says nothing against the file."""
        d = self.config.downloader
        duration = None
        if d.verify or d.container == "mkv":
            from services.worker import video

            stopper = self.post_stopper
            timeout = video.timeout_for(file.stat().st_size, d.verify_timeout_seconds)
            if d.verify:
                try:
                    duration = video.verify_video(file, timeout, stopper).duration_seconds
                except video.VerifyTimeout as exc:
                    return PostResult(error=f"verify timed out: {exc} (the file is kept for the "
                                            "retry; raise [downloader] verify_timeout_seconds "
                                            "if the disk is slow)", timed_out=True)
                except video.NotAVideo as exc:
                    file.unlink(missing_ok=True)  # a retry must not find it again
                    return PostResult(error=f"Downloaded file is not a playable video: {exc}")
            if d.container == "mkv" and file.suffix.lower() != ".mkv":
                if video.find_ffmpeg() is not None:
                    staged = self.private_dir / f"ready-a{self.job.attempt}.mkv"
                    try:
                        video.remux_to_mkv(file, staged, timeout, stopper)
                    except video.RemuxError as exc:
                        return _remux_failed(exc)
                    if stopper is not None:
                        stopper.check()
                    file.unlink()
                    return self._staged(staged, duration)
                _warn_no_ffmpeg()
        staged = self.private_dir / f"ready-a{self.job.attempt}{file.suffix.lower()}"
        os.rename(file, staged)
        return self._staged(staged, duration)

    @staticmethod
    def _staged(path: Path, duration: float | None) -> PostResult:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        return PostResult(staged=path, ext=path.suffix, size=path.stat().st_size, duration=duration)

    # --- landing ------------------------------------------------------------

    def land(self, video_path: str) -> None:
        """Put the staged file at its final path; never replace an existing episode."""
        assert self.post is not None and self.post.staged is not None
        target = Path(video_path)
        self.require_storage()
        layout.make_dirs_below(self.config.storage_dir, target.parent)
        try:
            os.link(self.post.staged, target)
        except FileExistsError:
            if not os.path.samefile(self.post.staged, target):
                raise
        except OSError:
            # A filesystem without hard links (some SMB mounts): rename, never replacing.
            rename.rename_noreplace(self.post.staged, target,
                                    metadata_lock(self.config.storage_dir, self.job.anime_id))
        self.post.staged.unlink(missing_ok=True)
        _fsync_dir(target.parent)
        # Only now: metadata.json never lists an episode whose link failed.
        write_metadata(self.config.storage_dir, self.job, target, self.post.duration,
                       self.site[0] if self.site else None, self.title_mismatch)

    def discard(self, keep_partials: bool) -> None:
        """Remove what this attempt leaves: everything, or only the staged file."""
        self.stop_post()
        if keep_partials:
            for staged in self.private_dir.glob(f"ready-a{self.job.attempt}*"):
                try:
                    staged.unlink(missing_ok=True)
                except OSError:  # a read-only or failing storage: the next attempt removes it
                    pass
        else:
            remove_private_dir(self.private_dir)
        self.release()

    def clear_partials(self) -> None:
        shutil.rmtree(self.download_dir, ignore_errors=True)

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None
        self.stop_post()


@lru_cache(maxsize=1)
def _base_env() -> dict[str, str]:
    """The worker's environment, read once (os.environ decodes every entry on each copy);
    build_env copies it for each attempt."""
    return dict(os.environ)


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell it from a reused pid."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def _make_dir(path: Path) -> bool:
    """Create ``path`` (and ``.in_progress`` above it, never storage_dir itself); False if it
    was there already."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except FileNotFoundError:
        try:
            os.mkdir(path.parent)
        except FileExistsError:
            pass
        return _make_dir(path)


def _remux_failed(exc: RemuxError) -> PostResult:
    """A remux that failed keeps the download (removed only when the disk is full)."""
    if exc.no_space:
        return PostResult(error="Failed to write video file: No space left on device "
                                f"(remux: {exc})", no_space=True)
    if exc.timed_out:
        return PostResult(error=f"remux timed out: {exc} (the file is kept for the retry)",
                          timed_out=True)
    return PostResult(error=f"post-processing failed: {exc}")


def _record_group(lock_fd: int | None, pid: int) -> None:
    """Write "<pgid> <start time>" of the attempt's ani-cli into its lock file."""
    if lock_fd is None:
        return
    record = f"{pid} {_start_time(pid)}\n".encode()
    os.pwrite(lock_fd, record, 0)
    os.ftruncate(lock_fd, len(record))


def _kill_orphan(lock_fd: int, directory: Path) -> None:
    """A worker killed with SIGKILL leaves ani-cli running in its own session, still
    writing into the private directory: kill that group before a new attempt starts.
    Only called with the directory's lock held, so no live attempt owns that group."""
    try:
        pid_text, started = os.pread(lock_fd, 128, 0).decode().split()
        pgid = int(pid_text)
    except (OSError, ValueError):
        return
    now_started = _start_time(pgid)
    # the leader alive with the recorded start time is ours; with no process of that
    # pid left, a group of that id can only be what remains of ours
    if now_started is None or now_started == started:
        try:
            os.killpg(pgid, signal.SIGKILL)
            log.warning(kv("killed ani-cli left running by a killed worker", pgid=pgid,
                           directory=directory))
        except ProcessLookupError:
            pass
    os.ftruncate(lock_fd, 0)


def _warn_no_ffmpeg() -> None:
    global _warned_no_ffmpeg
    if not _warned_no_ffmpeg:
        _warned_no_ffmpeg = True
        log.warning("no ffmpeg found: keeping episodes in their downloaded container "
                    "(install ffmpeg or imageio-ffmpeg for .mkv)")


def remove_private_dir(path: Path) -> None:
    """Remove a job's private directory. After a landing it holds the lock file, ani-cli's
    history and the empty ``dl/``: remove those directly (a few syscalls, once per job),
    anything deeper with rmtree."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        os.rmdir(entry.path)
                    else:
                        os.unlink(entry.path)
                except OSError:
                    shutil.rmtree(entry.path, ignore_errors=True)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def metadata_lock(storage_dir: Path, anime_id: int) -> Path:
    """The lock file of an anime's landings and metadata.json (not where the transcriber looks)."""
    lock_dir = layout.in_progress_root(storage_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return lock_dir / f"metadata-{anime_id}.lock"


def write_metadata(storage_dir: Path, job: JobAssign, video: Path, duration: float | None,
                   site_title: str | None = None, title_mismatch: bool = False) -> None:
    """Create or update ``videos/<mal_id>/metadata.json`` atomically, one writer at a time.
    Each episode records the site's title its file was named after (as the site sends it)
    and whether it differs from ``selected_title``."""
    path = layout.metadata_path(storage_dir, job.anime_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(metadata_lock(storage_dir, job.anime_id), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            data = {}
        data.update({"mal_id": job.anime_id, "title": job.anime_title,
                     "selected_index": job.selected_index, "selected_title": job.selected_title,
                     "confidence": job.confidence})
        episodes = data.setdefault("episodes", {})
        episodes[str(job.episode)] = {"file": video.name, "duration_seconds": duration,
                                      "site_title": site_title, "title_mismatch": title_mismatch}
        tmp = path.with_name(f".metadata.json.{os.getpid()}.tmp")
        # No indent: json's C encoder works only without one (a 1,000-episode series took
        # ~10 ms per landing with indent=2 in the pure-Python encoder).
        tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    finally:
        os.close(lock_fd)
