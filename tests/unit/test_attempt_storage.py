"""A worker writes nothing to a storage that is not the one the dispatcher named
(services/worker/attempt.py: prepare, land), whatever the disk-watcher said last."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.worker.attempt import Attempt, PostResult
from shared import layout
from shared.config import load_config
from shared.protocol import JobAssign
from shared.storage import MARKER_NAME, StorageUnavailable, identify
from tests.system import render_toml


def make_attempt(tmp_path: Path, storage_id: str, create: bool = False) -> Attempt:
    config_path = tmp_path / "config.toml"
    config_path.write_text(render_toml({
        "data": {"root_dir": str(tmp_path / "data"), "storage_dir": str(tmp_path / "disk"),
                 "create_storage_dir": create},
        "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8},
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }))
    job = JobAssign(job_id=7, attempt=1, anime_id=5114, anime_title="Show", episode=3,
                    selected_index=1, selected_title="Show (site)", confidence="high",
                    lease_seconds=6.0, rate_limit_bps=0, storage_id=storage_id)
    return Attempt(job, load_config(config_path), worker_id="w01")


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def identified(tmp_path: Path) -> str:
    (tmp_path / "disk").mkdir()
    identity, _ = identify(tmp_path / "data", tmp_path / "disk")
    return identity.storage_id


def test_prepare_makes_the_private_dir_on_the_named_storage(tmp_path: Path, identified: str) -> None:
    a = make_attempt(tmp_path, identified)
    a.prepare()
    try:
        assert (tmp_path / "disk" / ".in_progress" / "job-7" / "dl").is_dir()
    finally:
        a.release()


def test_prepare_on_a_bare_mount_point_creates_nothing(tmp_path: Path, identified: str) -> None:
    disk = tmp_path / "disk"
    (disk / MARKER_NAME).unlink()  # what an empty mount point looks like: no marker
    a = make_attempt(tmp_path, identified)
    with pytest.raises(StorageUnavailable, match="has lost its marker"):
        a.prepare()
    assert tree(disk) == []


def test_prepare_never_creates_a_missing_storage_dir(tmp_path: Path, identified: str) -> None:
    disk = tmp_path / "disk"
    (disk / MARKER_NAME).unlink()
    disk.rmdir()  # the disk (and its mount point) are gone
    for create in (False, True):  # the flag does not create an identified storage anew
        with pytest.raises(StorageUnavailable, match="does not exist"):
            make_attempt(tmp_path, identified, create=create).prepare()
    assert not disk.exists()


def test_landing_on_a_storage_that_lost_its_marker_creates_nothing(tmp_path: Path,
                                                                   identified: str) -> None:
    disk = tmp_path / "disk"
    a = make_attempt(tmp_path, identified)
    a.prepare()
    staged = a.private_dir / "ready-a1.mkv"
    staged.write_bytes(b"x" * 100)
    a.post.result = PostResult(staged=staged, ext=".mkv", size=100)
    (disk / MARKER_NAME).unlink()
    target = layout.episode_path(disk, 5114, 3, ".mkv")
    with pytest.raises(StorageUnavailable):
        a.land(str(target), None, False)
    assert not (disk / "videos").exists()
    a.release()


def test_dirs_are_made_below_the_storage_only(tmp_path: Path) -> None:
    storage_dir = tmp_path / "gone"
    with pytest.raises(FileNotFoundError):
        layout.make_dirs_below(storage_dir, storage_dir / "videos" / "1" / "episodes")
    assert not storage_dir.exists()
    storage_dir.mkdir()
    layout.make_dirs_below(storage_dir, storage_dir / "videos" / "1" / "episodes")
    assert (storage_dir / "videos" / "1" / "episodes").is_dir()
    with pytest.raises(OSError, match="not below storage_dir"):
        layout.make_dirs_below(storage_dir, tmp_path / "elsewhere")
