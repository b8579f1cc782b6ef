"""How an attempt ended: the verdict on ani-cli's exit and on the post step, as pure
functions of what the worker knows (no clock, no files).

ani-cli v5 exits 0 even when its downloader failed, so an exit 0 is judged by the
files it left (services/worker/download.py). ani-cli traps INT/HUP/TERM and exits 1
without a message (a real failure always prints one): such an exit, or a death by one
of those signals, is a stop from outside, judged only after a grace in which the
worker's own stop signal may still come (a shutdown signals every process at once).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.config import DownloaderConfig
from shared.protocol import (REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED, REASON_INVALID,
                             REASON_NO_SPACE, REASON_TIMEOUT, JobAssign)
from services.worker import download, titles
from services.worker.actions import Exit

if TYPE_CHECKING:
    from services.worker.post_step import PostResult

# ani-cli ended by SIGTERM/SIGINT/SIGHUP before its trap was set: as a signal (Popen's
# negative codes) or as a shell's 128+N.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_EXIT_CODES = tuple(-s for s in STOP_SIGNALS) + tuple(128 + s for s in STOP_SIGNALS)
# A stop from outside that the worker cannot confirm (no signal of its own) goes uncounted
# only while the job has had fewer uncounted attempts than this; then it counts as a
# failed attempt, so nothing that merely looks like a stop can loop for ever.
MAX_UNCOUNTED_ATTEMPTS = 3
HARD_LIMIT_ERROR = "aborted: disk usage reached hard_limit_gb"
NO_SPACE_ERROR = "Failed to write video file: No space left on device"


@dataclass(frozen=True)
class Failed:
    """The attempt ends without a file: JobFailed(reason, error)."""
    reason: str
    error: str
    clear_partials: bool = False  # what was downloaded is of no use to a retry


@dataclass(frozen=True)
class Verify:
    """The download is there: on to the post step with the file ``name``."""
    name: str  # relative to the download directory
    site: tuple[str, str] | None  # (site title, episode) read from the name
    title_mismatch: bool  # the site's title is not the selected one


class Wait:
    """A stop from outside, perhaps: judge again once the grace is over."""


WAIT = Wait()


def after_exit(exit: Exit, job: JobAssign, settings: DownloaderConfig, kill_reason: str | None,
               stopping: bool, grace_over: bool) -> Failed | Verify | Wait:
    """The verdict on ani-cli's ``exit``: ``kill_reason`` why the worker signalled it (or
    None), ``stopping`` whether the worker is stopping, ``grace_over`` whether the grace
    for a stop from outside has passed since the exit."""
    if kill_reason == REASON_TIMEOUT:
        return Failed(REASON_TIMEOUT, f"ani-cli timed out after {settings.timeout_seconds:g}s "
                                      f"and was killed\n{exit.tail}".rstrip())
    if kill_reason == REASON_HARD_LIMIT:
        return Failed(REASON_HARD_LIMIT, HARD_LIMIT_ERROR, clear_partials=True)
    if kill_reason == REASON_INTERRUPTED or stopping:
        return Failed(REASON_INTERRUPTED, "interrupted by a stop request")
    if exit.code in STOP_EXIT_CODES or (exit.code == 1 and not exit.died):
        return _stopped_from_outside(exit, job) if grace_over else WAIT
    return _judge_files(exit, job, settings.on_title_mismatch)


def _stopped_from_outside(exit: Exit, job: JobAssign) -> Failed:
    """ani-cli ended as a stop ends it, and no stop signal of the worker's came: not
    counted, up to MAX_UNCOUNTED_ATTEMPTS times per job."""
    code = exit.code
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    if code == 1:
        how += " without an error message, as its INT/HUP/TERM trap exits"
    uncounted = job.attempt - 1 - job.retry_count
    if uncounted < MAX_UNCOUNTED_ATTEMPTS:
        return Failed(REASON_INTERRUPTED, f"ani-cli was stopped from outside ({how})")
    return Failed(REASON_ERROR, f"ani-cli was stopped from outside ({how}) after {uncounted} "
                                f"attempts that counted no retry: counting this one"
                                f"\n{exit.tail}".rstrip())


def _judge_files(exit: Exit, job: JobAssign, on_mismatch: str) -> Failed | Verify:
    outcome = download.judge(exit.code, exit.files, exit.tail, exit.destination)
    if outcome.no_space:
        return Failed(REASON_NO_SPACE, NO_SPACE_ERROR, clear_partials=True)
    if outcome.file is None:
        return Failed(REASON_ERROR, outcome.error or "unknown error")
    site = titles.site_title(outcome.file)
    selected = job.selected_title
    mismatch = bool(site and selected and not titles.same_show(selected, site[0]))
    if mismatch and on_mismatch == "fail":
        return Failed(REASON_INVALID, f"Downloaded show is not the selected one: the site calls "
                                      f"it {site[0]!r}, selected_title is {selected!r} "
                                      "([downloader] on_title_mismatch = \"fail\")",
                      clear_partials=True)
    return Verify(outcome.file, site, mismatch)


def after_post(post: PostResult) -> Failed | None:
    """The verdict on the post step: None when the file is staged."""
    if post.error is None:
        return None
    reason = (REASON_NO_SPACE if post.no_space else REASON_TIMEOUT if post.timed_out
              else REASON_INTERRUPTED if post.stopped else REASON_ERROR)
    return Failed(reason, post.error, clear_partials=post.no_space)
