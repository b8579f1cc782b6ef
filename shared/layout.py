"""Where things live on the storage filesystem (the contract with the transcriber).

``<storage_dir>/videos/<mal_id>/episodes/ep001.<ext>`` are finished episodes;
nothing else is ever written there but by an atomic rename. Downloads run in
``<storage_dir>/.in_progress/job-<id>/``, on the same filesystem so that the
final move is a rename, and outside ``videos/`` so the transcriber never sees a
half-written file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

IN_PROGRESS_DIRNAME = ".in_progress"
VIDEO_EXTENSIONS = (".mkv", ".mp4", ".webm", ".ts", ".m4v", ".avi", ".mov")
# Leftovers of an unfinished download: yt-dlp, aria2c, and our own staging.
PARTIAL_SUFFIXES = (".part", ".ytdl", ".aria2", ".tmp", ".temp")


def episodes_dir(storage_dir: Path, mal_id: int) -> Path:
    return storage_dir / "videos" / str(mal_id) / "episodes"


def episode_stem(episode: int) -> str:
    return f"ep{episode:03d}"


def episode_path(storage_dir: Path, mal_id: int, episode: int, ext: str) -> Path:
    return episodes_dir(storage_dir, mal_id) / f"{episode_stem(episode)}{ext}"


def metadata_path(storage_dir: Path, mal_id: int) -> Path:
    return storage_dir / "videos" / str(mal_id) / "metadata.json"


def in_progress_root(storage_dir: Path) -> Path:
    return storage_dir / IN_PROGRESS_DIRNAME


def job_dir(storage_dir: Path, job_id: int) -> Path:
    return in_progress_root(storage_dir) / f"job-{job_id}"


def make_dirs_below(storage_dir: Path, directory: Path) -> None:
    """``mkdir -p`` of ``directory``, but only of the part below ``storage_dir``: a storage
    that has gone (an unmounted disk) raises FileNotFoundError instead of being made
    anew on the system disk."""
    storage_dir, directory = Path(storage_dir), Path(directory)
    try:
        parts = directory.relative_to(storage_dir).parts
    except ValueError:
        raise OSError(f"{directory} is not below storage_dir {storage_dir} (storage_dir must "
                      "be the same path on every machine)") from None
    path = storage_dir
    for part in parts:
        path = path / part
        try:
            os.mkdir(path)
        except FileExistsError:
            pass


def job_id_of_dir(path: Path) -> int | None:
    name = path.name
    if name.startswith("job-") and name[4:].isdigit():
        return int(name[4:])
    return None


def find_landed(storage_dir: Path, mal_id: int, episode: int) -> Path | None:
    """The finished file of an episode, whatever its extension, or None. (Plain os.stat on
    strings: the dispatcher asks twice per job, 7 extensions each; pathlib cost 4x more.)"""
    base = os.path.join(storage_dir, "videos", str(mal_id), "episodes", episode_stem(episode))
    for ext in VIDEO_EXTENSIONS:
        try:
            if stat.S_ISREG(os.stat(base + ext).st_mode):
                return Path(base + ext)
        except OSError:
            continue
    return None
