"""ani-cli's command line and environment for one job attempt, and the verdict on what
it left behind (no I/O here: services/worker/process.py runs it).

ani-cli runs from an argument list (never a shell), with its download and history
directories private to the job on the storage filesystem. ani-cli v5 exits 0 even
when its downloader failed and names the file after the site's title, so success is
judged by what is in the directory: exactly one finished, non-empty file and no
partial leftovers.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from shared.layout import PARTIAL_SUFFIXES
from services.worker import shims

NO_SPACE_MARKERS = ("No space left on device", "[Errno 28]", "ENOSPC")


def build_argv(command: str, selected_index: int, episode: int, extra_args: tuple[str, ...],
               query: str) -> list[str]:
    """The exact argument list: the query is one argv element, whatever it contains."""
    return [command, "-S", str(selected_index), "-e", str(episode), "-d", *extra_args, query]


def build_env(base: dict[str, str], download_dir: Path, hist_dir: Path,
              rate_limit_bps: int, tools: shims.Shims | None = None) -> dict[str, str]:
    """ani-cli's environment: download mode into the private directories, no terminal
    (TERM=dumb: with TERM unset every tput call prints an error), a menu program that
    exists and fails loudly (so fzf is not required), and the downloader controlled
    through the wrappers on PATH, never through ANI_CLI_PLAYER_FLAGS (ani-cli passes
    only its first word on)."""
    env = dict(base)
    env["ANI_CLI_PLAYER"] = "download"
    env["ANI_CLI_DOWNLOAD_DIR"] = str(download_dir)
    env["ANI_CLI_HIST_DIR"] = str(hist_dir)
    env["TERM"] = "dumb"
    env.pop("ANI_CLI_PLAYER_FLAGS", None)
    env.pop(shims.ENV_UNDER_YTDLP, None)
    if tools is not None:
        env["ANI_CLI_MENU"] = str(tools.menu)
        env.update(tools.tools(base.get("PATH", os.defpath)))
    if rate_limit_bps > 0:
        env[shims.ENV_RATE] = str(int(rate_limit_bps))
    else:
        env.pop(shims.ENV_RATE, None)
    return env


def is_partial(name: str) -> bool:
    return any(suffix in name for suffix in PARTIAL_SUFFIXES) or name.startswith(".")


@dataclass(frozen=True)
class Outcome:
    """What an ani-cli run produced: a file (its name relative to the download directory),
    or why not (the job's error_message)."""
    file: str | None
    error: str | None
    no_space: bool = False


def judge(exit_code: int, files: list[tuple[str, int]], output_tail: str,
          destination: str | None = None) -> Outcome:
    """Apply the rules: exit 0 AND exactly one finished non-empty file, no leftovers,
    anywhere under the download directory (``files``: every file below it, relative
    name and size; ``Fate/Zero Episode 1.mp4`` for a site title with a ``/``).
    ``destination`` is where the downloader said it would write."""
    no_space = any(marker in output_tail for marker in NO_SPACE_MARKERS)
    if exit_code != 0:
        error = f"ani-cli returned non-zero exit code: {exit_code}"
        return Outcome(None, _with_tail(error, output_tail), no_space)
    partial = [n for n, _ in files if is_partial(os.path.basename(n))]
    finished = [n for n, size in files if size > 0 and not is_partial(os.path.basename(n))]
    if len(finished) == 1 and not partial:
        return Outcome(finished[0], None)
    details = []
    if files:
        details.append(f"found: {', '.join(n for n, _ in files)}")
    if destination:
        details.append(f"the downloader's destination: {destination}")
    detail = f" ({'; '.join(details)})" if details else ""
    error = f"Downloaded video not found in expected location{detail}"
    return Outcome(None, _with_tail(error, output_tail), no_space)


def _with_tail(error: str, tail: str) -> str:
    return f"{error}\n{tail}" if tail.strip() else error


def is_no_space_error(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
