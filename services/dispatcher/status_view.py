"""The status document served to ``anime-status`` (shape documented in README.md, "Seeing what it is doing").

Built from what the dispatcher keeps in memory, never from a query per request:
the stage counts, the queue detail and the recent failures are refreshed by
``Dispatcher._refresh_counts`` (at most once a second after a change, including a
commit by another program, and every 5 min); workers, leases and the disk state are live. A request costs
O(workers + leases + episodes landed in the last hour).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from shared.models import OWN_STAGES, STAGE_DOWNLOADED, STAGE_DOWNLOADING, STAGE_FAILED, STAGE_QUEUED

if TYPE_CHECKING:
    from services.dispatcher.core import Dispatcher
    from services.dispatcher.leases import Lease
    from services.dispatcher.sessions import WorkerSeen

HOUR = 3600.0
#: The worker states of the document; anything else a worker reports maps onto these.
WORKER_STATES = ("idle", "paused", "downloading", "verifying", "stopping")
#: The attempt phases of a worker (services/worker/attempt.py) after ani-cli has exited.
_AFTER_DOWNLOAD = ("verifying", "awaiting_commit", "reporting")


def _job(lease: Lease, now: float) -> dict:
    job = lease.job
    return {"id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
            "episode": job.episode, "attempt": job.attempt, "phase": lease.state,
            "percent": lease.percent, "bytes": lease.bytes, "speed_bps": lease.speed_bps,
            "eta_seconds": lease.eta_seconds,
            "running_seconds": round(max(0.0, now - lease.started_at), 1)}


def _queue(d: Dispatcher) -> dict:
    counts, detail = d.counts, d.detail
    counted_at = getattr(d, "_counts_at", None)
    return {
        "queued": counts.get(STAGE_QUEUED, 0),
        "downloading": counts.get(STAGE_DOWNLOADING, 0),
        "downloaded": counts.get(STAGE_DOWNLOADED, 0),
        "failed": counts.get(STAGE_FAILED, 0),
        "waiting_for_selection": detail.get("waiting_for_selection", 0),
        "backing_off": detail.get("backing_off", 0),
        "next_retry_at": detail.get("next_retry_at"),
        "other_stages": {k: v for k, v in counts.items() if k not in OWN_STAGES},
        "counted_at": counted_at if counted_at and counted_at > 0 else None,
    }


def worker_state(lease: Lease | None, seen: WorkerSeen, refusal: str | None) -> str:
    """One of WORKER_STATES: what a worker is doing, as far as the dispatcher knows."""
    phase = lease.state if lease is not None else seen.state
    if phase == "stopping":
        return "stopping"
    if lease is None:
        return "paused" if refusal is not None else "idle"
    return "verifying" if phase in _AFTER_DOWNLOAD else "downloading"


def _workers(d: Dispatcher, now: float, refusal: str | None) -> list[dict]:
    # A lease whose ending waits for the database is over for its worker (which may hold
    # the next job already).
    by_owner = {lease.owner: lease for lease in d.leases.values() if lease.ending is None}
    workers = []
    for identity, seen in sorted(d.sessions.workers.items(), key=lambda kv: kv[1].worker_id):
        lease = by_owner.get(identity)
        workers.append({"id": seen.worker_id, "host": seen.host,
                        "state": worker_state(lease, seen, refusal),
                        "last_seen_seconds": round(max(0.0, now - seen.last_seen), 1),
                        "job": _job(lease, now) if lease else None})
    return workers


def _disk(d: Dispatcher, now: float, refusal: str | None) -> dict:
    state = d.admission.state
    cfg = d.config.disk
    disk = {"state": "unknown", "usage_bytes": None, "breakdown": {},
            "reserved_bytes": d.admission.reserved_bytes(), "free_bytes": None,
            "pause_threshold_bytes": cfg.pause_bytes, "resume_threshold_bytes": cfg.resume_bytes,
            "hard_limit_bytes": cfg.hard_limit_bytes, "min_free_bytes": cfg.min_free_bytes,
            "measured_at": None, "age_seconds": None, "admitting": refusal is None,
            "refusal": refusal, "reason": None}
    if state is not None:
        disk.update(state=state.state if d.admission.fresh(now) else "stale",
                    reason=(state.reason or None) if state.state == "unavailable" else None,
                    usage_bytes=state.usage_bytes, breakdown=dict(state.breakdown),
                    free_bytes=state.free_bytes, measured_at=state.measured_at,
                    age_seconds=round(max(0.0, now - state.measured_at), 2))
    return disk


def _last_hour(d: Dispatcher, now: float) -> dict:
    count = total = 0
    for landed_at, size in reversed(d.landed_recent):  # newest first: stop at the first old one
        if landed_at < now - HOUR:
            break
        count += 1
        total += size
    return {"downloaded": count, "bytes": total,
            "average_size_bytes": total // count if count else None}


def mismatch_entry(job, site_title: str | None, now: float) -> dict:
    """An episode that landed although the site's title is not the selected one
    (``[downloader] on_title_mismatch = "warn"``), for ``title_mismatches``."""
    return {"id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
            "episode": job.episode, "selected_title": job.selected_title,
            "site_title": site_title, "at": now}


def _database(d: Dispatcher) -> dict:
    """Whether the dispatcher can write to jobs.db now (a neighbour may hold its lock)."""
    return {"busy_since": d.db.busy_since, "error": d.db.error,
            "pending_writes": d.pending_writes() if d.db.busy_since is not None else 0}


def build_status(d: Dispatcher, now: float) -> dict:
    refusal = d.admission.refusal(now)
    return {
        "generated_at": now,
        "dispatcher": {"pid": os.getpid(), "dry_run": d.options.dry_run,
                       "anime_id": d.options.anime_id, "stopping": d.stopping},
        "queue": _queue(d),
        "workers": _workers(d, now, refusal),
        "disk": _disk(d, now, refusal),
        "recent_failures": list(d.failures),
        "last_hour": _last_hour(d, now),
        "title_mismatches": list(getattr(d, "title_mismatches", ())),
        "database": _database(d),
    }
