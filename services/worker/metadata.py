"""``videos/<mal_id>/metadata.json``: what the transcriber reads about an anime's episodes.

Written atomically (a temporary file renamed over it) and one writer at a time (a lock
file under ``.in_progress/.locks``, not where the transcriber looks), only after the
episode's link is in place: it never lists an episode that is not there.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from shared import layout
from shared.protocol import JobAssign


def lock_path(storage_dir: Path, anime_id: int) -> Path:
    """The lock file of an anime's landings and metadata.json (not where the transcriber looks)."""
    lock_dir = layout.in_progress_root(storage_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return lock_dir / f"metadata-{anime_id}.lock"


def write(storage_dir: Path, job: JobAssign, video: Path, duration: float | None,
          site_title: str | None = None, title_mismatch: bool = False) -> None:
    """Create or update the anime's metadata.json with this episode. Each episode records
    the site's title its file was named after (as the site sends it) and whether it
    differs from ``selected_title``."""
    path = layout.metadata_path(storage_dir, job.anime_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(lock_path(storage_dir, job.anime_id), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            data = {}
        data.update({"mal_id": job.anime_id, "title": job.anime_title,
                     "selected_index": job.selected_index, "selected_title": job.selected_title,
                     "confidence": job.confidence})
        episodes = data.setdefault("episodes", {})
        episodes[str(job.episode)] = {"file": video.name, "duration_seconds": duration,
                                      "site_title": site_title, "title_mismatch": title_mismatch}
        tmp = path.with_name(f".metadata.json.{os.getpid()}.tmp")
        # No indent: json's C encoder works only without one (a 1,000-episode series took
        # ~10 ms per landing with indent=2 in the pure-Python encoder).
        tmp.write_text(json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
    finally:
        os.close(lock_fd)
