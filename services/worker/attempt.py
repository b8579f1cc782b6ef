"""The I/O of one job attempt, for the worker's loop to carry out the core's actions.

It ties together the attempt's private directory and its lock (private_dir.py),
ani-cli's process (process.py) and pipes (output.py), the post step (post_step.py)
and the landing (landing.py). It decides nothing: services/worker/core.py does.
Nothing is created, and nothing landed, unless storage_dir is the storage the
dispatcher named (checked before every write phase: the disk-watcher's word is up
to a second old).
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

from shared import storage
from shared.config import Config
from shared.protocol import JobAssign
from services.worker import download, landing, private_dir, process, shims
from services.worker.actions import Exit, Figures
from services.worker.output import AniCliOutput
from services.worker.post_step import PostResult, PostStep
from services.worker.private_dir import PrivateDir


class Attempt:
    def __init__(self, job: JobAssign, config: Config, worker_id: str = "",
                 tools: shims.Shims | None = None) -> None:
        self.job = job
        self.config = config
        self.tools = tools  # the downloader wrappers (None: ani-cli's own PATH)
        self.context = dict(worker_id=worker_id or None, job_id=job.job_id, anime_id=job.anime_id,
                            episode=job.episode, attempt=job.attempt)
        self.private = PrivateDir(config.storage_dir, job.job_id, job.attempt)
        self.output = AniCliOutput()
        self.proc: subprocess.Popen | None = None
        self.exit_fd: int | None = None  # pidfd of ani-cli: readable once it has exited
        self._exit: Exit | None = None
        self.post = PostStep(config.downloader, self.private, self._record_group, self.context)
        self._post_taken = False

    @property
    def private_dir(self) -> Path:
        return self.private.path

    @property
    def download_dir(self) -> Path:
        return self.private.download_dir

    def _record_group(self, pid: int) -> None:
        process.record_group(self.private.lock_fd, pid)

    # --- starting -----------------------------------------------------------

    def require_storage(self) -> None:
        storage.require(self.config.storage_dir, self.job.storage_id, self.config.create_storage_dir)

    def prepare(self) -> None:
        """Lock the private directory (made if need be) on the storage the dispatcher named."""
        self.require_storage()
        self.private.lock()

    def spawn(self, argv: list[str]) -> int:
        """Start ani-cli; its pid."""
        env = download.build_env(_base_env(), self.download_dir, self.private_dir,
                                 self.job.rate_limit_bps, self.tools)
        try:
            self.proc = process.start(argv, self.download_dir, env)
        except FileNotFoundError as exc:
            if exc.filename != argv[0]:
                raise
            raise FileNotFoundError(f"ani-cli not found: {argv[0]!r} (set [downloader] command)") from None
        self.exit_fd = process.exit_fd(self.proc)
        self._record_group(self.proc.pid)
        return self.proc.pid

    # --- while it runs ------------------------------------------------------

    def fds(self) -> list[int]:
        """The fds the loop's poll waits on: ani-cli's output and its exit (a pidfd), then
        the end of the post step (without these the loop would see either only when a
        timer wakes it)."""
        if self.post.wakeup is not None and not self._post_taken:
            return [self.post.wakeup[0]]
        if self.proc is None or self._exit is not None:
            return []
        fds = self.output.fds(self.proc, paced=self.exit_fd is not None)
        if self.exit_fd is not None and self.proc.returncode is None:
            fds.append(self.exit_fd)
        return fds

    def seconds_to_wait(self) -> float:
        """How long the loop may sleep for this attempt: until its pipes are due while a
        pidfd tells the exit; without one, a quarter second (a child may hold the pipes)."""
        if self.proc is None or self._exit is not None:
            return float("inf")
        if self.exit_fd is None:
            return 0.25
        left = self.output.seconds_to_read()
        return left if left > 0 else float("inf")

    def read_pipes(self) -> None:
        if self.proc is None:
            return
        self.output.read(self.proc)
        if self.exit_fd is None and all(p is None or p.closed for p in (self.proc.stdout, self.proc.stderr)):
            try:  # no pidfd; both pipes at EOF: it is exiting; reap it now, not at the next poll
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass

    def exited(self) -> Exit | None:
        """How ani-cli ended, once it has (its pipes drained), else None."""
        if self._exit is not None or self.proc is None or self.proc.poll() is None:
            return self._exit
        # Whatever it left running in its group (a stray child holding our pipes) goes too.
        process.kill_group(self.proc)
        self.read_pipes()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe and not pipe.closed:
                pipe.close()
        out = self.output
        self._exit = Exit(self.proc.returncode, out.died, out.tail(), out.destination(),
                          private_dir.files_under(self.download_dir))
        return self._exit

    def kill(self, sig: int) -> None:
        """Signal ani-cli's group, while ani-cli has not been reaped (its pid is ours)."""
        if self.proc is not None and self.proc.returncode is None:
            process.kill_group(self.proc, sig)

    def reap(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            process.reap(self.proc)

    def figures(self, phase: str) -> Figures:
        percent, speed_bps, eta_seconds = self.output.progress()
        return Figures(self.bytes_written(phase), percent, speed_bps, eta_seconds)

    def bytes_written(self, phase: str = "downloading") -> int:
        """What the attempt occupies: the download, and while verifying the remux's copy."""
        latest = self.output.latest
        on_disk = private_dir.bytes_in(self.download_dir)
        if phase == "verifying":
            on_disk += self.private.staged_bytes()
        if latest is not None and latest.downloaded_bytes:
            return max(latest.downloaded_bytes, on_disk)
        return on_disk

    # --- after ani-cli ------------------------------------------------------

    def start_post(self, name: str) -> None:
        self.post.start(self.download_dir / name)

    def post_result(self) -> PostResult | None:
        """The post step's result, once, when it has ended."""
        if self._post_taken or not self.post.done():
            return None
        self._post_taken = True
        return self.post.result

    def stop_post(self) -> None:
        self.post.stop()

    def clear_partials(self) -> None:
        self.private.clear_partials()

    def land(self, video_path: str, site_title: str | None, title_mismatch: bool) -> None:
        """Put the staged file at its final path; never replace an existing episode."""
        result = self.post.result
        assert result is not None and result.staged is not None
        self.require_storage()
        landing.land(self.config.storage_dir, self.job, result.staged, Path(video_path),
                     result.duration, site_title, title_mismatch)

    def discard(self, keep_partials: bool) -> None:
        """Remove what this attempt leaves: everything, or only the staged file."""
        self.reap()
        self.post.stop()
        if keep_partials:
            self.private.drop_staged()
        else:
            self.private.remove()
        self.release()

    def release(self) -> None:
        self.private.release()
        if self.exit_fd is not None:
            os.close(self.exit_fd)
            self.exit_fd = None
        self.post.stop()


@lru_cache(maxsize=1)
def _base_env() -> dict[str, str]:
    """The worker's environment, read once (os.environ decodes every entry on each copy);
    build_env copies it for each attempt."""
    return dict(os.environ)
