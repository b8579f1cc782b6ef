"""The operator's commands, parsed once for ``anime-ctl`` and ``anime-web`` (issue 18).

Pure: a request body (the web's JSON, or what anime-ctl's arguments make of it) becomes
the fields of the command's ``control.<command>`` message (shared/protocol.py,
``CONTROL_REQUESTS``), or ``BadArgument`` naming the field and what to send. The
dispatcher checks again what only it can know (does the job exist, is it running).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from shared.protocol import CONTROL_REQUESTS, Message

# The named priorities of jobs.priority (higher first); any whole number works.
PRIORITY_NAMES = {"high": 10, "normal": 0, "low": -10}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_JOB_IDS = 1000  # one retry request (its ids are one SQL statement's parameters)


class BadArgument(ValueError):
    """A body that no command accepts; the message names the field and what to send."""


def duration_seconds(value: Any) -> float:
    """``90`` (seconds), ``"30s"``, ``"90m"``, ``"2h"``, ``"1d"`` -> seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise BadArgument(f"for: must be a duration such as 30s, 90m or 2h, got {value!r}")
    if seconds <= 0:
        raise BadArgument(f"for: must be longer than 0, got {value!r}")
    return seconds


def _int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadArgument(f"{key}: must be a positive whole number, got {value!r}")
    return value


def _only(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise BadArgument(f"{extra[0]}: unknown field (expected: {', '.join(sorted(allowed)) or 'none'})")


def _pause(body: dict) -> dict:
    _only(body, {"for", "now"})
    now = body.get("now", False)
    if not isinstance(now, bool):
        raise BadArgument(f"now: must be true or false, got {now!r}")
    duration = None if body.get("for") is None else duration_seconds(body["for"])
    return {"duration_seconds": duration, "now": now}


def _resume(body: dict) -> dict:
    _only(body, set())
    return {}


def _retry(body: dict) -> dict:
    _only(body, {"failed", "job_ids", "anime_id"})
    failed = body.get("failed", False)
    if not isinstance(failed, bool):
        raise BadArgument(f"failed: must be true or false, got {failed!r}")
    job_ids = body.get("job_ids", [])
    if not isinstance(job_ids, list) or not all(
            isinstance(j, int) and not isinstance(j, bool) and j >= 1 for j in job_ids):
        raise BadArgument(f"job_ids: must be a list of job ids, got {job_ids!r}")
    if len(job_ids) > MAX_JOB_IDS:
        raise BadArgument(f"job_ids: at most {MAX_JOB_IDS} at once, got {len(job_ids)}")
    anime_id = _int(body, "anime_id")
    if sum((failed, bool(job_ids), anime_id is not None)) != 1:
        raise BadArgument("give exactly one of failed: true, job_ids or anime_id")
    return {"failed": failed, "job_ids": job_ids, "anime_id": anime_id}


def _cancel(body: dict) -> dict:
    _only(body, {"job_id"})
    job_id = _int(body, "job_id")
    if job_id is None:
        raise BadArgument("job_id: missing (the job to cancel)")
    return {"job_id": job_id}


def _priority(body: dict) -> dict:
    _only(body, {"anime_id", "job_id", "priority"})
    anime_id, job_id = _int(body, "anime_id"), _int(body, "job_id")
    if (anime_id is None) == (job_id is None):
        raise BadArgument("give exactly one of anime_id or job_id")
    value = body.get("priority")
    if isinstance(value, str) and value in PRIORITY_NAMES:
        priority = PRIORITY_NAMES[value]
    elif isinstance(value, int) and not isinstance(value, bool):
        priority = value
    else:
        raise BadArgument(f"priority: must be high, normal, low or a whole number, got {value!r}")
    return {"anime_id": anime_id, "job_id": job_id, "priority": priority}


def _bandwidth(body: dict) -> dict:
    _only(body, {"mbps"})
    mbps = body.get("mbps")
    if isinstance(mbps, bool) or not isinstance(mbps, (int, float)) or mbps < 0:
        raise BadArgument(f"mbps: must be a number of megabits per second, 0 for unlimited, "
                          f"got {mbps!r}")
    return {"mbps": float(mbps)}


COMMANDS: dict[str, Callable[[dict], dict]] = {
    "pause": _pause, "resume": _resume, "retry": _retry, "cancel": _cancel,
    "priority": _priority, "bandwidth": _bandwidth,
}


def parse(command: str, body: Any) -> dict:
    """The fields of ``control.<command>`` (without ``source``) for a request body."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadArgument("the body must be a JSON object")
    return COMMANDS[command](body)


def request(command: str, fields: dict, source: str) -> Message:
    """The ``control.<command>`` message of parsed ``fields``, asked by ``source``."""
    return CONTROL_REQUESTS[command](source=source, **fields)


def priority_name(priority: int) -> str:
    """``high``/``normal``/``low`` for the named values, else the number."""
    for name, value in PRIORITY_NAMES.items():
        if value == priority:
            return name
    return str(priority)
