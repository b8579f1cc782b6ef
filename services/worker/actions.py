"""The words between the worker's core and its loop: what the core asks the loop to do
(actions), and what the loop found out that the core asked about (``Exit``, ``Figures``).

Each action names its follow-up: the loop reports the outcome of those that can fail
back to the core (``Start`` -> ``started``/``start_failed``, ``StartPost`` ->
``post_done``, ``Land`` -> ``landed``/``land_failed``, a ``Send`` that found no
connection -> ``unsent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.protocol import JobAssign, Message


@dataclass(frozen=True)
class Send:
    """Send ``msg`` to the dispatcher now (never blocking)."""
    msg: Message


@dataclass(frozen=True)
class Start:
    """Lock the job's private directory and start ani-cli with ``argv`` in it."""
    job: JobAssign
    argv: list[str]


@dataclass(frozen=True)
class Kill:
    """Signal ani-cli's process group."""
    sig: int


@dataclass(frozen=True)
class StartPost:
    """Verify, remux and stage the file ``name`` (relative to the download directory)."""
    name: str


@dataclass(frozen=True)
class StopPost:
    """End the post step now: kill the tool it runs."""


@dataclass(frozen=True)
class ClearPartials:
    """Remove the download directory: what is in it cannot be resumed or is not wanted."""


@dataclass(frozen=True)
class Land:
    """Link the staged file to ``video_path`` (never replacing), then write metadata.json."""
    video_path: str
    site_title: str | None
    title_mismatch: bool


@dataclass(frozen=True)
class Discard:
    """The attempt is over: reap ani-cli if it still runs, end the post step, remove the
    private directory (or with ``keep_partials`` only the staged file), let go of the lock."""
    keep_partials: bool


@dataclass(frozen=True)
class Reap:
    """Kill ani-cli's group and wait for it (the attempt is failed for a bug)."""


@dataclass(frozen=True)
class ExitNow:
    """A second stop signal: kill ani-cli's group and exit at once."""


Action = Send | Start | Kill | StartPost | StopPost | ClearPartials | Land | Discard | Reap | ExitNow


@dataclass(frozen=True)
class Exit:
    """How ani-cli ended, read once its pipes are drained."""
    code: int  # Popen's: negative for a signal
    died: bool = False  # it printed a die() message (every real failure of the script does)
    tail: str = ""  # the last lines of its output (stderr, else stdout)
    destination: str | None = None  # where the downloader said it writes
    files: list[tuple[str, int]] = field(default_factory=list)  # under dl/: (name, size)


@dataclass(frozen=True)
class Figures:
    """A heartbeat's progress figures."""
    bytes: int = 0
    percent: float | None = None
    speed_bps: float | None = None
    eta_seconds: float | None = None
