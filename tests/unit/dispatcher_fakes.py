"""Doubles for the dispatcher's rooms: the file-system effects without a disk, and a
store that only counts (for the cached counts).

``FakeEffects`` keeps what the real one would find on disk in dicts: landed episodes,
private directories and their locks, the storage's problem. It records what was
removed, so a test asserts the dispatcher's decisions, not the file system's.
"""

from __future__ import annotations

from pathlib import Path

from shared import layout

STORAGE = Path("/nonexistent/storage")  # never touched: every effect is faked


class FakeEffects:
    def __init__(self, storage_dir: Path = STORAGE) -> None:
        self.storage_dir = storage_dir
        self.files: dict[Path, int] = {}  # final path -> size
        self.private: dict[Path, int | None] = {}  # private directory -> job id
        self.locked: set[int] = set()  # job ids whose private directory an attempt holds
        self.removed: list[Path] = []
        self.listed: list[tuple[int, Path]] = []  # settled episodes listed in metadata.json
        self.problem: str | None = None
        self.polled: list[float] = []
        self.storage_id = "fake-storage-id"

    # --- what a test puts there -----------------------------------------------

    def land(self, anime_id: int, episode: int, size: int = 2048, ext: str = ".mp4") -> Path:
        path = layout.episode_path(self.storage_dir, anime_id, episode, ext)
        self.files[path] = size
        return path

    def private_dir(self, name: str) -> Path:
        path = layout.in_progress_root(self.storage_dir) / name
        self.private[path] = layout.job_id_of_dir(path)
        return path

    # --- the Effects interface ----------------------------------------------------

    def find_landed(self, anime_id: int, episode: int) -> Path | None:
        stem = layout.episode_path(self.storage_dir, anime_id, episode, "")
        for ext in layout.VIDEO_EXTENSIONS:
            if Path(f"{stem}{ext}") in self.files:
                return Path(f"{stem}{ext}")
        return None

    def size_of(self, path: Path) -> int | None:
        return self.files.get(path)

    def list_in_metadata(self, job, path: Path) -> None:
        self.listed.append((job.id, path))

    def remove_private_dir(self, job_id: int, unless_locked: bool = False) -> None:
        if unless_locked and job_id in self.locked:
            return
        path = layout.job_dir(self.storage_dir, job_id)
        self.private.pop(path, None)
        self.removed.append(path)

    def private_dirs(self) -> list[tuple[Path, int | None]] | None:
        return sorted(self.private.items()) if self.private else None

    def remove_tree(self, path: Path) -> None:
        self.private.pop(path, None)
        self.removed.append(path)

    def poll_storage(self, now: float) -> None:
        self.polled.append(now)

    def storage_problem(self) -> str | None:
        return self.problem


class CountingStore:
    """The reads of ``QueueCounts``, counted; ``external`` says another program committed."""

    def __init__(self) -> None:
        self.external = False
        self.passes = 0
        self.queued = 1
        self.next_retry_at: float | None = None
        self.without: list[int] = []
        self.moves: dict[str, int] = {}

    def changed_elsewhere(self) -> bool:
        changed, self.external = self.external, False
        return changed

    def stage_counts(self) -> dict[str, int]:
        self.passes += 1
        return {"queued": self.queued}

    def queue_detail(self, now: float) -> dict:
        return {"waiting_for_selection": 0, "backing_off": 0, "runnable": self.queued,
                "next_retry_at": self.next_retry_at}

    def recent_failures(self) -> list[dict]:
        return []

    def selection_review(self) -> list[dict]:
        return []

    def animes_without_selection(self) -> list[int]:
        return list(self.without)
