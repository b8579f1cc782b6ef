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
    # every rule, in the words of the line (msgspec checks, shared/config.py words)
    ({"disk_management": {"min_free_gb": -1}}, None,
     "[disk_management] min_free_gb: must be 0 or more, got -1"),
    ({"disk_management": {"max_concurrent_downloads": 0}}, None,
     "[disk_management] max_concurrent_downloads: must be at least 1, got 0"),
    ({"disk_management": {"max_concurrent_downloads": 2.5}}, None,
     "[disk_management] max_concurrent_downloads: must be a whole number, got 2.5"),
    ({"disk_management": {"check_interval_seconds": True}}, None,
     "[disk_management] check_interval_seconds: must be a number, got True"),
    ({"downloader": {"verify": "yes"}}, None, "[downloader] verify: must be true or false, got 'yes'"),
    ({"downloader": {"container": "avi"}}, None,
     "[downloader] container: must be one of 'mkv', 'keep', got 'avi'"),
    ({"downloader": {"on_title_mismatch": 1}}, None,
     "[downloader] on_title_mismatch: must be one of 'warn', 'fail', 'ignore', got 1"),
    ({"downloader": {"command": "  "}}, None, "[downloader] command: must not be empty"),
    ({"downloader": {"command": 5}}, None, "[downloader] command: must be a string, got 5"),
    ({"downloader": {"extra_args": ["-q", 1080]}}, None,
     "[downloader] extra_args: must be a list of strings, got ['-q', 1080]"),
    ({"zmq": {"status": ""}}, None, "[zmq] status: must not be empty"),
    ({"zmq.curve": {"server_secret_key": 1}}, None,
     "[zmq.curve] server_secret_key: must be a string, got 1"),
    ({"zmq.curve": {"server_key": "x"}}, None, "[zmq.curve] server_key: unknown key"),
    ({"zmq": {"curve": 3}}, None, "[zmq.curve]: must be a table"),
    ({"disk_management.cleanup": {"delete_video_after_transcription": 0}}, None,
     "[disk_management.cleanup] delete_video_after_transcription: must be true or false, got 0"),
    ({"disk_management.cleanup": {"keep": True}}, None,
     "[disk_management.cleanup] keep: unknown key"),
    ({"zmq": {"endpoint": "ipc:///x"}}, None, "[zmq] endpoint: unknown key"),
    (None, ("disk_management", "hard_limit_gb"), "[disk_management] hard_limit_gb: missing (required)"),
])
def test_bad_values_name_file_and_key(tmp_path, overrides, drop, expected):
    path = write(tmp_path, overrides, drop)
    message = error_of(path)
    assert message == f"{path}: {expected}"


def test_a_missing_section_names_its_first_required_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[data]\nroot_dir = 'data'\nstorage_dir = 'storage'\n")
    assert error_of(path) == f"{path}: [disk_management] hard_limit_gb: missing (required)"
    path.write_text("[disk_management]\nhard_limit_gb = 3\npause_threshold_gb = 2\n"
                    "resume_threshold_gb = 1\n")
    assert error_of(path) == f"{path}: [data] root_dir: missing (required)"
    path.write_text("debug = true\n")
    assert error_of(path) == f"{path}: [debug]: unknown section"
    path.write_text("queue = 3\n")
    assert error_of(path) == f"{path}: [queue]: must be a table"


def test_defaults_and_types_of_what_the_services_read(tmp_path):
    config = load_config(write(tmp_path, {"downloader": {"extra_args": ["-q", "1080"]}}))
    assert config.downloader.extra_args == ("-q", "1080")
    assert config.downloader.on_title_mismatch == "warn"
    assert config.disk.hard_limit_gb == 10.0 and isinstance(config.disk.hard_limit_gb, float)
    assert config.disk.cleanup.delete_video_after_transcription is True
    assert config.queue.lease_seconds == 6.0 and config.zmq.curve.server_enabled is False
    with pytest.raises(AttributeError):
        config.queue.lease_seconds = 1  # type: ignore[misc]


def test_unreadable_or_invalid_files(tmp_path):
    assert error_of(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: not found"
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nroot_dir = 1")
    assert error_of(bad).startswith(f"{bad}: not valid TOML:")


def test_the_shipped_config_is_valid():
    config = load_config(Path(__file__).resolve().parents[2] / "config.toml")
    assert config.downloader.command == "ani-cli"
    assert config.disk.pause_threshold_gb == 280
