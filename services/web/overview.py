"""The header of the page: one overall state and why, judged from a status document.

Pure: the document (or the dispatcher's silence) in, a small dict out; the page formats
the times in the browser's own clock. The order of the checks is the order of what a
user must hear first: nothing answers, then what blocks every download (the database,
the storage), then why none starts (stopping, the operator, the disk), then what runs.
Keys the dispatcher does not send yet (an operator pause, issue 18) are read if present.
"""

from __future__ import annotations

from typing import Any

NO_DISK_STATES = ("stale", "unknown")


def overview(status: dict | None, error: str | None = None, since: float | None = None) -> dict:
    """``{"state", "label", "why", "since", "until"}``; ``state`` is one of not_answering,
    database_busy, storage_unavailable, stopping, paused_operator, paused_disk,
    hard_limit, no_disk_state, not_admitting, downloading, idle."""
    if error is not None or not isinstance(status, dict):
        return _state("not_answering", "dispatcher not answering",
                      error or "no status yet", since=since)
    for judge in (_database, _storage, _stopping, _operator, _disk, _activity):
        found = judge(status)
        if found is not None:
            return found
    raise AssertionError("_activity always answers")  # pragma: no cover


def _state(state: str, label: str, why: str, since: float | None = None,
           until: float | None = None) -> dict:
    return {"state": state, "label": label, "why": why, "since": since, "until": until}


def _section(status: dict, key: str) -> dict:
    value = status.get(key)
    return value if isinstance(value, dict) else {}


def _text(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _database(status: dict) -> dict | None:
    db = _section(status, "database")
    if db.get("busy_since") is None:
        return None
    pending = db.get("pending_writes")
    why = _text(db.get("error")) or "another program holds jobs.db"
    if isinstance(pending, int) and pending:
        why += f"; {pending} write{'s' if pending != 1 else ''} waiting"
    return _state("database_busy", "database busy", why, since=db.get("busy_since"))


def _storage(status: dict) -> dict | None:
    disk, storage = _section(status, "disk"), _section(status, "storage")
    if "unavailable" not in (disk.get("state"), storage.get("state")):
        return None
    why = _text(storage.get("reason"), disk.get("reason"), disk.get("unavailable_reason"),
                disk.get("error"), disk.get("refusal")) or "the storage directory cannot be used"
    return _state("storage_unavailable", "storage unavailable", why,
                  since=storage.get("since", disk.get("unavailable_since")))


def _stopping(status: dict) -> dict | None:
    if not _section(status, "dispatcher").get("stopping"):
        return None
    return _state("stopping", "stopping", "the dispatcher hands out no more jobs")


def _operator(status: dict) -> dict | None:
    pause = _section(status, "pause")
    refusal = _text(_section(status, "disk").get("refusal")) or ""
    if not pause.get("paused") and not refusal.startswith("paused by the operator"):
        return None
    who = _text(pause.get("by"))
    why = refusal or "no new download starts until resumed"
    if who and who not in why:
        why += f" (by {who})"
    return _state("paused_operator", "paused by the operator", why, since=pause.get("at"),
                  until=pause.get("until"))


def _disk(status: dict) -> dict | None:
    disk = _section(status, "disk")
    state, refusal = disk.get("state"), _text(disk.get("refusal"))
    if state == "hard_limit":
        return _state("hard_limit", "hard limit reached",
                      refusal or "usage reached hard_limit_gb: running downloads are aborted")
    if state == "paused":
        return _state("paused_disk", "paused by the disk",
                      refusal or "usage reached pause_threshold_gb; downloads start again "
                                  "below resume_threshold_gb")
    if state in NO_DISK_STATES:
        return _state("no_disk_state", "waiting for the disk-watcher",
                      refusal or "no recent measurement of the disk (is the disk-watcher running?)")
    if disk.get("admitting") is False and refusal:
        return _state("not_admitting", "not starting downloads", refusal)
    return None


def _activity(status: dict) -> dict:
    queue = _section(status, "queue")
    workers = [w for w in status.get("workers") or [] if isinstance(w, dict)]
    busy = sum(1 for w in workers if isinstance(w.get("job"), dict))
    queued = _count(queue, "queued")
    if busy:
        why = f"{busy} downloading, {queued} queued"
        return _state("downloading", "downloading", why + _filters(status))
    waiting, backing = _count(queue, "waiting_for_selection"), _count(queue, "backing_off")
    if not queued:
        why = "nothing queued"
    else:
        parts = [f"{waiting} wait for a selection" if waiting else "",
                 f"{backing} back off" if backing else ""]
        detail = ", ".join(p for p in parts if p)
        why = f"{queued} queued" + (f" ({detail})" if detail else "")
    if not workers:
        why += "; no worker connected"
    return _state("idle", "idle", why + _filters(status))


def _count(section: dict, key: str) -> int:
    value = section.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _filters(status: dict) -> str:
    dispatcher = _section(status, "dispatcher")
    notes = []
    if dispatcher.get("dry_run"):
        notes.append("dry run")
    if dispatcher.get("anime_id") is not None:
        notes.append(f"only MAL ID {dispatcher['anime_id']}")
    return f" ({', '.join(notes)})" if notes else ""
