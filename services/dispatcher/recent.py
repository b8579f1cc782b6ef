"""What the status shows of the recent past: the landings of the last hour (time and
size; those before the dispatcher's start read from the database's finish times), the
last title mismatches, and in a dry run how many jobs would have been downloaded.
Bounded, so a long run keeps no more.
"""

from __future__ import annotations

from collections import deque

from shared import failures
from services.dispatcher.store import ClaimedJob

HOUR = 3600.0
LANDINGS_KEPT = 10_000
MISMATCHES_KEPT = 5
FAILURES_KEPT = 10_000


class Recent:
    def __init__(self) -> None:
        self.landed: deque[tuple[float, int]] = deque(maxlen=LANDINGS_KEPT)
        self.title_mismatches: deque[dict] = deque(maxlen=MISMATCHES_KEPT)
        self.dry_run_done = 0
        self.failed: deque[tuple[float, str]] = deque(maxlen=FAILURES_KEPT)  # (at, class)

    def failure(self, now: float, failure_class: str | None) -> None:
        """A failed attempt of a known class was recorded (retried, waiting or failed)."""
        if failure_class is not None:
            self.failed.append((now, failure_class))

    def failure_classes(self, now: float) -> dict[str, int]:
        """Failed attempts of the last hour by class, every class present (0 for none)."""
        counts = dict.fromkeys(failures.CLASSES, 0)
        for at, cls in reversed(self.failed):
            if at < now - HOUR:
                break
            counts[cls] = counts.get(cls, 0) + 1
        return counts

    def landing(self, now: float, size: int) -> None:
        self.landed.append((now, size))

    def landed_before(self, landings: list[tuple[float, int]]) -> None:
        """The landings the database has of the last hour (``jobs.finished_at``), oldest
        first, read at start: the last hour does not begin with the dispatcher."""
        self.landed.extend(landings)

    def title_mismatch(self, job: ClaimedJob, site_title: str | None, now: float) -> None:
        """An episode that landed although the site's title is not the selected one
        (``[downloader] on_title_mismatch = "warn"``), newest first."""
        self.title_mismatches.appendleft({
            "id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
            "episode": job.episode, "selected_title": job.selected_title,
            "site_title": site_title, "at": now})

    def last_hour(self, now: float) -> dict:
        count = total = 0
        for landed_at, size in reversed(self.landed):  # newest first: stop at the first old one
            if landed_at < now - HOUR:
                break
            count += 1
            total += size
        return {"downloaded": count, "bytes": total,
                "average_size_bytes": total // count if count else None}
