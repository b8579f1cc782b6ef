"""Memory and idle cost of the running system (run by hand, not by CI).

    python bench/resources.py [--workers 5] [--idle-seconds 60] [--download-seconds 15]

Starts the whole system under supervisord (``anime-downloader -w 5``, no
--exit-when-done) with one simulated download per worker (``--download-seconds``
long, 20 MB each), and measures:

* resident memory (RSS, and USS: the pages only that process holds) of the
  launcher, supervisord, the dispatcher, the disk-watcher and each worker, while
  the workers download and again once everything is idle;
* the CPU used by the whole process tree (psutil cpu_times of the launcher and
  every descendant) over ``--idle-seconds`` idle seconds, with each process's
  share and its wake-ups (voluntary context switches) per second;
* what the worker imports (it must not load the database layer, peewee, psutil,
  sqlite3 or OpenSSL).

Goals: a worker under 25 MB resident; idle CPU of the whole system under 0.5 % of one core.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_project, stop, BIN, Install, insert_simple_queue, machine, role, table, verdict  # noqa: E402
from tests.system import wait_for  # noqa: E402

WORKER_RSS_GOAL_MB = 25.0
IDLE_CPU_GOAL_PERCENT = 0.5
MB = 1024 * 1024
FORBIDDEN_IN_WORKER = ("peewee", "psutil", "sqlite3", "_sqlite3", "shared.models", "hashlib",
                       "_hashlib", "ssl", "services.dispatcher")


def tree(root: psutil.Process) -> dict[int, tuple[str, psutil.Process]]:
    procs = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = role(p.cmdline())
        except psutil.Error:
            continue
        if name is not None and name != "ani-cli":
            procs[p.pid] = (name, p)
    return procs


def memory(procs: dict[int, tuple[str, psutil.Process]]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for name, p in procs.values():
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        out.setdefault(name, []).append((info.rss / MB, info.uss / MB))
    return out


def downloaded(db_path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT COUNT(*) FROM jobs WHERE stage = 'downloaded'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def cpu_and_wakeups(procs: dict[int, tuple[str, psutil.Process]]) -> dict[int, tuple[float, int]]:
    out = {}
    for pid, (_, p) in procs.items():
        try:
            t, c = p.cpu_times(), p.num_ctx_switches()
        except psutil.Error:
            continue
        out[pid] = (t.user + t.system, c.voluntary)
    return out


def worker_imports() -> tuple[list[str], str]:
    """Forbidden modules a worker loads, and the heaviest imports (-X importtime)."""
    code = ("import sys; import services.worker.__main__; from services.worker import agent, attempt, "
            "download, progress; print(' '.join(sorted(sys.modules)))")
    res = subprocess.run([str(BIN / "python"), "-X", "importtime", "-c", code], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    loaded = set(res.stdout.split())
    rows = []
    for line in res.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("   "):
            rows.append((int(parts[1]), parts[2].strip()))  # top-level imports only
    heavy = ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in sorted(rows, reverse=True)[:6])
    return sorted(m for m in FORBIDDEN_IN_WORKER if m in loaded), heavy


def mem_rows(mem: dict[str, list[tuple[float, float]]]) -> list[list[str]]:
    rows = []
    for name in ("launcher", "supervisord", "dispatcher", "disk-watcher", "worker"):
        values = mem.get(name, [])
        if not values:
            continue
        rss = max(v[0] for v in values)
        uss = max(v[1] for v in values)
        label = f"{name} (max of {len(values)})" if len(values) > 1 else name
        goal = ""
        if name == "worker":
            goal = f"< {WORKER_RSS_GOAL_MB:g} MB {verdict(rss < WORKER_RSS_GOAL_MB)}"
        rows.append([label, f"{rss:.1f}", f"{uss:.1f}", goal])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--download-seconds", type=float, default=15.0)
    args = ap.parse_args()
    compile_project()
    print(f"machine: {machine()}")
    forbidden, heavy = worker_imports()
    print(f"worker imports: forbidden modules loaded: {', '.join(forbidden) or 'none'} "
          f"({verdict(not forbidden)}); heaviest: {heavy}")

    inst = Install(animes=1, size=20 * MB, duration=args.download_seconds)
    insert_simple_queue(inst.db_path, args.workers)
    proc = subprocess.Popen([str(BIN / "anime-downloader"), "-c", str(inst.config_path),
                             "-w", str(args.workers)], cwd=inst.root, env=inst.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ok = True
    try:
        root = psutil.Process(proc.pid)

        def sims() -> int:
            return sum(1 for p in root.children(recursive=True) if "ani-cli" in " ".join(p.cmdline()))

        wait_for(lambda: sims() >= args.workers, 60, f"{args.workers} downloads running", 0.1)
        time.sleep(min(3.0, args.download_seconds / 3))  # well into the downloads
        busy = memory(tree(root))
        wait_for(lambda: downloaded(inst.db_path) >= args.workers, args.download_seconds * 4 + 60,
                 "the downloads to land", 0.2)
        time.sleep(5)  # let the services settle (disk cache, last heartbeats)
        procs = tree(root)
        idle = memory(procs)

        print(f"\nresident memory, MB ({args.workers} workers; RSS = resident set, USS = pages "
              "that process alone holds)")
        rows_busy = {r[0].split(" ")[0]: r for r in mem_rows(busy)}
        rows = []
        for r in mem_rows(idle):
            b = rows_busy.get(r[0].split(" ")[0], ["", "-", "-", ""])
            rows.append([r[0], r[1], r[2], b[1], b[2], r[3] or b[3]])
        print(table(["process", "idle RSS", "idle USS", "downloading RSS", "downloading USS", "goal"],
                    rows))
        worker_rss = max(v[0] for v in idle["worker"] + busy.get("worker", []))
        ok = ok and worker_rss < WORKER_RSS_GOAL_MB and not forbidden

        before, t0 = cpu_and_wakeups(procs), time.monotonic()
        time.sleep(args.idle_seconds)
        after, seconds = cpu_and_wakeups(procs), time.monotonic() - t0
        by_role: dict[str, list[float]] = {}
        for pid, (cpu, wakes) in after.items():
            if pid not in before:
                continue
            name = procs[pid][0]
            acc = by_role.setdefault(name, [0.0, 0.0, 0])
            acc[0] += cpu - before[pid][0]
            acc[1] += (wakes - before[pid][1]) / seconds
            acc[2] += 1
        total = sum(v[0] for v in by_role.values())
        percent = total / seconds * 100
        ok = ok and percent < IDLE_CPU_GOAL_PERCENT and len(after) == len(procs)
        print(f"\nidle CPU over {seconds:.0f} s (psutil cpu_times, user+system)")
        rows = [[f"{name} (x{n})" if n > 1 else name, f"{cpu:.3f}", f"{cpu / seconds * 100:.3f}",
                 f"{wakes:.1f}"]
                for name, (cpu, wakes, n) in sorted(by_role.items(), key=lambda kv: -kv[1][0])]
        rows.append(["whole system", f"{total:.3f}", f"{percent:.3f}",
                     f"{sum(v[1] for v in by_role.values()):.1f}"])
        print(table(["process", "CPU s", "% of one core", "wake-ups/s"], rows))
        print(f"\nidle CPU: {percent:.3f} % of one core, goal < {IDLE_CPU_GOAL_PERCENT} %: "
              f"{verdict(percent < IDLE_CPU_GOAL_PERCENT)} (ratio to goal {percent / IDLE_CPU_GOAL_PERCENT:.2f}); "
              f"worker RSS max {worker_rss:.1f} MB, goal < {WORKER_RSS_GOAL_MB:g} MB: "
              f"{verdict(worker_rss < WORKER_RSS_GOAL_MB)} (ratio {worker_rss / WORKER_RSS_GOAL_MB:.2f})")
        if len(after) != len(procs):
            print("a process exited during the idle period: see", inst.root / "data" / "logs")
    finally:
        stop(proc, timeout=60)
        inst.finish(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
