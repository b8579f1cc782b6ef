"""The status document served to ``anime-status`` (shape documented in docs/status-json.md).

Built from a ``StatusSnapshot`` (snapshot.py) of what the dispatcher keeps in memory,
never from a query per request: the stage counts are the last pass over the queue plus
the dispatcher's own moves since (exact as each write commits), the queue detail and
the recent failures are the last pass's (``QueueCounts``, counts.py: passes on a thread,
after another program's commit, and every 5 min); workers, leases and the disk state are
live. A request costs O(workers + leases + episodes landed in the
last hour).
"""

from __future__ import annotations

import os

from shared.models import (OWN_STAGES, STAGE_CANCELLED, STAGE_DOWNLOADED, STAGE_DOWNLOADING,
                           STAGE_FAILED, STAGE_QUEUED)
from services.dispatcher.leases import Lease
from services.dispatcher.sessions import WorkerSeen
from services.dispatcher.snapshot import StatusSnapshot

#: The worker states of the document; anything else a worker reports maps onto these.
WORKER_STATES = ("idle", "paused", "downloading", "verifying", "stopping")
#: The attempt phases of a worker (services/worker/held_job.py) after ani-cli has exited.
_AFTER_DOWNLOAD = ("verifying", "awaiting_commit", "reporting")


def _job(lease: Lease, now: float) -> dict:
    job = lease.job
    return {"id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
            "episode": job.episode, "attempt": job.attempt, "phase": lease.state,
            "percent": lease.percent, "bytes": lease.bytes, "speed_bps": lease.speed_bps,
            "eta_seconds": lease.eta_seconds,
            "running_seconds": round(max(0.0, now - lease.started_at), 1)}


def _queue(s: StatusSnapshot) -> dict:
    counts, detail = s.counts, s.detail
    return {
        "queued": counts.get(STAGE_QUEUED, 0),
        "downloading": counts.get(STAGE_DOWNLOADING, 0),
        "downloaded": counts.get(STAGE_DOWNLOADED, 0),
        "failed": counts.get(STAGE_FAILED, 0),
        "cancelled": counts.get(STAGE_CANCELLED, 0),
        "waiting_for_selection": detail.get("waiting_for_selection", 0),
        "backing_off": detail.get("backing_off", 0),
        "next_retry_at": detail.get("next_retry_at"),
        "backoff_reasons": list(detail.get("backoff_reasons") or []),
        "other_stages": {k: v for k, v in counts.items() if k not in OWN_STAGES},
        "counted_at": s.counted_at if s.counted_at > 0 else None,
        # animes with jobs to do at a priority that is not normal (0), highest first
        "priorities": list(s.priorities),
        # the busiest series, as of the last pass (store.by_anime)
        "by_anime": list(detail.get("by_anime") or []),
    }


def worker_state(lease: Lease | None, seen: WorkerSeen, refusal: str | None) -> str:
    """One of WORKER_STATES: what a worker is doing, as far as the dispatcher knows."""
    phase = lease.state if lease is not None else seen.state
    if phase == "stopping":
        return "stopping"
    if lease is None:
        return "paused" if refusal is not None else "idle"
    return "verifying" if phase in _AFTER_DOWNLOAD else "downloading"


def _workers(s: StatusSnapshot) -> list[dict]:
    return [{"id": seen.worker_id, "host": seen.host,
             "state": worker_state(lease, seen, s.refusal),
             "last_seen_seconds": round(max(0.0, s.now - seen.last_seen), 1),
             "job": _job(lease, s.now) if lease else None}
            for seen, lease in s.workers]


def _disk(s: StatusSnapshot) -> dict:
    state, cfg = s.disk_state, s.disk_config
    disk = {"state": "unknown", "usage_bytes": None, "breakdown": {},
            "reserved_bytes": s.reserved_bytes, "free_bytes": None,
            "pause_threshold_bytes": cfg.pause_bytes, "resume_threshold_bytes": cfg.resume_bytes,
            "hard_limit_bytes": cfg.hard_limit_bytes, "min_free_bytes": cfg.min_free_bytes,
            "measured_at": None, "age_seconds": None, "admitting": s.refusal is None,
            "refusal": s.refusal, "reason": None}
    if state is not None:
        disk.update(state=state.state if s.disk_fresh else "stale",
                    reason=(state.reason or None) if state.state == "unavailable" else None,
                    usage_bytes=state.usage_bytes, breakdown=dict(state.breakdown),
                    free_bytes=state.free_bytes, measured_at=state.measured_at,
                    age_seconds=round(max(0.0, s.now - state.measured_at), 2))
    return disk


def _database(s: StatusSnapshot) -> dict:
    """Whether the dispatcher can write to jobs.db now (a neighbour may hold its lock)."""
    return {"busy_since": s.db_busy_since, "error": s.db_error,
            "pending_writes": s.pending_writes if s.db_busy_since is not None else 0}


def _failure_classes(s: StatusSnapshot, doc: dict) -> None:
    """Failures that know what they are (docs/failures.md): jobs waiting for a release,
    failed attempts by class, the anime whose selection wants a look, the hosts held
    after a Cloudflare block (their idle workers show as ``paused``)."""
    doc["queue"]["waiting_for_release"] = s.detail.get("waiting_for_release", 0)
    doc["queue"]["next_recheck_at"] = s.detail.get("next_recheck_at")
    doc["failure_classes"] = {"last_hour": dict(s.failure_classes),
                              "cloudflare_holds": list(s.holds)}
    doc["selection_review"] = list(s.selection_review)
    held = {hold["host"] for hold in s.holds}
    for worker in doc["workers"]:
        if worker["state"] == "idle" and worker["host"] in held:
            worker["state"] = "paused"


def build_status(s: StatusSnapshot) -> dict:
    doc = {
        "generated_at": s.now,
        "dispatcher": {"pid": os.getpid(), "dry_run": s.dry_run, "anime_id": s.anime_id,
                       "stopping": s.stopping},
        "queue": _queue(s),
        "workers": _workers(s),
        "disk": _disk(s),
        "recent_failures": list(s.failures),
        "last_hour": dict(s.last_hour),
        "title_mismatches": list(s.title_mismatches),
        "database": _database(s),
        # the operator's pause (anime-ctl pause): since ("at"), until, by whom
        "pause": dict(s.manual_pause) or {"paused": False},
        "bandwidth": dict(s.bandwidth),
    }
    _failure_classes(s, doc)
    return doc
