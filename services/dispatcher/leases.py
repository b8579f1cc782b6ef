"""The lease table: every handed-out job, its fencing and its expiry.

A lease lives in memory as long as its row is ``downloading`` for us. When it is
to end (landed, failed, handed back) it gets an ``Ending`` and stays until the
write recording that ending has committed: a neighbour may hold the database's
lock for seconds, and the lease table must never run ahead of the database.

Fencing: only the holder's session with the lease's attempt number speaks for a
job; a lease re-adopted at start from a row that named no owner goes to the
first session that claims its attempt. Deadlines move with every heartbeat in
memory and reach the database in batches (``dirty``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shared.models import STAGE_DOWNLOADING
from services.dispatcher.store import ClaimedJob

LAND, REQUEUE, FAIL = "land", "requeue", "fail"
CANCEL = "cancel"  # an operator's cancel: the terminal stage cancelled
# The owner of a lease the dispatcher ends itself (an invalid row, a file already landed).
DISPATCHER = b""


@dataclass
class Ending:
    """How a lease ends, kept on it until the write that records it has committed."""
    kind: str  # LAND | REQUEUE | FAIL | CANCEL
    error: str | None = None
    count_retry: bool = False
    reason: str = ""  # the worker's JobFailed.reason, or why the dispatcher ends it
    video_path: str = ""
    size: int = 0
    duration: float | None = None
    stages: tuple[str, ...] = (STAGE_DOWNLOADING,)  # where the row may be, for LAND
    settled: str | None = None  # LAND of a file found in place: why (for the log)
    # An ending the dispatcher decided while the worker still runs the attempt (an
    # operator's control): once written, the worker gets JobCancel with this reason.
    stop_worker: str | None = None
    keep_partials: bool = True  # for that JobCancel: keep the partial files to resume
    hold_seconds: float = 0.0  # REQUEUE: not handed out again before this long
    source: str = ""  # who asked (an operator's control), for the log
    failure_class: str | None = None  # shared/failures.py: what kind of failure it was
    hold_until: float | None = None  # a Cloudflare block: its host's hold (holds.py)


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
    rate_bps: int = 0  # the rate limit its JobAssign gave (0: none)
    ending: Ending | None = None
    deadline_dirty: bool = False  # the database has an older deadline (written in batches)

    @property
    def attempt(self) -> int:
        return self.job.attempt

    @property
    def unowned(self) -> bool:
        """Re-adopted at start from a row that named no owner: the first holder takes it."""
        return self.owner.startswith(b"unknown")

    @property
    def running(self) -> bool:
        """Held by a worker and not ending: the worker is still at it."""
        return self.owner != DISPATCHER and self.ending is None


class LeaseTable(dict[int, Lease]):
    """Job id -> Lease, with the questions the dispatcher asks of all of them."""

    def held(self, identity: bytes, job_id: int, attempt: int) -> Lease | None:
        """The lease if ``identity`` holds ``attempt`` of ``job_id`` (an unowned lease is
        taken by its first claimant); None for anyone else, or once it is taken back."""
        lease = self.get(job_id)
        if lease is None or (lease.ending is not None and lease.ending.kind != LAND):
            return None
        if lease.attempt != attempt:
            return None
        if lease.owner != identity:
            if not lease.unowned:
                return None
            lease.owner = identity
        return lease

    def running_owners(self) -> list[bytes]:
        return [lease.owner for lease in self.values() if lease.running]

    def worker_owners(self) -> list[bytes]:
        """The owners of every lease a worker holds, ending or not."""
        return [lease.owner for lease in self.values() if lease.owner != DISPATCHER]

    def running_of(self, identity: bytes) -> list[Lease]:
        return [lease for lease in self.values() if lease.owner == identity and lease.ending is None]

    def by_owner(self) -> dict[bytes, Lease]:
        """The running lease of each worker. A lease whose ending waits for the database
        is over for its worker (which may hold the next job already)."""
        return {lease.owner: lease for lease in self.values() if lease.ending is None}

    def ending(self) -> list[Lease]:
        return [lease for lease in self.values() if lease.ending is not None]

    def expired(self, now: float) -> list[Lease]:
        return [lease for lease in self.values() if lease.deadline < now and lease.ending is None]

    def dirty(self) -> list[Lease]:
        """Leases whose deadline in the database is older than in memory."""
        return [lease for lease in self.values() if lease.deadline_dirty and lease.ending is None]

    def pending_writes(self) -> int:
        """Writes that wait for the database: lease endings and lease deadlines."""
        return sum(1 for lease in self.values() if lease.ending or lease.deadline_dirty)

    def alive(self, lease: Lease, now: float, lease_seconds: float) -> None:
        """The holder was heard: its lease runs on (written in the next batch)."""
        lease.deadline = now + lease_seconds
        lease.deadline_dirty = True

    def stalled(self, seconds: float) -> None:
        """The loop could not run for ``seconds``: no deadline runs out for that time."""
        for lease in self.values():
            lease.deadline += seconds

    def awaited_at_stop(self, connected: Callable[[bytes], bool], everyone_stops: bool) -> list[Lease]:
        """The leases a stopping dispatcher waits for: every ending not yet written, and
        the running leases of connected workers that stop too (all of them when the whole
        tree got the stop, e.g. supervisord killed; otherwise those that said so in their
        heartbeat). A worker that goes on downloading is not waited for: a restarted
        dispatcher re-adopts its lease."""
        return [lease for lease in self.values() if lease.ending is not None or (
            lease.running and (everyone_stops or lease.state == "stopping")
            and connected(lease.owner))]


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
