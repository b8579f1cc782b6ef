"""What the dispatcher keeps of a handed-out job: the lease, and how it is to end.

A lease lives in memory as long as its row is ``downloading`` for us. When it is
to end (landed, failed, handed back) it gets an ``Ending`` and stays until the
write recording that ending has committed: a neighbour may hold the database's
lock for seconds, and the lease table must never run ahead of the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.models import STAGE_DOWNLOADING
from services.dispatcher.store import ClaimedJob

LAND, REQUEUE, FAIL = "land", "requeue", "fail"
# The owner of a lease the dispatcher ends itself (an invalid row, a file already landed).
DISPATCHER = b""


@dataclass
class Ending:
    """How a lease ends, kept on it until the write that records it has committed."""
    kind: str  # LAND | REQUEUE | FAIL
    error: str | None = None
    count_retry: bool = False
    reason: str = ""  # the worker's JobFailed.reason, or why the dispatcher ends it
    video_path: str = ""
    size: int = 0
    duration: float | None = None
    stages: tuple[str, ...] = (STAGE_DOWNLOADING,)  # where the row may be, for LAND
    settled: str | None = None  # LAND of a file found in place: why (for the log)


@dataclass
class Lease:
    job: ClaimedJob
    owner: bytes
    deadline: float
    started_at: float
    bytes: int = 0
    percent: float | None = None
    speed_bps: float | None = None
    eta_seconds: float | None = None
    state: str = "downloading"
    committed_path: str | None = None  # set once JobCommit was sent
    ending: Ending | None = None
    deadline_dirty: bool = False  # the database has an older deadline (written in batches)

    @property
    def attempt(self) -> int:
        return self.job.attempt

    @property
    def unowned(self) -> bool:
        """Re-adopted at start from a row that named no owner: the first holder takes it."""
        return self.owner.startswith(b"unknown")


def owner_worker_id(identity: bytes) -> str:
    return identity.decode("utf-8", "replace").split("/", 1)[0]


def validate(job: ClaimedJob) -> str | None:
    """The reason a claimed row cannot be downloaded, or None."""
    if job.anime_title is None or not str(job.anime_title).strip():
        return "Invalid job: anime_title is empty"
    if job.episode is None or job.episode < 1:
        return f"Invalid job: episode must be 1 or more, got {job.episode}"
    if job.selected_index is None:
        return f"No cached selection for MAL ID {job.anime_id}"
    if job.selected_index < 1:
        return (f"Invalid selection for MAL ID {job.anime_id}: selected_index must be 1 or "
                f"more (1-based), got {job.selected_index}")
    return None
