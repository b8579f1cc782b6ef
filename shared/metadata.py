"""``videos/<mal_id>/metadata.json``: what the transcriber reads about an anime's episodes.

Written atomically (a temporary file renamed over it) and one writer at a time (a lock
file under ``.in_progress/.locks``, not where the transcriber looks), only after the
episode's link is in place: it never lists an episode that is not there. Shared: the
worker writes it as it lands an episode; the dispatcher lists an episode it settles from
a file a killed worker left linked (``ensure_listed``).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from typing import Protocol

from shared import layout

TEMPORARY_PREFIX = ".metadata.json."


class EpisodeJob(Protocol):
    """What metadata.json records of a job (a worker's JobAssign, the dispatcher's
    ClaimedJob)."""
    anime_id: int
    anime_title: str | None
    episode: int | None
    selected_index: int | None
    selected_title: str | None
    confidence: str | None


def lock_path(storage_dir: Path, anime_id: int) -> Path:
    """The lock file of an anime's landings and metadata.json (not where the transcriber looks)."""
    lock_dir = layout.in_progress_root(storage_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return lock_dir / f"metadata-{anime_id}.lock"


def write(storage_dir: Path, job: EpisodeJob, video: Path, duration: float | None,
          site_title: str | None = None, title_mismatch: bool = False) -> None:
    """Create or update the anime's metadata.json with this episode. Each episode records
    the site's title its file was named after (as the site sends it) and whether it
    differs from ``selected_title``."""
    _update(storage_dir, job, {"file": video.name, "duration_seconds": duration,
                               "site_title": site_title, "title_mismatch": title_mismatch})


def ensure_listed(storage_dir: Path, job: EpisodeJob, video: Path) -> bool:
    """List an episode found at its final path that metadata.json does not list (its
    worker was killed between the link and this file; the dispatcher settled the job
    from the file): its duration and site title are not known. An entry that is there
    is left as it is. True if it was added."""
    return _update(storage_dir, job, {"file": video.name, "duration_seconds": None,
                                      "site_title": None, "title_mismatch": False},
                   keep_existing=True)


def _update(storage_dir: Path, job: EpisodeJob, entry: dict, keep_existing: bool = False) -> bool:
    path = layout.metadata_path(storage_dir, job.anime_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(lock_path(storage_dir, job.anime_id), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        _remove_stale_temporaries(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            data = {}
        episodes = data.setdefault("episodes", {})
        if keep_existing and str(job.episode) in episodes:
            return False
        data.update({"mal_id": job.anime_id, "title": job.anime_title,
                     "selected_index": job.selected_index, "selected_title": job.selected_title,
                     "confidence": job.confidence})
        episodes[str(job.episode)] = entry
        tmp = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}.tmp")
        # No indent: json's C encoder works only without one (a 1,000-episode series took
        # ~10 ms per landing with indent=2 in the pure-Python encoder).
        tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
        return True
    finally:
        os.close(lock_fd)


def _remove_stale_temporaries(path: Path) -> None:
    """The temporary file of a writer killed before its rename (under the lock, no writer
    is between its write and its rename: any such file is a leftover)."""
    for stale in path.parent.glob(f"{TEMPORARY_PREFIX}*.tmp"):
        stale.unlink(missing_ok=True)
