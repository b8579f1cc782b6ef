"""Running ani-cli for one job attempt, and judging what it left behind.

ani-cli runs from an argument list (never a shell), stdin /dev/null, in its own
process group (so a time-out or a stop kills yt-dlp/ffmpeg with it), with its
download and history directories private to the job on the storage filesystem.
ani-cli v5 exits 0 even when its downloader failed and names the file after the
site's title, so success is judged by what is in the directory: exactly one
finished, non-empty file and no partial leftovers.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shared.layout import PARTIAL_SUFFIXES

NO_SPACE_MARKERS = ("No space left on device", "[Errno 28]", "ENOSPC")
KILL_GRACE_SECONDS = 3.0


def build_argv(command: str, selected_index: int, episode: int, extra_args: tuple[str, ...],
               title: str) -> list[str]:
    """The exact argument list: the title is one argv element, whatever it contains."""
    return [command, "-S", str(selected_index), "-e", str(episode), "-d", *extra_args, title]


def build_env(base: dict[str, str], download_dir: Path, hist_dir: Path,
              rate_limit_bps: int) -> dict[str, str]:
    env = dict(base)
    env["ANI_CLI_PLAYER"] = "download"
    env["ANI_CLI_DOWNLOAD_DIR"] = str(download_dir)
    env["ANI_CLI_HIST_DIR"] = str(hist_dir)
    if rate_limit_bps > 0:
        # ani-cli expands the variable unquoted: plain words, split on white space.
        # yt-dlp applies --limit-rate to each fragment download, and ani-cli asks for
        # 16 at once (-N 16): a later -N 1 makes the limit the total.
        flags = env.get("ANI_CLI_PLAYER_FLAGS", "").split()
        flags += ["-N", "1", "--limit-rate", str(rate_limit_bps)]
        env["ANI_CLI_PLAYER_FLAGS"] = " ".join(flags)
    return env


def start(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
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
    """Signal ani-cli's whole process group (yt-dlp, ffmpeg, anything it started)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def bytes_in(directory: Path) -> int:
    """Bytes written so far in a download directory (the fallback progress)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        return 0
    return total


def is_partial(name: str) -> bool:
    return any(suffix in name for suffix in PARTIAL_SUFFIXES) or name.startswith(".")


@dataclass(frozen=True)
class Outcome:
    """What an ani-cli run produced: a file, or why not (the job's error_message)."""
    file: Path | None
    error: str | None
    no_space: bool = False


def judge(exit_code: int, download_dir: Path, output_tail: str) -> Outcome:
    """Apply the rules: exit 0 AND exactly one finished non-empty file, no leftovers."""
    no_space = any(marker in output_tail for marker in NO_SPACE_MARKERS)
    if exit_code != 0:
        error = f"ani-cli returned non-zero exit code: {exit_code}"
        return Outcome(None, _with_tail(error, output_tail), no_space)
    try:
        names = sorted(p.name for p in download_dir.iterdir() if p.is_file())
    except OSError:
        names = []
    partial = [n for n in names if is_partial(n)]
    finished = [n for n in names if not is_partial(n) and (download_dir / n).stat().st_size > 0]
    if len(finished) == 1 and not partial:
        return Outcome(download_dir / finished[0], None)
    detail = f" (found: {', '.join(names)})" if names else ""
    error = f"Downloaded video not found in expected location{detail}"
    return Outcome(None, _with_tail(error, output_tail), no_space)


def _with_tail(error: str, tail: str) -> str:
    return f"{error}\n{tail}" if tail.strip() else error


def is_no_space_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
