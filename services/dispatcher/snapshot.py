"""What a status request sees of the dispatcher, at one moment: the small type between
the dispatcher (which builds it, ``Dispatcher.snapshot(now)``) and the status document
(``status_view.build_status(snapshot)``), so that neither imports the other.

Built from memory only, no query: O(workers + leases + episodes landed in the last
hour). The lists and dicts are the dispatcher's own or fresh copies; the snapshot is
read at once and not kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import DiskConfig
from shared.protocol import DiskStateMsg
from services.dispatcher.leases import Lease
from services.dispatcher.sessions import WorkerSeen


@dataclass(frozen=True)
class StatusSnapshot:
    now: float
    dry_run: bool
    anime_id: int | None
    stopping: bool
    # the queue, as last counted (counted_at <= 0: never)
    counts: dict[str, int]
    detail: dict
    counted_at: float
    failures: list[dict]
    # each connected worker (in worker id order) and the lease it runs, if any
    workers: list[tuple[WorkerSeen, Lease | None]]
    # the disk
    disk_config: DiskConfig
    disk_state: DiskStateMsg | None
    disk_fresh: bool
    reserved_bytes: int
    refusal: str | None  # why no job starts now, or None
    # the recent past
    last_hour: dict
    title_mismatches: list[dict]
    # the database (busy_since None: writes go through)
    db_busy_since: float | None
    db_error: str | None
    pending_writes: int
    # the operator's controls (controls.py): the manual pause, priorities that are not 0,
    # the bandwidth limit now
    manual_pause: dict = field(default_factory=dict)
    priorities: list[dict] = field(default_factory=list)
    bandwidth: dict = field(default_factory=dict)
    # failures that know what they are (docs/failures.md)
    failure_classes: dict = field(default_factory=dict)  # class -> failed attempts, last hour
    selection_review: list[dict] = field(default_factory=list)  # anime to look at
    holds: list[dict] = field(default_factory=list)  # hosts held after a Cloudflare block
