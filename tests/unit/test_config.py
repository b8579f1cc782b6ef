"""config.toml: every bad value is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, load_config
from tests.system import BASE_CONFIG, render_toml


def write(tmp_path: Path, overrides: dict | None = None, drop: tuple[str, str] | None = None) -> Path:
    tables = {k: dict(v) for k, v in BASE_CONFIG.items()}
    for table, values in (overrides or {}).items():
        tables.setdefault(table, {}).update(values)
    if drop:
        del tables[drop[0]][drop[1]]
    path = tmp_path / "config.toml"
    path.write_text(render_toml(tables))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_relative_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    path = write(tmp_path)
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.root_dir == tmp_path / "data"
    assert config.storage_dir == tmp_path / "storage"
    assert config.db_path == tmp_path / "data" / "jobs.db"
    assert config.zmq.dispatcher == f"ipc://{tmp_path}/data/run/dispatcher.sock"


def test_gb_means_ten_to_the_ninth(tmp_path):
    config = load_config(write(tmp_path, {"disk_management": {"hard_limit_gb": 1.5,
                                                              "pause_threshold_gb": 1,
                                                              "resume_threshold_gb": 0.5}}))
    assert config.disk.hard_limit_bytes == 1_500_000_000
    assert config.disk.pause_bytes == 1_000_000_000


@pytest.mark.parametrize("overrides,drop,expected", [
    ({"disk_management": {"pause_threshold_gb": 300}}, None,
     "[disk_management] pause_threshold_gb: must be below hard_limit_gb (10)"),
    ({"disk_management": {"resume_threshold_gb": 9}}, None,
     "[disk_management] resume_threshold_gb: must be below pause_threshold_gb (9)"),
    ({"disk_management": {"hard_limit_gb": "300"}}, None,
     "[disk_management] hard_limit_gb: must be a number, got '300'"),
    ({"disk_management": {"max_concurrent_downloads": True}}, None,
     "[disk_management] max_concurrent_downloads: must be a whole number, got True"),
    ({"downloader": {"extra_args": "-q 1080"}}, None,
     "[downloader] extra_args: must be a list of strings, got '-q 1080'"),
    ({"downloader": {"timeout_seconds": 0}}, None,
     "[downloader] timeout_seconds: must be greater than 0, got 0"),
    ({"queue": {"heartbeat_seconds": 5, "lease_seconds": 6}}, None,
     "[queue] heartbeat_seconds: must be at most half of lease_seconds (6)"),
    ({"disk_managment": {"x": 1}}, None, "[disk_managment]: unknown section"),
    ({"data": {"storage": "x"}}, None, "[data] storage: unknown key"),
    ({"zmq": {"dispatcher": "udp://1.2.3.4:5"}}, None,
     "[zmq] dispatcher: must start with ipc:// or tcp://, got 'udp://1.2.3.4:5'"),
    (None, ("data", "storage_dir"), "[data] storage_dir: missing (required)"),
])
def test_bad_values_name_file_and_key(tmp_path, overrides, drop, expected):
    path = write(tmp_path, overrides, drop)
    message = error_of(path)
    assert message == f"{path}: {expected}"


def test_unreadable_or_invalid_files(tmp_path):
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: not found"
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nroot_dir = 1")
    assert error_of(bad).startswith(f"{bad}: not valid TOML:")


def test_the_shipped_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[2] / "config.toml")
    assert config.downloader.command == "ani-cli"
    assert config.disk.pause_threshold_gb == 280
