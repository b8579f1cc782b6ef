"""Which disk ``storage_dir`` is, and whether that disk is there now.

An external disk drops off: ``storage_dir`` then vanishes or, worse, stays behind as
an empty mount-point directory on the system disk, where downloads would fill the
system disk and land where nobody finds them once the disk is mounted again.

At first start the storage is *identified*: a marker file in ``storage_dir``
(``.anime-downloader-storage``: a random storage id and the installation that owns
it) and a record on the installation's side (``<root_dir>/storage.json``: the same
ids, the path, its device and whether it was a mount point). From then on
``problem()`` names why the storage cannot be used, or returns None:

- ``storage_dir`` is missing, or not a directory;
- it was a mount point when identified and is not one now (the disk is not mounted);
- its marker is missing, damaged, or holds another storage id;
- it is read-only (``ST_RDONLY``), or this user may not write there;
- looking at it fails (EIO: a failing disk).

How strict "the same filesystem" is: the marker's id is the proof. The device
number is recorded but not compared, since a USB disk that comes back often gets
another one (sdb1 then sdc1); what matters is the empty mount point on the
parent's filesystem, and that has no marker. "Mount point" means on another
device than its parent directory (``os.path.ismount``), so a bind mount of a
directory of the same filesystem does not count as one.

One storage, one installation: the marker names its installation, and a second
installation (another ``root_dir``, another database, colliding job ids) is refused
rather than sharing the disk's budget and private directories with the first.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.logfmt import kv

log = logging.getLogger(__name__)

MARKER_NAME = ".anime-downloader-storage"
RECORD_NAME = "storage.json"
MARKER_MAX_BYTES = 4096
CLAIM_RETRY_SECONDS = 5.0


class StorageError(Exception):
    """The storage cannot be identified or used; the message is one line for the user."""


class StorageUnavailable(OSError):
    """Raised before a write to a storage that is not there (``problem`` says why)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class Identity:
    """What the installation recorded about its storage at first start."""

    storage_id: str
    installation_id: str
    storage_dir: str
    mount_point: bool
    device: int


# --- checks ------------------------------------------------------------------------


def problem(storage_dir: Path, storage_id: str = "", mount_point: bool = False) -> str | None:
    """Why ``storage_dir`` cannot be written now, or None. With a ``storage_id`` its marker
    must hold that id; with ``mount_point`` it must still be a mount point."""
    path = str(storage_dir)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"storage_dir {path} does not exist (is the disk mounted?)"
    except OSError as exc:
        return _io_problem(path, exc)
    if not stat.S_ISDIR(st.st_mode):
        return f"storage_dir {path} is not a directory"
    try:
        if mount_point and not _is_mount_point(path, st):
            return f"storage_dir {path} is no longer a mount point (is the disk mounted?)"
        if storage_id:
            why = _marker_problem(path, storage_id)
            if why:
                return why
        vfs = os.statvfs(path)
    except OSError as exc:
        return _io_problem(path, exc)
    if vfs.f_flag & os.ST_RDONLY:
        return f"storage_dir {path} is read-only (remount it read-write)"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"storage_dir {path} is not writable by this user (uid {os.getuid()})"
    return None


def _marker_problem(path: str, storage_id: str) -> str | None:
    try:
        marker = read_marker(Path(path))
    except FileNotFoundError:
        return f"storage_dir {path} has lost its marker {MARKER_NAME} (is the disk mounted?)"
    except ValueError:
        return f"the marker {path}/{MARKER_NAME} is damaged (not written by anime-downloader)"
    if marker["storage_id"] != storage_id:
        return (f"storage_dir {path} holds another storage (id {marker['storage_id'][:8]}, "
                f"expected {storage_id[:8]}): another disk?")
    return None


def _io_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.EIO:
        return f"I/O error on storage_dir {path} (is the disk failing?)"
    if exc.errno == errno.EROFS:
        return f"storage_dir {path} is read-only (remount it read-write)"
    return f"cannot use storage_dir {path}: {exc.strerror or exc}"


def _is_mount_point(path: str, st: os.stat_result) -> bool:
    parent = os.stat(os.path.join(path, ".."))
    return st.st_dev != parent.st_dev or st.st_ino == parent.st_ino


def writable(storage_dir: Path, storage_id: str, create: bool = False) -> str | None:
    """A worker's check before it writes: ``problem()`` for the storage the dispatcher
    named. Without an id (a dispatcher that did not identify it) and with
    ``[data] create_storage_dir`` a missing ``storage_dir`` is created, as it always was."""
    if not storage_id and create and not os.path.lexists(storage_dir):
        os.makedirs(storage_dir, exist_ok=True)
    return problem(storage_dir, storage_id)


def require(storage_dir: Path, storage_id: str, create: bool = False) -> None:
    """Raise StorageUnavailable unless ``writable()``."""
    why = writable(storage_dir, storage_id, create)
    if why is not None:
        raise StorageUnavailable(why)


# --- the marker and the record -----------------------------------------------------


def read_marker(storage_dir: Path) -> dict:
    """The marker's fields; FileNotFoundError if none, ValueError if it is not ours."""
    fd = os.open(Path(storage_dir) / MARKER_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        raw = os.read(fd, MARKER_MAX_BYTES)
    finally:
        os.close(fd)
    try:
        marker = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(marker, dict) or not all(
            isinstance(marker.get(k), str) for k in ("storage_id", "installation_id", "root_dir")):
        raise ValueError("fields missing")
    return marker


def read_record(root_dir: Path) -> Identity | None:
    """The installation's record of its storage, or None (never identified, or damaged)."""
    try:
        data = json.loads((Path(root_dir) / RECORD_NAME).read_text(encoding="utf-8"))
        return Identity(**{k: data[k] for k in Identity.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(root_dir: Path, identity: Identity) -> None:
    root_dir.mkdir(parents=True, exist_ok=True)
    tmp = root_dir / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(identity), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, root_dir / RECORD_NAME)


def _write_marker(storage_dir: Path, installation_id: str, root_dir: Path) -> dict:
    """Create the marker (never replacing one); returns what is in it now."""
    marker = {"storage_id": uuid.uuid4().hex, "installation_id": installation_id,
              "root_dir": str(root_dir), "host": socket.gethostname(), "created_at": time.time(),
              "note": "anime-downloader: this disk is the storage of the installation at "
                      "root_dir; do not delete"}
    try:
        fd = os.open(storage_dir / MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return read_marker(storage_dir)  # another process of ours was quicker
    try:
        os.write(fd, (json.dumps(marker, indent=1) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return marker


def _belongs_to_us(marker: dict, installation_id: str, root_dir: Path) -> bool:
    """Our own marker, or one this root_dir on this host wrote before losing its record."""
    if marker["installation_id"] == installation_id:
        return True
    return marker["root_dir"] == str(root_dir) and marker.get("host") == socket.gethostname()


def _other_installation(storage_dir: Path, marker: dict, root_dir: Path) -> str:
    return (f"storage_dir {storage_dir} belongs to another installation (root_dir "
            f"{marker['root_dir']} on {marker.get('host') or '?'}); this one's root_dir is "
            f"{root_dir}: give each installation its own storage_dir")


# --- identification ----------------------------------------------------------------


def identify(root_dir: Path, storage_dir: Path, create: bool = False) -> tuple[Identity, bool]:
    """Identify the storage at first start, or check it is the one identified before.

    Returns the identity and whether it was identified just now. Raises StorageError
    (one line) when the storage cannot be used: missing (unless ``create``), another
    installation's, or any ``problem()``.
    """
    root_dir, storage_dir = Path(root_dir), Path(storage_dir)
    record = read_record(root_dir)
    if record is not None and record.storage_dir == str(storage_dir):
        why = problem(storage_dir, record.storage_id, record.mount_point)
        if why is not None:
            raise StorageError(why)
        return record, False
    installation_id = record.installation_id if record is not None else uuid.uuid4().hex
    if not os.path.lexists(storage_dir):
        if not create:
            raise StorageError(f"storage_dir {storage_dir} does not exist (is the disk mounted?); "
                               "mount it, or set [data] create_storage_dir = true to create it")
        os.makedirs(storage_dir, exist_ok=True)
        log.warning(kv("created storage_dir ([data] create_storage_dir = true)", path=storage_dir))
    try:
        marker = read_marker(storage_dir)
    except FileNotFoundError:
        marker = None
    except (OSError, ValueError) as exc:
        raise StorageError(problem(storage_dir) or f"cannot read {storage_dir / MARKER_NAME}: {exc}") from None
    if marker is not None and not _belongs_to_us(marker, installation_id, root_dir):
        raise StorageError(_other_installation(storage_dir, marker, root_dir))
    if marker is None:
        why = problem(storage_dir)
        if why is not None:
            raise StorageError(why)
        try:
            marker = _write_marker(storage_dir, installation_id, root_dir)
        except OSError as exc:
            raise StorageError(problem(storage_dir) or f"cannot write {storage_dir / MARKER_NAME}: "
                               f"{exc.strerror or exc}") from None
    st = os.stat(storage_dir)
    identity = Identity(storage_id=marker["storage_id"], installation_id=marker["installation_id"],
                        storage_dir=str(storage_dir),
                        mount_point=_is_mount_point(str(storage_dir), st), device=st.st_dev)
    _write_record(root_dir, identity)
    log.info(kv("storage identified", storage_dir=storage_dir, storage_id=identity.storage_id,
                mount_point=identity.mount_point, device=identity.device))
    return identity, True


def identify_or_exit(prog: str, root_dir: Path, storage_dir: Path, create: bool) -> None:
    """``identify()`` for the launcher: a storage it cannot use is one line and exit 2."""
    try:
        identity, new = identify(root_dir, storage_dir, create)
    except StorageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if new and not identity.mount_point and _same_filesystem(root_dir, storage_dir):
        print(f"{prog}: note: storage_dir {storage_dir} is on the same filesystem as root_dir "
              f"{root_dir}; if it should be an external disk, that disk is not mounted",
              file=sys.stderr)


def _same_filesystem(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


class StorageWatch:
    """The installation's view of its storage: the record (read until one exists for
    this storage_dir) and the check. ``claim`` also identifies the storage when it was
    never identified (the dispatcher does, for installations run without the launcher)."""

    def __init__(self, root_dir: Path, storage_dir: Path, create: bool = False,
                 claim: bool = False) -> None:
        self.root_dir, self.storage_dir = Path(root_dir), Path(storage_dir)
        self.create, self.claim = create, claim
        self._identity: Identity | None = None
        self._claim_at = -1e18
        self._claim_error: str | None = None

    @property
    def identity(self) -> Identity | None:
        if self._identity is None:
            record = read_record(self.root_dir)
            if record is not None and record.storage_dir == str(self.storage_dir):
                self._identity = record
        return self._identity

    @property
    def storage_id(self) -> str:
        return self.identity.storage_id if self.identity else ""

    def problem(self) -> str | None:
        identity = self.identity
        if identity is None:
            return self._unidentified()
        return problem(self.storage_dir, identity.storage_id, identity.mount_point)

    def _unidentified(self) -> str:
        why = problem(self.storage_dir)
        if why is not None:
            return why
        try:
            marker = read_marker(self.storage_dir)
        except (OSError, ValueError):
            marker = None
        if marker is not None and not _belongs_to_us(marker, "", self.root_dir):
            return _other_installation(self.storage_dir, marker, self.root_dir)
        return (f"storage_dir {self.storage_dir} is not identified yet (anime-downloader and "
                "anime-dispatcher mark it at start)")

    def poll(self, now: float) -> None:
        """With ``claim``: identify the storage if it never was (retried every few seconds)."""
        if not self.claim or self.identity is not None or now - self._claim_at < CLAIM_RETRY_SECONDS:
            return
        self._claim_at = now
        try:
            self._identity, _ = identify(self.root_dir, self.storage_dir, self.create)
            self._claim_error = None
        except StorageError as exc:
            if str(exc) != self._claim_error:
                self._claim_error = str(exc)
                log.warning(kv("cannot identify the storage", why=exc))
        except OSError as exc:  # the record on root_dir could not be written
            log.warning(kv("cannot identify the storage", why=exc))
