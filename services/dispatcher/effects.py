"""What the dispatcher does on the storage filesystem, behind one object it is given.

The dispatcher's rooms decide; this object does the file-system work: look for an
episode's final file and take its size, list an episode it settles from its file in
metadata.json (its worker stopped between the link and that), remove a private directory (only one no
attempt holds the lock of, where asked), list the private directories for the
sweep at start, and look after the storage (identify it if nobody has, say what is
wrong with it). Like the store, it is injected: the unit tests give the dispatcher a
fake (tests/unit/dispatcher_fakes.py), so its decisions are tested without a disk.
In a dry run nothing is removed and the storage is not identified.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Protocol

from shared import layout, metadata
from shared.config import Config
from shared.logfmt import kv
from shared.storage import StorageWatch
from services.dispatcher.store import ClaimedJob

log = logging.getLogger(__name__)


class Effects(Protocol):
    """The interface the dispatcher uses (FileEffects here, a fake in the tests)."""

    @property
    def storage_id(self) -> str: ...

    def find_landed(self, anime_id: int, episode: int) -> Path | None: ...

    def size_of(self, path: Path) -> int | None: ...

    def list_in_metadata(self, job: ClaimedJob, path: Path) -> None: ...

    def remove_private_dir(self, job_id: int, unless_locked: bool = False) -> None: ...

    def private_dirs(self) -> list[tuple[Path, int | None]] | None: ...

    def remove_tree(self, path: Path) -> None: ...

    def poll_storage(self, now: float) -> None: ...

    def storage_problem(self) -> str | None: ...


class FileEffects:
    """The real file system under ``storage_dir``."""

    def __init__(self, config: Config, dry_run: bool = False) -> None:
        self.storage_dir = config.storage_dir
        self.writes = not dry_run
        self.storage = StorageWatch(config.root_dir, config.storage_dir,
                                    create=config.create_storage_dir, claim=not dry_run)

    @property
    def storage_id(self) -> str:
        return self.storage.storage_id

    def find_landed(self, anime_id: int, episode: int) -> Path | None:
        return layout.find_landed(self.storage_dir, anime_id, episode)

    def size_of(self, path: Path) -> int | None:
        """The file's size; None when it is gone (a transcriber moved it)."""
        try:
            return path.stat().st_size
        except OSError:
            return None

    def list_in_metadata(self, job: ClaimedJob, path: Path) -> None:
        """An episode settled from its file: metadata.json lists it (shared/metadata.py)."""
        if not self.writes:
            return
        try:
            if metadata.ensure_listed(self.storage_dir, job, path):
                log.warning(kv("listed a settled episode in metadata.json (its worker "
                               "stopped before it did)", job_id=job.id, anime_id=job.anime_id,
                               episode=job.episode, path=path))
        except OSError as exc:
            log.error(kv("cannot list a settled episode in metadata.json", job_id=job.id,
                         anime_id=job.anime_id, episode=job.episode, error=exc))

    def remove_private_dir(self, job_id: int, unless_locked: bool = False) -> None:
        """Remove a job's private directory; ``unless_locked``: only if no attempt holds its
        lock (that worker gets JobCancel or JobAck and removes it itself)."""
        path = layout.job_dir(self.storage_dir, job_id)
        if not self.writes or (unless_locked and self._locked(path)):
            return
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _locked(path: Path) -> bool:
        """Whether an attempt holds the directory's lock (a directory that is not there,
        or whose lock cannot be opened, counts as locked: nothing to remove)."""
        if not path.is_dir():
            return True
        try:
            fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def private_dirs(self) -> list[tuple[Path, int | None]] | None:
        """The private directories with their job ids (None for a name that is not a
        job's); None in a dry run or when there is no ``.in_progress``."""
        root = layout.in_progress_root(self.storage_dir)
        if not self.writes or not root.is_dir():
            return None
        return [(path, layout.job_id_of_dir(path)) for path in root.iterdir()
                if not path.name.startswith(".")]  # .locks

    def remove_tree(self, path: Path) -> None:
        if self.writes:
            shutil.rmtree(path, ignore_errors=True)

    def poll_storage(self, now: float) -> None:
        self.storage.poll(now)

    def storage_problem(self) -> str | None:
        return self.storage.problem()
