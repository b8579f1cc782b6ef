"""Load and validate config.toml into frozen records (shared/record.py).

Every check names the file and the key, so a user sees one line such as
``config.toml: [disk_management] pause_threshold_gb: must be below hard_limit_gb (300)``.
Relative paths are resolved against the directory of the config file, so the
system behaves the same whatever supervisord's working directory is.
GB means 10**9 bytes, MB 10**6.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Callable

from shared.record import Factory, Record

GB = 10**9
MB = 10**6
IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux, one for the NUL


class ConfigError(Exception):
    """A config file that cannot be used; the message is the whole user-facing line."""


class CurveConfig(Record):
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


class ZmqConfig(Record):
    dispatcher: str  # ROUTER, bound by the dispatcher; workers connect
    status: str  # ROUTER, bound by the dispatcher; anime-status connects
    disk_state: str  # XPUB, bound by the disk-watcher
    disk_control: str  # PULL, bound by the disk-watcher (re-measure requests)
    curve: CurveConfig = Factory(CurveConfig)


class DiskConfig(Record):
    hard_limit_gb: float
    pause_threshold_gb: float
    resume_threshold_gb: float
    check_interval_seconds: float = 30.0
    cache_duration_seconds: float = 5.0
    max_concurrent_downloads: int = 5
    min_free_gb: float = 5.0
    expected_episode_size_mb: float = 500.0
    delete_video_after_transcription: bool = True
    delete_audio_after_transcription: bool = True

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


class DownloaderConfig(Record):
    command: str = "ani-cli"
    extra_args: tuple[str, ...] = ()
    timeout_seconds: float = 3600.0
    retry_backoff_seconds: float = 60.0
    retry_backoff_max_seconds: float = 3600.0
    container: str = "mkv"  # "mkv": remux losslessly into Matroska; "keep": as downloaded
    total_bandwidth_mbps: float = 0.0  # 0 = unlimited; shared across active workers
    verify: bool = True  # check with ffprobe/ffmpeg that the file is a playable video
    on_title_mismatch: str = "warn"  # the site's title is not selected_title: warn, fail, ignore
    # Checking (and remuxing) a file may take this long per GB, never less: a time-out is
    # no proof of a bad file (a slow NFS mount), so it is a retry that keeps the file.
    verify_timeout_seconds: float = 120.0


class QueueConfig(Record):
    lease_seconds: float = 30.0  # a worker silent this long loses its job
    heartbeat_seconds: float = 2.0  # how often workers report progress


class WebConfig(Record):
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


class Config(Record):
    path: Path
    root_dir: Path
    storage_dir: Path
    disk: DiskConfig
    downloader: DownloaderConfig
    queue: QueueConfig
    zmq: ZmqConfig
    # A missing storage_dir is created at start (the old behaviour); by default it is
    # refused: it is most likely the mount point of a disk that is not mounted.
    create_storage_dir: bool = False
    web: WebConfig = Factory(WebConfig)

    @property
    def db_path(self) -> Path:
        return self.root_dir / "jobs.db"

    @property
    def run_dir(self) -> Path:
        return self.root_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.root_dir / "logs"


# --- schema -----------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns an error text or None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any) -> str | None:
    if not _number(value):
        return f"must be a number, got {value!r}"
    return None if value > 0 else f"must be greater than 0, got {value!r}"


def _non_negative(value: Any) -> str | None:
    if not _number(value):
        return f"must be a number, got {value!r}"
    return None if value >= 0 else f"must be 0 or more, got {value!r}"


def _positive_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be a whole number, got {value!r}"
    return None if value >= 1 else f"must be at least 1, got {value!r}"


def _string(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    return None if value.strip() else "must not be empty"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _string_list(value: Any) -> str | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return None
    return f"must be a list of strings, got {value!r}"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"

    return check


REQUIRED = object()

SCHEMA: dict[str, dict[str, tuple[Check, Any]]] = {
    "data": {
        "root_dir": (_string, REQUIRED),
        "storage_dir": (_string, REQUIRED),
        "create_storage_dir": (_bool, False),
    },
    "disk_management": {
        "hard_limit_gb": (_positive, REQUIRED),
        "pause_threshold_gb": (_positive, REQUIRED),
        "resume_threshold_gb": (_non_negative, REQUIRED),
        "check_interval_seconds": (_positive, 30.0),
        "cache_duration_seconds": (_non_negative, 5.0),
        "max_concurrent_downloads": (_positive_int, 5),
        "min_free_gb": (_non_negative, 5.0),
        "expected_episode_size_mb": (_positive, 500.0),
    },
    "disk_management.cleanup": {
        "delete_video_after_transcription": (_bool, True),
        "delete_audio_after_transcription": (_bool, True),
    },
    "downloader": {
        "command": (_string, "ani-cli"),
        "extra_args": (_string_list, []),
        "timeout_seconds": (_positive, 3600.0),
        "retry_backoff_seconds": (_non_negative, 60.0),
        "retry_backoff_max_seconds": (_non_negative, 3600.0),
        "container": (_one_of("mkv", "keep"), "mkv"),
        "total_bandwidth_mbps": (_non_negative, 0.0),
        "verify": (_bool, True),
        "on_title_mismatch": (_one_of("warn", "fail", "ignore"), "warn"),
        "verify_timeout_seconds": (_positive, 120.0),
    },
    "queue": {
        "lease_seconds": (_positive, 30.0),
        "heartbeat_seconds": (_positive, 2.0),
    },
    "zmq": {
        "dispatcher": (_string, None),
        "status": (_string, None),
        "disk_state": (_string, None),
        "disk_control": (_string, None),
    },
    "zmq.curve": {
        "server_secret_key": (_string, None),
        "authorized_keys_dir": (_string, None),
        "client_secret_key": (_string, None),
        "server_public_key": (_string, None),
    },
    "web": {
        "listen": (_string, "127.0.0.1:8766"),
        "password": (_string, None),
        "api_key": (_string, None),
    },
}

DEFAULT_ENDPOINTS = {
    "dispatcher": "dispatcher.sock",
    "status": "status.sock",
    "disk_state": "disk-state.sock",
    "disk_control": "disk-control.sock",
}


class _Reader:
    """Walks the parsed TOML against SCHEMA, raising ConfigError with file + key."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.raw = raw

    def fail(self, section: str, key: str | None, text: str) -> ConfigError:
        where = f"[{section}] {key}" if key else f"[{section}]"
        return ConfigError(f"{self.path}: {where}: {text}")

    def table(self, section: str) -> dict[str, Any]:
        node: Any = self.raw
        for part in section.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise self.fail(section, None, "must be a table")
        return node

    def check_unknown(self) -> None:
        sections = {s.split(".")[0] for s in SCHEMA}
        for name in self.raw:
            if name not in sections:
                raise ConfigError(f"{self.path}: [{name}]: unknown section")
        for section, keys in SCHEMA.items():
            subtables = {s.split(".", 1)[1] for s in SCHEMA if s.startswith(section + ".")}
            for key in self.table(section):
                if key not in keys and key not in {t.split(".")[0] for t in subtables}:
                    raise self.fail(section, key, "unknown key")

    def section(self, section: str) -> dict[str, Any]:
        table = self.table(section)
        values: dict[str, Any] = {}
        for key, (check, default) in SCHEMA[section].items():
            if key not in table:
                if default is REQUIRED:
                    raise self.fail(section, key, "missing (required)")
                values[key] = default
                continue
            error = check(table[key])
            if error:
                raise self.fail(section, key, error)
            values[key] = table[key]
        return values


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


def _check_thresholds(reader: _Reader, disk: dict[str, Any]) -> None:
    hard, pause, resume = disk["hard_limit_gb"], disk["pause_threshold_gb"], disk["resume_threshold_gb"]
    if pause >= hard:
        raise reader.fail("disk_management", "pause_threshold_gb",
                          f"must be below hard_limit_gb ({hard:g})")
    if resume >= pause:
        raise reader.fail("disk_management", "resume_threshold_gb",
                          f"must be below pause_threshold_gb ({pause:g})")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    raw = reader.section("web")
    try:
        host, port = parse_listen(raw["listen"])
    except ValueError as exc:
        raise reader.fail("web", "listen", str(exc)) from None
    key = raw["api_key"]
    if key is not None and len(key) < API_KEY_MIN:
        raise reader.fail("web", "api_key", f"must be at least {API_KEY_MIN} characters, got "
                          f"{len(key)}; e.g. the output of: python3 -c 'import secrets; "
                          "print(secrets.token_urlsafe(24))'")
    web = WebConfig(host=host, port=port, password=raw["password"], api_key=key)
    if not web.local and web.password is None and key is None:
        raise reader.fail("web", "listen", f"{raw['listen']} is reachable from other hosts; "
                          "set [web] password or api_key, or listen on 127.0.0.1:8766")
    return web


def parse_config(path: Path, raw: dict[str, Any]) -> Config:
    reader = _Reader(path, raw)
    reader.check_unknown()
    base = path.resolve().parent
    data = reader.section("data")
    disk = reader.section("disk_management")
    _check_thresholds(reader, disk)
    cleanup = reader.section("disk_management.cleanup")
    downloader = reader.section("downloader")
    queue = reader.section("queue")
    if queue["heartbeat_seconds"] * 2 > queue["lease_seconds"]:
        raise reader.fail("queue", "heartbeat_seconds",
                          f"must be at most half of lease_seconds ({queue['lease_seconds']:g})")
    root = _resolve(base, data["root_dir"])
    assert root is not None
    zmq_raw = reader.section("zmq")
    run_dir = root / "run"
    endpoints = {k: _endpoint(reader, base, run_dir, k, v) for k, v in zmq_raw.items()}
    curve_raw = reader.section("zmq.curve")
    curve = CurveConfig(**{k: _resolve(base, v) for k, v in curve_raw.items()})
    return Config(
        path=path,
        root_dir=root,
        storage_dir=_resolve(base, data["storage_dir"]),  # type: ignore[arg-type]
        disk=DiskConfig(**disk, **cleanup),
        downloader=DownloaderConfig(**{**downloader, "extra_args": tuple(downloader["extra_args"])}),
        queue=QueueConfig(**queue),
        zmq=ZmqConfig(**endpoints, curve=curve),
        create_storage_dir=data["create_storage_dir"],
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
