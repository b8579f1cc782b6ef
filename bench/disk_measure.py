"""Benchmark of shared.disk.DiskMonitor against ``du`` (run by hand).

    python bench/disk_measure.py [--files 10000 100000] [--reps 7] [--dir /tmp]

Builds trees of N small files (dirs of 100 files in ``videos/<id>/episodes/``, plus a few
files in ``.in_progress``, ``audio`` and ``transcripts``), then times, median of --reps:
``du -sb``, the full walk, and a routine re-measure after touching a few ``.in_progress``
files and adding one episode.  Goal: ``du time / routine time >= 10``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.disk import IN_PROGRESS_DIRNAME, DiskMonitor  # noqa: E402

FILES_PER_DIR = 100
GOAL = 10.0


def build_tree(root: Path, files: int) -> None:
    payload = b"x" * 1000
    for d in range(files // FILES_PER_DIR):
        ep = root / "videos" / str(d) / "episodes"
        ep.mkdir(parents=True)
        for i in range(FILES_PER_DIR):
            (ep / f"ep{i:03d}.mkv").write_bytes(payload)
    for sub in ("audio/1", "transcripts/1"):
        (root / sub).mkdir(parents=True)
        (root / sub / "ep001.bin").write_bytes(payload)
    for j in range(3):
        job = root / IN_PROGRESS_DIRNAME / f"job{j}"
        job.mkdir(parents=True)
        (job / "ep.mkv.part").write_bytes(payload)


def du_allocated(root: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(root)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def median_time(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(files: int, reps: int, base: str) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="disk_bench_", dir=base)) / "storage"
    try:
        t0 = time.perf_counter()
        build_tree(root, files)
        build_s = time.perf_counter() - t0
        time.sleep(1.1)  # let the fresh dirs' mtimes age past the "unstable" window (steady state)
        mon = DiskMonitor(root)
        du_s = median_time(lambda: subprocess.run(["du", "-sb", str(root)], check=True, capture_output=True), reps)
        full_s = median_time(mon.full_walk, reps)

        counter = iter(range(10**9))

        def change() -> None:  # what happens between two routine measurements
            n = next(counter)
            for j in range(3):
                with open(root / IN_PROGRESS_DIRNAME / f"job{j}" / "ep.mkv.part", "ab") as f:
                    f.write(b"y" * 8192)
            ep = root / "videos" / f"new{n}" / "episodes"
            ep.mkdir(parents=True)
            (ep / "ep001.mkv").write_bytes(b"z" * 5000)

        routine_s = median_time(lambda: mon.measure(force=True), reps, before=change)
        scanned, visited = mon.last_scanned_dirs, mon.last_stat_dirs
        usage = mon.measure(force=True)
        return {
            "files": files,
            "dirs": visited,
            "build_s": build_s,
            "du_s": du_s,
            "full_s": full_s,
            "routine_s": routine_s,
            "scanned": scanned,
            "monitor_total": usage.total,
            "du_total": du_allocated(root),
        }
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dir", default="/tmp", help="where to build the trees")
    args = ap.parse_args()

    rows = [bench(n, args.reps, args.dir) for n in args.files]
    print(f"median of {args.reps} runs; routine = re-measure after appending to 3 .in_progress files + adding 1 episode dir")
    header = f"{'files':>8} {'dirs':>6} {'du -sb':>9} {'full walk':>10} {'routine':>9} {'scanned':>8} {'du/routine':>11} {'goal':>6}  totals (monitor vs du -s --block-size=1)"
    print(header)
    print("-" * len(header))
    ok = True
    for r in rows:
        ratio = r["du_s"] / r["routine_s"]  # type: ignore[operator]
        same = r["monitor_total"] == r["du_total"]
        ok = ok and same and ratio >= GOAL
        print(
            f"{r['files']:>8} {r['dirs']:>6} {r['du_s'] * 1e3:>7.1f}ms {r['full_s'] * 1e3:>8.1f}ms "  # type: ignore[operator]
            f"{r['routine_s'] * 1e3:>7.2f}ms {r['scanned']:>8} {ratio:>10.1f}x {'OK' if ratio >= GOAL else 'MISS':>6}  "  # type: ignore[operator]
            f"{r['monitor_total']} vs {r['du_total']} {'equal' if same else 'DIFFERENT'}"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
