"""Landed files and what a job leaves behind: the rules, over the injected effects.

- An episode already at its final path settles its job as downloaded, without a
  second download (found at start, at a claim, when a lease runs out).
- A landing is believed only from the lease holder, at the path of its commit (or,
  after a restart of the dispatcher, at the job's episode path, where the file
  must be); a late landing of a lost lease is believed only if the file is there.
- A settled or failed job's private directory is removed; one settled from a file
  found in place only if no attempt still holds its lock. At start, private
  directories of jobs that are not live are stale and removed, unless the storage
  is not ours (another installation's directories are not stale).
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared import layout
from shared.logfmt import kv
from shared.models import STAGE_DOWNLOADING, STAGE_QUEUED
from shared.protocol import JobLanded
from services.dispatcher.effects import Effects
from services.dispatcher.leases import LAND, REQUEUE, Ending, Lease
from services.dispatcher.store import ClaimedJob

log = logging.getLogger(__name__)


class Settlement:
    def __init__(self, effects: Effects, storage_dir: Path) -> None:
        self.effects = effects
        self.storage_dir = storage_dir

    def landed(self, job: ClaimedJob) -> Path | None:
        """The job's episode at its final path, whatever its extension, or None."""
        return self.effects.find_landed(job.anime_id, job.episode or 0)

    def listed(self, job: ClaimedJob, path: Path) -> None:
        """A job settled from the file at ``path``: metadata.json lists the episode."""
        self.effects.list_in_metadata(job, path)

    def target(self, job: ClaimedJob, ext: str) -> Path:
        return layout.episode_path(self.storage_dir, job.anime_id, job.episode or 0, ext)

    def ending_for_file(self, path: Path, why: str) -> Ending:
        """The ending of a lease whose episode is at ``path`` already: recorded as landed;
        handed back with a retry if the file is gone again (looked for again next time)."""
        size = self.effects.size_of(path)
        if size is None:
            return Ending(REQUEUE, error=f"Lease lost: {why}", count_retry=True)
        return Ending(LAND, video_path=str(path), size=size,
                      stages=(STAGE_DOWNLOADING, STAGE_QUEUED), settled=why)

    def landing_refusal(self, lease: Lease, identity: bytes, msg: JobLanded) -> str | None:
        """Why a landing of the lease's attempt is not believed, or None."""
        if lease.owner != identity and not (lease.unowned and lease.ending is None):
            return "sender does not hold the lease"
        if lease.committed_path is not None:
            return None if msg.video_path == lease.committed_path else (
                f"not the path of its commit ({lease.committed_path})")
        landed = self.landed(lease.job)
        return None if landed is not None and str(landed) == msg.video_path else (
            "no such file at the job's episode path")

    def is_episode_file(self, anime_id: int, episode: int | None, path: str) -> bool:
        """Whether ``path`` is the episode's file at its final path, and there."""
        landed = self.effects.find_landed(anime_id, episode or 0)
        return landed is not None and str(landed) == path

    def cleanup(self, job_id: int) -> None:
        self.effects.remove_private_dir(job_id)

    def cleanup_if_free(self, job_id: int) -> None:
        self.effects.remove_private_dir(job_id, unless_locked=True)

    def private_dirs(self) -> list[tuple[Path, int | None]] | None:
        """The private directories now (listed before the live jobs are read), or None
        when there is nothing to sweep."""
        return self.effects.private_dirs()

    def sweep(self, dirs: list[tuple[Path, int | None]], live: set[int]) -> None:
        """Remove the private directories of jobs that are not live."""
        problem = self.effects.storage_problem()  # another installation's dirs are not stale
        if problem is not None:
            log.warning(kv("not sweeping private directories", why=problem))
            return
        for path, job_id in dirs:
            if job_id is None or job_id not in live:
                self.effects.remove_tree(path)
                log.info(kv("removed stale private directory", path=path, job_id=job_id))
