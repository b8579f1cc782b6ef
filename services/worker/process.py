"""The worker's child processes: started in their own session, watched, killed, reaped.

ani-cli (and the post step's ffmpeg) run from an argument list, stdin /dev/null, in
a session and process group of their own, so a time-out or a stop kills yt-dlp and
ffmpeg with them. A pidfd tells the worker's poll when ani-cli exits.

A worker killed with SIGKILL cannot kill what it started: its ani-cli goes on in its
own session. So each attempt writes ``<pgid> <start time>`` of every group it starts
into its private directory's lock file (``record_group``), and whoever takes that
lock later with the record still there (``kill_recorded_group``) kills the group,
if it is still ours: the leader alive with the recorded start time, or no process
of that pid left (then a group of that id can only be what remains of ours).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from shared.logfmt import kv

log = logging.getLogger(__name__)


def start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``argv`` in its own session with non-blocking stdout and stderr pipes."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
                            close_fds=True)
    for pipe in (proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
    return proc


def exit_fd(proc: subprocess.Popen) -> int | None:
    """A pidfd that becomes readable when ``proc`` exits (Linux 5.3+), so the worker's poll
    wakes at the exit instead of polling for it; None where there is none."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process's whole group (yt-dlp, ffmpeg, anything it started)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def reap(proc: subprocess.Popen, timeout: float = 2.0) -> None:
    """Kill the group and wait for its leader, so no zombie is left behind."""
    kill_group(proc)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()


def start_time(pid: int) -> str | None:
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


def record_group(lock_fd: int | None, pid: int) -> None:
    """Write "<pgid> <start time>" of a group the attempt started into its lock file."""
    if lock_fd is None:
        return
    record = f"{pid} {start_time(pid)}\n".encode()
    os.pwrite(lock_fd, record, 0)
    os.ftruncate(lock_fd, len(record))


def forget_group(lock_fd: int | None) -> None:
    """The attempt's groups have ended: erase the record, so nobody kills by it later."""
    if lock_fd is None:
        return
    try:
        os.ftruncate(lock_fd, 0)
    except OSError:  # a read-only or failing storage: the record stays, harmless
        pass


def kill_recorded_group(lock_fd: int, directory: Path) -> bool:
    """Kill the group recorded in a lock file whose lock the caller holds (so no live
    attempt owns that group), if it is still ours; erase the record. True if killed."""
    try:
        pid_text, started = os.pread(lock_fd, 128, 0).decode().split()
        pgid = int(pid_text)
    except (OSError, ValueError):
        return False
    killed = False
    now_started = start_time(pgid)
    if now_started is None or now_started == started:
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed = True
            log.warning(kv("killed ani-cli left running by a killed worker", pgid=pgid,
                           directory=directory))
        except (ProcessLookupError, PermissionError):  # gone, or not ours after all
            pass
    forget_group(lock_fd)
    return killed
