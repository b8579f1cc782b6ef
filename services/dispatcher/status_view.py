"""The status document served to ``anime-status`` (shape documented in README.md).

Built from what the dispatcher keeps in memory (counts refreshed on change and
every few seconds), never from a table scan per request.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from shared.models import STAGE_DOWNLOADED, STAGE_DOWNLOADING, STAGE_FAILED, STAGE_QUEUED, OWN_STAGES

if TYPE_CHECKING:
    from services.dispatcher.core import Dispatcher, Lease

HOUR = 3600.0


def _job(lease: Lease, now: float) -> dict:
    job = lease.job
    return {"id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
            "episode": job.episode, "attempt": job.attempt, "percent": lease.percent,
            "bytes": lease.bytes, "speed_bps": lease.speed_bps, "eta_seconds": lease.eta_seconds,
            "running_seconds": round(now - lease.started_at, 1), "state": lease.state}


def _queue(d: Dispatcher) -> dict:
    counts, detail = d.counts, d.detail
    return {
        "queued": counts.get(STAGE_QUEUED, 0),
        "downloading": counts.get(STAGE_DOWNLOADING, 0),
        "downloaded": counts.get(STAGE_DOWNLOADED, 0),
        "failed": counts.get(STAGE_FAILED, 0),
        "waiting_for_selection": detail.get("waiting_for_selection", 0),
        "backing_off": detail.get("backing_off", 0),
        "next_retry_at": detail.get("next_retry_at"),
        "other_stages": {k: v for k, v in counts.items() if k not in OWN_STAGES},
    }


def _workers(d: Dispatcher, now: float) -> list[dict]:
    by_owner = {lease.owner: lease for lease in d.leases.values()}
    workers = []
    for identity, seen in sorted(d.workers.items(), key=lambda kv: kv[1].worker_id):
        lease = by_owner.get(identity)
        state = lease.state if lease else seen.state
        if lease is None and state not in ("idle", "stopping"):
            state = "idle"
        if state == "idle" and not d.admission.fresh(now) or (
                state == "idle" and d.admission.state and d.admission.state.state != "running"):
            state = "paused"
        workers.append({"id": seen.worker_id, "host": seen.host, "state": state,
                        "last_seen_seconds": round(now - seen.last_seen, 1),
                        "job": _job(lease, now) if lease else None})
    return workers


def _disk(d: Dispatcher, now: float) -> dict:
    state = d.admission.state
    cfg = d.config.disk
    disk = {"state": "unknown", "usage_bytes": None, "breakdown": {},
            "reserved_bytes": d.admission.reserved_bytes(), "free_bytes": None,
            "pause_threshold_bytes": cfg.pause_bytes, "resume_threshold_bytes": cfg.resume_bytes,
            "hard_limit_bytes": cfg.hard_limit_bytes, "min_free_bytes": cfg.min_free_bytes,
            "measured_at": None, "age_seconds": None, "admitting": False,
            "refusal": d.admission.refusal(now)}
    if state is not None:
        disk.update(state=state.state if d.admission.fresh(now) else "stale",
                    usage_bytes=state.usage_bytes, breakdown=dict(state.breakdown),
                    free_bytes=state.free_bytes, measured_at=state.measured_at,
                    age_seconds=round(now - state.measured_at, 2))
    disk["admitting"] = disk["refusal"] is None
    return disk


def build_status(d: Dispatcher, now: float) -> dict:
    hour = [(t, size) for t, size in d.landed_recent if t >= now - HOUR]
    return {
        "generated_at": now,
        "dispatcher": {"pid": os.getpid(), "dry_run": d.options.dry_run,
                       "anime_id": d.options.anime_id, "stopping": d.stopping},
        "queue": _queue(d),
        "workers": _workers(d, now),
        "disk": _disk(d, now),
        "recent_failures": d.failures,
        "last_hour": {"downloaded": len(hour),
                      "average_size_bytes": int(sum(s for _, s in hour) / len(hour)) if hour else None},
    }
