"""Why jobs are backing off, in a few lines: the errors of the jobs waiting for their
retry, grouped. Shared by the dispatcher's counts (services/dispatcher/store.py) and
``anime-status``'s read-only look at jobs.db when no dispatcher answers
(services/status_offline.py), so both word a reason the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

TOP = 3  # reasons shown; the rest are counted in the last one's "and N more"
NO_ERROR = "handed back without an error (interrupted, or a stop)"
REASON_CHARS = 160


def reason_of(error: str | None) -> str:
    """The first line of an error says what failed; with more lines, the last says why
    (``ani-cli returned non-zero exit code: 1: Episode not released!``)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return NO_ERROR
    text = lines[0] if len(lines) == 1 or lines[-1] in lines[0] else f"{lines[0]}: {lines[-1]}"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def top_reasons(rows: Iterable[tuple[str | None, int, float | None]], top: int = TOP) -> list[dict]:
    """``(error_message, jobs, soonest next_attempt_at)`` per distinct message of the jobs
    backing off (``GROUP BY error_message``) -> the most common reasons, most first:
    ``{"reason", "count", "next_retry_at"}``. Messages that differ only past what
    ``reason_of`` keeps (the lines in between) count as one reason."""
    groups: dict[str, dict] = {}
    for error, jobs, retry_at in rows:
        reason = reason_of(error)
        group = groups.setdefault(reason, {"reason": reason, "count": 0, "next_retry_at": None})
        group["count"] += int(jobs or 0)
        if retry_at is not None and (group["next_retry_at"] is None or retry_at < group["next_retry_at"]):
            group["next_retry_at"] = retry_at
    ranked = sorted(groups.values(), key=lambda g: (-g["count"], g["next_retry_at"] or 0.0))
    return ranked[:top]
