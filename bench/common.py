"""Shared helpers of the bench scripts (run by hand, not by CI).

An installation in a short temp directory (ipc:// paths must stay under 107
bytes), a catalog for the simulated ani-cli, bulk job inserts in the contract
schema, the environment both sides of a comparison run with, and the process
tree of a running system (psutil).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shared.models import CONTRACT_DDL  # noqa: E402  (stdlib + the contract DDL only)
from tests.system import Layout, render_toml  # noqa: E402  (shared with the tests)

SIM_ANI_CLI = REPO / "tests" / "fakes" / "ani-cli"
BIN = Path(sys.executable).parent  # the venv's bin dir: console scripts, supervisord, python3
EPISODES_PER_ANIME = 20  # jobs are spread over series of this length, as a real queue is


def title_of(mal_id: int) -> str:
    return f"Bench Show {mal_id:04d}"


def spread(jobs: int, per_anime: int = EPISODES_PER_ANIME) -> list[tuple[int, int]]:
    """(mal_id, episode) of ``jobs`` jobs: series 1, 2, ... of ``per_anime`` episodes each."""
    return [(i // per_anime + 1, i % per_anime + 1) for i in range(jobs)]

# Production-like timings; verify/remux off because the simulated files are not videos.
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "data": {"root_dir": "data", "storage_dir": "storage"},
    "disk_management": {"hard_limit_gb": 300, "pause_threshold_gb": 280, "resume_threshold_gb": 250,
                        "min_free_gb": 0.01, "check_interval_seconds": 30,
                        "cache_duration_seconds": 5, "max_concurrent_downloads": 5,
                        "expected_episode_size_mb": 500},
    "downloader": {"command": str(SIM_ANI_CLI), "verify": False, "container": "keep",
                   "timeout_seconds": 600, "retry_backoff_seconds": 0},
    "queue": {"lease_seconds": 30, "heartbeat_seconds": 2},
}


class Install(Layout):
    """config.toml, catalog.json, data/ and storage/ under /tmp/adb-XXXX."""

    def __init__(self, overrides: dict[str, dict[str, Any]] | None = None, animes: int = 1,
                 episodes: int = EPISODES_PER_ANIME, size: int = 1024, duration: float = 0.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="adb-", dir="/tmp"))
        tables = json.loads(json.dumps(BASE_CONFIG))
        for table, values in (overrides or {}).items():
            tables.setdefault(table, {}).update(values)
        self.config_path = self.root / "config.toml"
        self.config_path.write_text(render_toml(tables))
        self.catalog_path = self.root / "catalog.json"
        self.catalog_path.write_text(json.dumps({
            "defaults": {"size": size, "duration": duration},
            "anime": [{"query": title_of(a), "results": [{"title": title_of(a), "episodes": episodes}]}
                      for a in range(1, animes + 1)]}))
        self.data.mkdir()
        self.storage.mkdir()

    def env(self) -> dict[str, str]:
        return bench_env(self.catalog_path)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def finish(self, ok: bool) -> None:
        """Remove the installation after a met goal; keep it for inspection after a miss."""
        if ok:
            self.cleanup()
        else:
            print(f"(kept {self.root} for inspection)")


def bench_env(catalog: Path) -> dict[str, str]:
    """The venv's bin dir first on PATH: the sim's ``#!/usr/bin/env python3`` must not go
    through a pyenv shim (0.25 s per run). No sim run log: neither side pays for it."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["ANI_CLI_SIM_CATALOG"] = str(catalog)
    env.pop("ANI_CLI_SIM_LOG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def insert_jobs(db_path: Path, rows: Iterable[tuple], selections: Iterable[tuple]) -> None:
    """rows: (id, anime_id, anime_title, episode, stage, video_path, video_size_bytes);
    selections: (mal_id, selected_index, selected_title, confidence). Contract schema only:
    the dispatcher adds its columns at start, as it does on an upstream database."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            for ddl in CONTRACT_DDL:
                conn.execute(ddl)
            conn.executemany("INSERT INTO jobs (id, anime_id, anime_title, episode, stage, "
                             "video_path, video_size_bytes) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT INTO anime_selection_cache (mal_id, selected_index, "
                             "selected_title, confidence) VALUES (?, ?, ?, ?)", selections)
    finally:
        conn.close()


def insert_simple_queue(db_path: Path, jobs: int, per_anime: int = EPISODES_PER_ANIME) -> None:
    """``jobs`` queued episodes (``spread``), every series with its selection (index 1)."""
    pairs = spread(jobs, per_anime)
    insert_jobs(db_path, ((i, a, title_of(a), ep, "queued", None, None)
                          for i, (a, ep) in enumerate(pairs, 1)),
                [(a, 1, title_of(a), "high") for a in sorted({a for a, _ in pairs})])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a process the bench started and wait for it; SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compile_project() -> None:
    """Write the project's .pyc files, as its first run does on a user's machine: with
    PYTHONDONTWRITEBYTECODE set (as on some CI hosts) every service start would compile
    its modules again, and the figures would measure the compiler."""
    import compileall

    for package in ("shared", "services"):
        compileall.compile_dir(str(REPO / package), quiet=1)


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


def role(cmdline: list[str]) -> str | None:
    """Which part of the system a process is, from its command line."""
    text = " ".join(cmdline)
    if "supervisor.supervisord" in text or text.endswith("supervisord") or "bin/supervisord" in text:
        return "supervisord"
    for name in ("anime-dispatcher", "anime-disk-watcher", "anime-worker", "anime-web",
                 "anime-downloader"):
        if name in text:
            return {"anime-dispatcher": "dispatcher", "anime-disk-watcher": "disk-watcher",
                    "anime-worker": "worker", "anime-web": "web",
                    "anime-downloader": "launcher"}[name]
    if "ani-cli" in text:
        return "ani-cli"
    return None


SERVICE_ROLES = ("supervisord", "dispatcher", "disk-watcher", "worker", "web", "launcher")


class TreeSampler:
    """Samples the CPU times of the system's long-lived processes (launcher, supervisord,
    services) every ``interval`` s in a thread, keeping each one's last figures. The
    short-lived ani-cli runs are not sampled: their CPU is the side's total (getrusage)
    minus these. Sampling costs this process ~0.2 % of a core at 1 s (it walks /proc to
    find the tree), against ~1.3 % at 0.2 s: CPU the system under test would miss."""

    def __init__(self, root_pid: int, interval: float = 1.0) -> None:
        import threading

        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.last: dict[int, tuple[str, float]] = {}
        self.roles: dict[int, str] = {}  # services only: a pid seen mid-exec is not cached
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the last figures of whatever still runs

    def _role(self, p) -> str | None:
        if p.pid not in self.roles:
            name = role(p.cmdline())
            if name not in SERVICE_ROLES:
                return None
            self.roles[p.pid] = name
        return self.roles[p.pid]

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        for p in procs:
            try:
                name = self._role(p)
                if name is not None:
                    t = p.cpu_times()
                    self.last[p.pid] = (name, t.user + t.system)
            except ps.Error:
                continue

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, cpu in self.last.values():
            totals[name] = totals.get(name, 0.0) + cpu
        return totals
