"""A whole anime-downloader installation in a temp directory, for end-to-end tests.

``System`` writes a config.toml, a catalog for the simulated ani-cli and a job
database, runs the real services (under the real supervisord, or one by one),
and offers bounded waits on what a user would check: rows, files, messages.
Nothing here sleeps to synchronise: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any, Callable

import psutil

from shared.protocol import DiskStateMsg

REPO = Path(__file__).resolve().parent.parent
SIM_ANI_CLI = REPO / "tests" / "fakes" / "ani-cli"
BIN = Path(sys.executable).parent

BASE_CONFIG: dict[str, dict[str, Any]] = {
    # The old behaviour (storage_dir created at start) for tests about something else;
    # tests of the storage itself set it to false.
    "data": {"root_dir": "data", "storage_dir": "storage", "create_storage_dir": True},
    "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8,
                        "min_free_gb": 0.01, "check_interval_seconds": 30,
                        "cache_duration_seconds": 1, "max_concurrent_downloads": 3},
    "downloader": {"command": str(SIM_ANI_CLI), "verify": False, "container": "keep",
                   "timeout_seconds": 30, "retry_backoff_seconds": 0},
    "queue": {"lease_seconds": 6, "heartbeat_seconds": 1},
    "web": {"listen": "127.0.0.1:0"},  # anime-web picks a free port and logs it: never a fixed one
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def render_toml(tables: dict[str, dict[str, Any]]) -> str:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {toml_value(v)}" for key, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def mount_tmpfs(where: Path, size: str | int) -> None:
    """Mount a real filesystem of ``size`` (``1m``, or bytes) at the existing directory
    ``where``, or skip the test where mounting is not permitted (needs root or
    CAP_SYS_ADMIN). Undo with ``unmount``."""
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a {size} tmpfs here (needs root/CAP_SYS_ADMIN): "
                    f"{done.stderr.strip()}")


def unmount(where: Path) -> None:
    """Lazily: a process of the test that still has a file open there does not keep it."""
    subprocess.run(["umount", "-l", str(where)], check=False)


class WaitTimeout(AssertionError, TimeoutError):
    """A bounded wait that ran out: a test failure, and a TimeoutError for code that expects one."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # sync-ok: polling interval of a bounded wait


class Layout:
    """Where an installation under ``root`` keeps things (tests' System, benches' Install)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def db_path(self) -> Path:
        return self.data / "jobs.db"

    def log(self, program: str) -> str:
        path = self.data / "logs" / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class System(Layout):
    def __init__(self, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        # A short root: ipc:// paths must stay under 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ad-", dir="/tmp"))
        self.config_path = self.root / "config.toml"
        self.catalog_path = self.root / "catalog.json"
        self.sim_log = self.root / "sim.log"
        tables = json.loads(json.dumps(BASE_CONFIG))
        for table, values in (overrides or {}).items():
            tables.setdefault(table, {}).update(values)
        self.config_path.write_text(render_toml(tables))
        self.write_catalog({"defaults": {"size": 2048, "duration": 0.0}, "anime": []})
        self.processes: list[subprocess.Popen] = []
        self._lines: dict[int, list[str]] = {}
        self.supervisord: subprocess.Popen | None = None


    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
        env["ANI_CLI_SIM_CATALOG"] = str(self.catalog_path)
        env["ANI_CLI_SIM_LOG"] = str(self.sim_log)
        env["ANI_CLI_SIM_STATE"] = str(self.root)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # --- inputs -------------------------------------------------------------

    def write_catalog(self, catalog: dict) -> None:
        tmp = self.catalog_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(catalog))
        os.replace(tmp, self.catalog_path)

    def add_anime(self, catalog: dict, query: str, results: list[dict]) -> None:
        catalog["anime"].append({"query": query, "results": results})

    def enqueue(self, mal_id: int, title: str, episodes: list[int],
                selected_index: int | None = None, selected_title: str | None = None,
                max_retries: int = 3) -> None:
        from services.enqueue import enqueue

        selection = None
        if selected_index is not None:
            selection = (selected_index, selected_title or title, "high")
        enqueue(self.db_path, mal_id, title, episodes, max_retries, selection)

    # --- running ------------------------------------------------------------

    def command(self, *args: str) -> list[str]:
        return [str(BIN / args[0]), *args[1:]]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run one of the project's console scripts to completion."""
        return subprocess.run(self.command(*args), cwd=self.root, env=self.env(), timeout=timeout,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)

    def spawn(self, *args: str) -> subprocess.Popen:
        """Start a console script in the background. Its output (stdout and stderr) is read
        as it comes into ``lines(proc)``: a full pipe would block it (and the launcher's
        supervisord with it)."""
        proc = subprocess.Popen(self.command(*args), cwd=self.root, env=self.env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        lines: list[str] = []
        self._lines[proc.pid] = lines

        def pump() -> None:
            for raw in iter(proc.stdout.readline, b""):
                lines.append(raw.decode("utf-8", "replace"))

        threading.Thread(target=pump, daemon=True).start()
        return proc

    def lines(self, proc: subprocess.Popen) -> list[str]:
        """The output of a spawned process so far (a live list)."""
        return self._lines[proc.pid]

    def output(self, proc: subprocess.Popen) -> str:
        return "".join(self._lines[proc.pid])

    def start_supervisord(self, workers: int = 3, *extra: str) -> subprocess.Popen:
        """The real supervisord through the launcher (no --exit-when-done)."""
        proc = self.spawn("anime-downloader", "-c", str(self.config_path), "-w", str(workers), *extra)
        self.supervisord = proc
        wait_for(lambda: self.rpc_ok(), 30, "supervisord to answer")
        return proc

    def rpc(self) -> xmlrpc.client.ServerProxy:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.data / 'run' / 'supervisor.sock'}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def rpc_ok(self) -> bool:
        try:
            self.rpc().supervisor.getState()
            return True
        except (OSError, xmlrpc.client.Fault):
            return False

    def process_info(self, name: str) -> dict:
        return self.rpc().supervisor.getProcessInfo(name)

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess:
        conf = self.data / "run" / "supervisord.conf"
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), *args],
                              capture_output=True, text=True, timeout=60, env=self.env())

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def cleanup(self) -> None:
        self.stop()
        self.kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def kill_leftovers(self) -> None:
        """SIGKILL anything still running for this installation (a test that failed half-way
        can leave, say, a hung ani-cli in its own session), so it cannot load later tests."""
        root = str(self.root)
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid():
                    continue
                if root in " ".join(proc.cmdline()) or any(root in v for v in proc.environ().values()):
                    proc.kill()
            except psutil.Error:
                continue

    # --- observing ----------------------------------------------------------

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def jobs(self) -> list[dict]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM jobs ORDER BY id")]
        finally:
            conn.close()

    def status_json(self) -> dict | None:
        """``anime-status --json``: the document (one object on one line), or None while
        nothing answers."""
        result = self.run("anime-status", "-c", str(self.config_path), "--json", timeout=20)
        if result.returncode != 0:
            return None
        assert result.stdout.count("\n") == 1, "--json prints one object on one line"
        return json.loads(result.stdout)

    def status_text(self) -> str:
        """``anime-status``'s text, which must be an answer of the dispatcher."""
        result = self.run("anime-status", "-c", str(self.config_path), timeout=20)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stages(self) -> dict[str, int]:
        return dict(self.query("SELECT stage, COUNT(*) FROM jobs GROUP BY stage"))

    def sim_runs(self, event: str = "start") -> list[dict]:
        if not self.sim_log.exists():
            return []
        lines = self.sim_log.read_text().splitlines()
        return [r for r in (json.loads(line) for line in lines if line.strip()) if r["event"] == event]

    def wait_logged(self, program: str, text: str, timeout: float = 5.0) -> None:
        """Wait for ``text`` in a program's log file: supervisord copies each line there a
        moment after the program writes it (and after the program has exited)."""
        wait_for(lambda: text in self.log(program), timeout, f"{program}.log to say {text!r}")

    def storage_files(self) -> list[Path]:
        if not self.storage.exists():
            return []
        return sorted(p for p in self.storage.rglob("*") if p.is_file())

    def private_dirs(self) -> list[Path]:
        root = self.storage / ".in_progress"
        return sorted(p for p in root.glob("job-*")) if root.exists() else []


def running_state(seq: int = 1) -> DiskStateMsg:
    """A fresh "running" disk state with room to spare, as a scripted disk-watcher sends."""
    now = time.time()
    return DiskStateMsg(seq=seq, state="running", usage_bytes=0, breakdown={},
                        free_bytes=100 * 2 ** 30, pause_threshold_bytes=9 * 2 ** 30,
                        resume_threshold_bytes=8 * 2 ** 30, hard_limit_bytes=10 * 2 ** 30,
                        min_free_bytes=0, measured_at=now, published_at=now)
