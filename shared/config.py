"""Load and validate config.toml into frozen msgspec Structs.

The sections of the file are declared once, as typed Structs whose field names are
the keys (``DiskConfig`` is ``[disk_management]``, ``DownloaderConfig`` is
``[downloader]``...), with the allowed values in the types (``Positive``, ``Count``,
``Literal``) and ``forbid_unknown_fields``: msgspec checks the whole parsed file in
one ``msgspec.convert``. Its error becomes one line that names the file and the key
(shared/config_errors.py), such as
``config.toml: [disk_management] pause_threshold_gb: must be below hard_limit_gb (300)``.
Checks across keys (thresholds, lease and heartbeat, endpoints) follow in
``parse_config``.

Relative paths are resolved against the directory of the config file, so the
system behaves the same whatever supervisord's working directory is.
GB means 10**9 bytes, MB 10**6.
"""

from __future__ import annotations

import ipaddress
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from shared.config_errors import ConfigError, explain, where

GB = 10**9
MB = 10**6
IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux, one for the NUL

# The allowed values, as types: msgspec checks them, config_errors words them.
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
Text = Annotated[str, msgspec.Meta(pattern=r"\S")]  # not empty, not only blanks


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A table of config.toml: an unknown key in it is an error, not ignored."""


# --- the file's sections (also what the services read) ------------------------

class CleanupConfig(Section):
    """[disk_management.cleanup]: read by the transcriber, kept here so it is checked."""

    delete_video_after_transcription: bool = True
    delete_audio_after_transcription: bool = True


class DiskConfig(Section):
    """[disk_management]"""

    hard_limit_gb: Positive
    pause_threshold_gb: Positive
    resume_threshold_gb: NonNegative
    check_interval_seconds: Positive = 30.0
    cache_duration_seconds: NonNegative = 5.0
    max_concurrent_downloads: Count = 5
    min_free_gb: NonNegative = 5.0
    expected_episode_size_mb: Positive = 500.0
    cleanup: CleanupConfig = msgspec.field(default_factory=CleanupConfig)

    @property
    def hard_limit_bytes(self) -> int:
        return int(self.hard_limit_gb * GB)

    @property
    def pause_bytes(self) -> int:
        return int(self.pause_threshold_gb * GB)

    @property
    def resume_bytes(self) -> int:
        return int(self.resume_threshold_gb * GB)

    @property
    def min_free_bytes(self) -> int:
        return int(self.min_free_gb * GB)

    @property
    def expected_episode_bytes(self) -> int:
        return int(self.expected_episode_size_mb * MB)


class DownloaderConfig(Section):
    """[downloader]"""

    command: Text = "ani-cli"
    extra_args: tuple[str, ...] = ()
    timeout_seconds: Positive = 3600.0
    retry_backoff_seconds: NonNegative = 60.0
    retry_backoff_max_seconds: NonNegative = 3600.0
    # "mkv": remux losslessly into Matroska; "keep": as downloaded
    container: Literal["mkv", "keep"] = "mkv"
    total_bandwidth_mbps: NonNegative = 0.0  # 0 = unlimited; shared across active workers
    verify: bool = True  # check with ffprobe/ffmpeg that the file is a playable video
    # the site's title is not selected_title: warn, fail, ignore
    on_title_mismatch: Literal["warn", "fail", "ignore"] = "warn"
    # Checking (and remuxing) a file may take this long per GB, never less: a time-out is
    # no proof of a bad file (a slow NFS mount), so it is a retry that keeps the file.
    verify_timeout_seconds: Positive = 120.0
    # Failures that know what they are (docs/failures.md). An episode the site does not
    # list yet is looked for again this often, without using up a retry (float hours:
    # 0.5 is 30 minutes) ...
    recheck_unreleased_hours: Positive = 6.0
    # ... for at most this many days after its first "not released"; then it fails.
    max_unreleased_days: NonNegative = 30.0
    # A "Blocked by cloudflare." holds back new starts on that worker's host this long
    # (doubling while blocks repeat, at most 8 times as long); the job waits as long.
    cloudflare_pause_seconds: NonNegative = 900.0


class QueueConfig(Section):
    """[queue]"""

    lease_seconds: Positive = 30.0  # a worker silent this long loses its job
    heartbeat_seconds: Positive = 2.0  # how often workers report progress


class _Data(Section):
    root_dir: Text
    storage_dir: Text
    # A missing storage_dir is created at start (the old behaviour); by default it is
    # refused: it is most likely the mount point of a disk that is not mounted.
    create_storage_dir: bool = False


class _CurveFile(Section):
    server_secret_key: Text | None = None
    authorized_keys_dir: Text | None = None
    client_secret_key: Text | None = None
    server_public_key: Text | None = None


DEFAULT_ENDPOINTS = {
    "dispatcher": "dispatcher.sock",
    "status": "status.sock",
    "disk_state": "disk-state.sock",
    "disk_control": "disk-control.sock",
    "control": "control.sock",
}


class _ZmqFile(Section):
    dispatcher: Text | None = None  # None: ipc:// in run/ (DEFAULT_ENDPOINTS)
    status: Text | None = None
    disk_state: Text | None = None
    disk_control: Text | None = None
    control: Text | None = None  # operator controls (anime-ctl, anime-web)
    curve: _CurveFile = msgspec.field(default_factory=_CurveFile)


class _WebFile(Section):
    """[web] as written; resolved into WebConfig by ``_web``."""

    listen: Text = "127.0.0.1:8766"
    password: Text | None = None
    api_key: Text | None = None


class _File(Section):
    """config.toml as written, every table checked."""

    data: _Data
    disk_management: DiskConfig
    downloader: DownloaderConfig = msgspec.field(default_factory=DownloaderConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    zmq: _ZmqFile = msgspec.field(default_factory=_ZmqFile)
    web: _WebFile = msgspec.field(default_factory=_WebFile)


# --- what the file resolves to --------------------------------------------------

class CurveConfig(msgspec.Struct, frozen=True):
    """ZeroMQ CURVE keys; required for any endpoint reachable from another host."""

    server_secret_key: Path | None = None  # dispatcher / disk-watcher side (.key_secret)
    authorized_keys_dir: Path | None = None  # directory of client .key files
    client_secret_key: Path | None = None  # worker / probe side
    server_public_key: Path | None = None  # the server's .key the clients trust

    @property
    def server_enabled(self) -> bool:
        return self.server_secret_key is not None

    @property
    def client_enabled(self) -> bool:
        return self.client_secret_key is not None


class ZmqConfig(msgspec.Struct, frozen=True):
    dispatcher: str  # ROUTER, bound by the dispatcher; workers connect
    status: str  # ROUTER, bound by the dispatcher; anime-status connects
    disk_state: str  # XPUB, bound by the disk-watcher
    disk_control: str  # PULL, bound by the disk-watcher (re-measure requests)
    control: str  # ROUTER, bound by the dispatcher; anime-ctl and anime-web connect
    curve: CurveConfig = msgspec.field(default_factory=CurveConfig)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebConfig(msgspec.Struct, frozen=True):
    """[web]: where anime-web listens and what it asks of a client (README, "The web page")."""

    host: str = "127.0.0.1"
    port: int = 8766  # 0: any free port (anime-web logs the one it got)
    password: str | None = None  # HTTP basic auth, any user name
    api_key: str | None = None  # X-Api-Key header, for scripts

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def local(self) -> bool:
        """Only this machine can connect (a loopback address)."""
        return is_loopback_host(self.host)


class Config(msgspec.Struct, frozen=True):
    path: Path
    root_dir: Path
    storage_dir: Path
    disk: DiskConfig
    downloader: DownloaderConfig
    queue: QueueConfig
    zmq: ZmqConfig
    create_storage_dir: bool = False  # [data] create_storage_dir
    web: WebConfig = msgspec.field(default_factory=WebConfig)

    @property
    def db_path(self) -> Path:
        return self.root_dir / "jobs.db"

    @property
    def run_dir(self) -> Path:
        return self.root_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.root_dir / "logs"


class _Reader:
    """The file as checked by msgspec; ``fail`` words an error about one of its keys."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.raw = raw
        try:
            self.file = msgspec.convert(raw, _File)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {explain(str(exc), raw, _File)}") from None

    def fail(self, section: str, key: str | None, text: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where(section, key)}: {text}")

    def section(self, name: str) -> dict[str, Any]:
        """One table's values by key, defaults filled in ("zmq.curve" for a subtable)."""
        node: Any = self.file
        for part in name.split("."):
            node = getattr(node, part)
        return msgspec.structs.asdict(node)


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _endpoint(reader: _Reader, base: Path, run_dir: Path, key: str, value: str | None) -> str:
    if value is None:
        value = f"ipc://{run_dir / DEFAULT_ENDPOINTS[key]}"
    if not value.startswith(("ipc://", "tcp://")):
        raise reader.fail("zmq", key, f"must start with ipc:// or tcp://, got {value!r}")
    if value.startswith("ipc://"):
        path = _resolve(base, value[len("ipc://"):])
        value = f"ipc://{path}"
        if len(str(path).encode()) > IPC_PATH_MAX:
            raise reader.fail(
                "zmq", key,
                f"ipc path {path} is {len(str(path).encode())} bytes, longer than the "
                f"{IPC_PATH_MAX} the system allows; use a shorter root_dir or a "
                "tcp://127.0.0.1:PORT endpoint",
            )
    return value


def _check_across_keys(reader: _Reader) -> None:
    disk, queue = reader.file.disk_management, reader.file.queue
    hard, pause, resume = disk.hard_limit_gb, disk.pause_threshold_gb, disk.resume_threshold_gb
    if pause >= hard:
        raise reader.fail("disk_management", "pause_threshold_gb",
                          f"must be below hard_limit_gb ({hard:g})")
    if resume >= pause:
        raise reader.fail("disk_management", "resume_threshold_gb",
                          f"must be below pause_threshold_gb ({pause:g})")
    if queue.heartbeat_seconds * 2 > queue.lease_seconds:
        raise reader.fail("queue", "heartbeat_seconds",
                          f"must be at most half of lease_seconds ({queue.lease_seconds:g})")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8766`` for IPv6) -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:8766, got {value!r}")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT with a port from 0 to 65535, e.g. "
                         f"127.0.0.1:8766, got {value!r}")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"the host must be an IP address (127.0.0.1, 0.0.0.0, [::1]...) "
                             f"or localhost, got {host!r}") from None
    return host, int(port)


API_KEY_MIN = 16


def _web(reader: _Reader) -> WebConfig:
    """[web]; an address other hosts can reach needs a password or an API key."""
    raw = reader.file.web
    try:
        host, port = parse_listen(raw.listen)
    except ValueError as exc:
        raise reader.fail("web", "listen", str(exc)) from None
    key = raw.api_key
    if key is not None and len(key) < API_KEY_MIN:
        raise reader.fail("web", "api_key", f"must be at least {API_KEY_MIN} characters, got "
                          f"{len(key)}; e.g. the output of: python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(24))'")
    web = WebConfig(host=host, port=port, password=raw.password, api_key=key)
    if not web.local and web.password is None and key is None:
        raise reader.fail("web", "listen", f"{raw.listen} is reachable from other hosts; "
                          "set [web] password or api_key, or listen on 127.0.0.1:8766")
    return web


def parse_config(path: Path, raw: dict[str, Any]) -> Config:
    """``raw`` as tomllib parses it; raises ConfigError with a one-line message."""
    reader = _Reader(path, raw)
    _check_across_keys(reader)
    file, base = reader.file, path.resolve().parent
    root = _resolve(base, file.data.root_dir)
    assert root is not None
    run_dir = root / "run"
    endpoints = {k: _endpoint(reader, base, run_dir, k, v)
                 for k, v in reader.section("zmq").items() if k != "curve"}
    curve = CurveConfig(**{k: _resolve(base, v) for k, v in reader.section("zmq.curve").items()})
    return Config(
        path=path,
        root_dir=root,
        storage_dir=_resolve(base, file.data.storage_dir),  # type: ignore[arg-type]
        disk=file.disk_management,
        downloader=file.downloader,
        queue=file.queue,
        zmq=ZmqConfig(**endpoints, curve=curve),
        create_storage_dir=file.data.create_storage_dir,
        web=_web(reader),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError with a one-line message."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(path, raw)


def config_or_exit(prog: str, path: str | Path) -> Config:
    """load_config for the command-line tools: a bad config is one line and exit 2."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
