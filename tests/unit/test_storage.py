"""Storage identity and checks (shared/storage.py), on real directories.

Mount points need root (tmpfs); those tests skip with the reason elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from shared import storage
from shared.storage import MARKER_NAME, RECORD_NAME, StorageError, StorageWatch, identify
from tests.system import mount_tmpfs, unmount


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    root, disk = tmp_path / "data", tmp_path / "disk"
    disk.mkdir()
    return root, disk


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A real mount point: a 1 MB tmpfs at tmp_path/mnt, unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_tmpfs(mnt, "1m")
    yield mnt
    unmount(mnt)


def test_first_start_writes_a_marker_and_a_record_and_then_knows_it(dirs) -> None:
    root, disk = dirs
    identity, new = identify(root, disk)
    assert new
    marker = json.loads((disk / MARKER_NAME).read_text())
    record = json.loads((root / RECORD_NAME).read_text())
    assert marker["storage_id"] == record["storage_id"] == identity.storage_id
    assert marker["installation_id"] == record["installation_id"]
    assert marker["root_dir"] == str(root) and record["storage_dir"] == str(disk)
    again, new = identify(root, disk)
    assert again == identity and not new
    assert storage.problem(disk, identity.storage_id) is None


def test_a_missing_storage_dir_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    root, disk = tmp_path / "data", tmp_path / "usb" / "anime"
    with pytest.raises(StorageError) as exc:
        identify(root, disk)
    assert str(disk) in str(exc.value) and "create_storage_dir" in str(exc.value)
    assert not (tmp_path / "usb").exists()
    identity, new = identify(root, disk, create=True)  # the flag: the old behaviour
    assert new and (disk / MARKER_NAME).is_file()


def test_a_second_installation_is_refused_naming_both(dirs, tmp_path: Path) -> None:
    root, disk = dirs
    identify(root, disk)
    other = tmp_path / "other-data"
    with pytest.raises(StorageError) as exc:
        identify(other, disk)
    assert str(root) in str(exc.value) and str(other) in str(exc.value)
    assert not (other / RECORD_NAME).exists()
    watch = StorageWatch(other, disk)
    assert "another installation" in watch.problem()


def test_an_installation_that_lost_its_record_gets_its_storage_back(dirs) -> None:
    root, disk = dirs
    first, _ = identify(root, disk)
    (root / RECORD_NAME).unlink()
    again, new = identify(root, disk)
    assert again.storage_id == first.storage_id and again.installation_id == first.installation_id


def test_problems_name_the_path_and_what_to_check(dirs, tmp_path: Path) -> None:
    root, disk = dirs
    identity, _ = identify(root, disk)
    sid = identity.storage_id
    assert storage.problem(tmp_path / "nope", sid) == \
        f"storage_dir {tmp_path / 'nope'} does not exist (is the disk mounted?)"
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in storage.problem(tmp_path / "file", sid)
    assert storage.problem(disk, "0" * 32).startswith(f"storage_dir {disk} holds another storage")
    marker = disk / MARKER_NAME
    saved = marker.read_bytes()
    marker.write_text("{not json")
    assert "is damaged" in storage.problem(disk, sid)
    marker.unlink()
    assert storage.problem(disk, sid) == \
        f"storage_dir {disk} has lost its marker {MARKER_NAME} (is the disk mounted?)"
    assert storage.problem(disk) is None  # no id given: the marker is not asked for
    marker.write_bytes(saved)
    assert storage.problem(disk, sid) is None


def test_read_only_and_io_errors_are_problems(dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    root, disk = dirs
    identity, _ = identify(root, disk)
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        @property
        def f_flag(self):
            return self.real.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real_statvfs(p)))
    assert storage.problem(disk, identity.storage_id) == \
        f"storage_dir {disk} is read-only (remount it read-write)"
    monkeypatch.setattr(os, "statvfs", real_statvfs)

    def failing(path, *args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(os, "stat", failing)
    assert storage.problem(disk, identity.storage_id) == \
        f"I/O error on storage_dir {disk} (is the disk failing?)"


def test_a_mount_point_must_stay_one(tmpfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    identity, _ = identify(root, tmpfs)
    assert identity.mount_point
    assert StorageWatch(root, tmpfs).problem() is None
    subprocess.run(["umount", "-l", str(tmpfs)], check=True)  # the disk dropped off
    assert StorageWatch(root, tmpfs).problem() == \
        f"storage_dir {tmpfs} is no longer a mount point (is the disk mounted?)"
    assert os.listdir(tmpfs) == []  # nothing was written on the bare mount point


def test_the_watch_says_why_before_identification_and_claims_when_asked(tmp_path: Path) -> None:
    root, disk = tmp_path / "data", tmp_path / "disk"
    watch = StorageWatch(root, disk, claim=True)
    assert watch.problem() == f"storage_dir {disk} does not exist (is the disk mounted?)"
    watch.poll(100.0)
    assert not disk.exists() and watch.identity is None  # never created without the flag
    disk.mkdir()
    assert "is not identified yet" in watch.problem()
    watch.poll(101.0)
    assert watch.identity is None  # retried only every few seconds
    watch.poll(100.0 + storage.CLAIM_RETRY_SECONDS)
    assert watch.identity is not None and watch.problem() is None
    assert StorageWatch(root, disk).storage_id == watch.storage_id  # read back from the record


def test_a_worker_creates_a_missing_storage_dir_only_when_nothing_was_identified(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    assert "does not exist" in storage.writable(disk, "abc", create=True)
    assert not disk.exists()
    assert storage.writable(disk, "", create=False) is not None and not disk.exists()
    assert storage.writable(disk, "", create=True) is None and disk.is_dir()
