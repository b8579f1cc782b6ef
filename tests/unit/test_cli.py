"""The command lines: the launcher's supervisord.conf, terminal and refusals; anime-enqueue's
episode ranges."""

from __future__ import annotations

import configparser
import os
import signal
import subprocess
import sys

import pytest

from services import launcher
from services.enqueue import enqueue, parse_episodes
from shared.config import load_config
from shared.singleton import hold_lock
from tests.system import BASE_CONFIG, REPO, render_toml


def write_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(render_toml(BASE_CONFIG))
    return path


def rendered(tmp_path, *argv: str) -> configparser.RawConfigParser:
    path = write_config(tmp_path)
    args = launcher.parse_args(["-c", str(path), *argv])
    text = launcher.render(launcher.TEMPLATE.read_text(), load_config(path), args)
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return parser


def test_launcher_renders_the_repo_conf_for_the_config(tmp_path):
    conf = rendered(tmp_path, "-w", "4", "--dry-run", "--anime-id", "5114", "-v", "--exit-when-done")
    assert conf.get("program:worker", "numprocs") == "4"
    dispatcher = conf.get("program:dispatcher", "command")
    # total_bandwidth_mbps is shared among at least the 4 workers started
    assert dispatcher.endswith(f"-c {tmp_path}/config.toml --workers 4 --dry-run --anime-id 5114 "
                               "--exit-when-done -v")
    assert conf.get("program:dispatcher", "autorestart") == "unexpected"
    assert conf.get("program:worker", "stdout_logfile") == f"{tmp_path}/data/logs/%(program_name)s_%(process_num)02d.log"
    assert conf.get("unix_http_server", "file") == f"{tmp_path}/data/run/supervisor.sock"
    assert "%(here)s" not in "".join(conf.get(s, k) for s in conf.sections() for k in conf.options(s))
    for program in ("dispatcher", "disk-watcher", "worker"):
        assert conf.get(f"program:{program}", "stopasgroup") == "true"


def test_worker_count_defaults_to_max_concurrent_downloads(tmp_path):
    assert rendered(tmp_path).get("program:worker", "numprocs") == "3"


def test_launcher_refuses_a_bad_worker_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        launcher.parse_args(["-w", "0"])
    assert info.value.code == 2
    assert "-w/--workers: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [
    ("1-3", [1, 2, 3]), ("5", [5]), ("1,3,5-7", [1, 3, 5, 6, 7]), ("2-2,2", [2]),
])
def test_episode_ranges(text, expected):
    assert parse_episodes(text) == expected


@pytest.mark.parametrize("text", ["0", "3-1", "a-b", "", "1-"])
def test_bad_episode_ranges_name_the_part(text):
    with pytest.raises(ValueError):
        parse_episodes(text)


def test_enqueue_is_idempotent_per_episode(tmp_path):
    db = tmp_path / "jobs.db"
    assert enqueue(db, 1, "A", [1, 2, 3], selection=(2, "A (TV)", "high")) == 3
    assert enqueue(db, 1, "A", [2, 3, 4]) == 1
    import sqlite3
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone() == (4,)
    assert conn.execute("SELECT * FROM anime_selection_cache").fetchall() == [(1, 2, "A (TV)", "high")]


# --- the launcher's terminal and its refusals ------------------------------------

def test_log_lines_of_all_programs_reach_the_terminal_in_time_order(tmp_path, capsys):
    follower = launcher.LogFollower(tmp_path)
    (tmp_path / "dispatcher.log").write_text(
        "2026-11-25T17:18:26.100Z INFO dispatcher assigned job_id=1\n"
        "2026-11-25T17:18:26.900Z ERROR dispatcher boom\n"
        "Traceback (most recent call last):\n"
        "2026-11-25T17:18:27.000Z INFO dispatcher downloaded job_id=1\n")
    (tmp_path / "worker_01.log").write_text(
        "2026-11-25T17:18:26.200Z INFO worker w01 ani-cli started job_id=1\n"
        "2026-11-25T17:18:26.950Z INFO worker w01 landed job_id=1\n"
        "2026-11-25T17:18:27.500Z INFO worker w01 partial line without newline")
    (tmp_path / "supervisord.log").write_text("2026-11-25 17:18:26,000 CRIT not relayed\n")
    follower.poll()
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "dispatcher     | 2026-11-25T17:18:26.100Z INFO dispatcher assigned job_id=1",
        "worker_01      | 2026-11-25T17:18:26.200Z INFO worker w01 ani-cli started job_id=1",
        "dispatcher     | 2026-11-25T17:18:26.900Z ERROR dispatcher boom",
        "dispatcher     | Traceback (most recent call last):",  # stays with its line
        "worker_01      | 2026-11-25T17:18:26.950Z INFO worker w01 landed job_id=1",
        "dispatcher     | 2026-11-25T17:18:27.000Z INFO dispatcher downloaded job_id=1",
    ]


def test_the_launcher_outlives_a_terminal_that_is_gone(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader of `anime-downloader | grep` exited
    stream = os.fdopen(write_end, "w")
    launcher.say(stream, "a line nobody reads\n")  # EPIPE: no exception
    launcher.say(stream, "and the next\n")
    stream.close()  # no error at exit either


@pytest.mark.parametrize("ignored", [False, True], ids=["sighup", "nohup"])
def test_a_hang_up_is_a_stop_request_unless_nohup_ignored_it(ignored):
    code = ("import os, signal, sys\n"
            "from shared.lifecycle import StopRequest\n"
            "stop = StopRequest()\n"
            "os.kill(os.getpid(), signal.SIGHUP)\n"
            "print(stop.count)\n")
    preexec = (lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignored else None
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=30, preexec_fn=preexec)
    assert (result.returncode, result.stdout.strip()) == (0, "0" if ignored else "1"), result


def test_a_running_launcher_is_named_by_its_pid(tmp_path):
    config = load_config(write_config(tmp_path))
    fd = hold_lock(config.run_dir / launcher.LOCK_NAME, "anime-downloader")
    try:
        line = launcher.already_running(config)
    finally:
        os.close(fd)
    assert line.startswith(f"already running (pid {os.getpid()})") and f"kill {os.getpid()}" in line
    assert launcher.already_running(config) is None  # released: a start may go on


def test_leftover_services_are_named_with_every_pid(tmp_path):
    config = load_config(write_config(tmp_path))
    fds = [hold_lock(config.run_dir / name, "x") for name in ("dispatcher.lock", "worker-w02.lock")]
    (config.run_dir / "worker-w01.lock").write_text("999999\n")  # left by a dead worker: free
    try:
        line = launcher.already_running(config)
    finally:
        for fd in fds:
            os.close(fd)
    pid = os.getpid()
    assert line.startswith(f"already running (pids {pid} {pid}): a dispatcher (pid {pid}), "
                           f"worker w02 (pid {pid}) left over"), line
    assert line.endswith(f"stop them with: kill {pid} {pid}")


def test_a_stop_prints_the_summary_of_the_database(tmp_path):
    db = tmp_path / "jobs.db"
    enqueue(db, 1, "A", [1, 2, 3], selection=(1, "A", "high"))
    enqueue(db, 2, "B", [1])  # no selection
    import sqlite3
    conn = sqlite3.connect(db)
    conn.execute("UPDATE jobs SET stage = 'downloaded' WHERE anime_id = 1 AND episode = 1")
    conn.execute("UPDATE jobs SET stage = 'failed' WHERE anime_id = 1 AND episode = 2")
    conn.commit()
    conn.close()
    assert launcher.summary_line(launcher.db_summary(db, None)) == \
        "summary: downloaded=1, failed=1, still_queued=2, waiting_for_selection=1"
    assert launcher.db_summary(db, 2) == {"downloaded": 0, "failed": 0, "still_queued": 1,
                                          "waiting_for_selection": 1}
    assert launcher.db_summary(tmp_path / "missing.db", None) is None


def test_anime_status_loads_only_what_answering_needs(tmp_path):
    """The probe is run every few seconds by health checks and --watch: its import set is
    its cost (bench/status_cli.py: within 1.5x of ``python -c "import zmq"``). logging and
    signal are the services' (shared/logfmt.py); typing_extensions brings inspect."""
    code = ("import sys\n"
            "from services import status\n"
            "args = status.parse_args(['-c', sys.argv[1], '--json'])\n"
            "status.Sockets(status.config_or_exit('anime-status', args.config)).close()\n"
            "print(sorted(m for m in ('logging', 'signal', 'typing_extensions', 'inspect', "
            "'sqlite3', 'shutil') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code, str(write_config(tmp_path))], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
