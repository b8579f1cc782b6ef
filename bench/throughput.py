"""Throughput against the spawn limit (run by hand, not by CI).

    python bench/throughput.py [--jobs 2000] [--workers 5] [--rounds 1]

N jobs, each a simulated ani-cli run that writes a 1 KiB file and exits at once:

* system: the whole thing under supervisord, ``anime-downloader -c CONFIG -w 5
  --exit-when-done``, timed from the launch to the ``summary:`` line. Start-up
  (launch to the first ani-cli started, from the workers' logs) and the tail
  (last download recorded to the summary: the done check and supervisord's stop)
  are reported apart, and the steady rate between them.
* baseline: ``xargs -0 -P 5 -n 10 env ANI_CLI_...=... ani-cli -S 1 -e N -d TITLE``,
  the same simulated ani-cli with the same arguments and environment, one private
  directory per job (``.in_progress/job-N/dl``): the most a shell loop could do.

Both sides run with the venv's bin dir first on PATH. Goal: system / xargs >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (compile_project, BIN, EPISODES_PER_ANIME, SIM_ANI_CLI, Install, insert_simple_queue, machine,  # noqa: E402
                    TreeSampler, median, spread, table, title_of, verdict)
from services.worker import download, shims  # noqa: E402

GOAL = 0.9
# "ani-cli started" (a worker's log) and "downloaded" (the dispatcher's)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z INFO (?:\S+ ){1,2}(ani-cli started|downloaded) ", re.M)


def children_cpu() -> float:
    """CPU seconds (user + system) of every descendant reaped so far: each process of both
    sides is waited for by its parent, so the delta is the whole side's CPU."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def job_env(base: dict[str, str], private: Path, tools: shims.Shims) -> list[str]:
    """``NAME=value`` words for ``env``: exactly what a worker sets for one ani-cli run
    (download.build_env: TERM, ANI_CLI_MENU, the wrappers on PATH), minus what is
    already in the environment that xargs passes on."""
    env = download.build_env(base, private / "dl", private, 0, tools)
    return [f"{k}={v}" for k, v in env.items() if base.get(k) != v]


def run_xargs(jobs: int, workers: int) -> dict:
    pairs = spread(jobs)
    inst = Install(animes=pairs[-1][0])
    try:
        args: list[str] = []
        tools = shims.install(inst.root / "run")
        base = inst.env()
        for job_id, (anime, ep) in enumerate(pairs, 1):
            private = inst.storage / ".in_progress" / f"job-{job_id}"
            argv = download.build_argv(str(SIM_ANI_CLI), 1, ep, (), title_of(anime))
            args += [*job_env(base, private, tools), *argv]
        per_job = len(args) // jobs
        data = b"\0".join(a.encode() for a in args) + b"\0"
        cpu0, t0 = children_cpu(), time.perf_counter()
        proc = subprocess.run(["xargs", "-0", "-P", str(workers), "-n", str(per_job), "env"],
                              input=data, env=inst.env(), cwd=inst.root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds, cpu = time.perf_counter() - t0, children_cpu() - cpu0
        files = sum(1 for _ in (inst.storage / ".in_progress").glob("job-*/dl/*.mp4"))
        if proc.returncode != 0 or files != jobs:
            raise RuntimeError(f"xargs: exit {proc.returncode}, {files} of {jobs} files")
        return {"seconds": seconds, "rate": jobs / seconds, "cpu_ms": cpu / jobs * 1000}
    finally:
        inst.cleanup()


def _log_times(text: str) -> tuple[list[float], list[float]]:
    started, landed = [], []
    for m in STAMP.finditer(text):
        t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(
            tzinfo=timezone.utc).timestamp()
        (started if m.group(2) == "ani-cli started" else landed).append(t)
    return started, landed


def run_system(jobs: int, workers: int) -> dict:
    inst = Install(animes=spread(jobs)[-1][0])
    try:
        insert_simple_queue(inst.db_path, jobs)
        cpu0, wall0, t0 = children_cpu(), time.time(), time.perf_counter()
        proc = subprocess.Popen([str(BIN / "anime-downloader"), "-c", str(inst.config_path),
                                 "-w", str(workers), "--exit-when-done"],
                                cwd=inst.root, env=inst.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        sampler = TreeSampler(proc.pid).start()
        summary = None
        for line in proc.stdout:
            if line.startswith("summary:"):
                summary = line.strip()
                break
        seconds = time.perf_counter() - t0
        sampler.stop()
        proc.stdout.close()
        code = proc.wait(timeout=120)
        exit_seconds, cpu = time.perf_counter() - t0, children_cpu() - cpu0
        if code != 0 or summary is None or f"downloaded={jobs}," not in summary:
            raise RuntimeError(f"anime-downloader: exit {code}, {summary!r}; see {inst.root}")
        logs = "".join(inst.log(p.stem) for p in (inst.data / "logs").glob("*.log"))
        started, landed = _log_times(logs)
        first, last = min(started) - wall0, max(landed) - wall0
        steady = last - first
    except BaseException:
        print(f"(kept {inst.root} for inspection)", file=sys.stderr)
        raise
    inst.cleanup()
    return {"seconds": seconds, "rate": jobs / seconds, "startup": first, "exit": exit_seconds,
            "cpu_ms": cpu / jobs * 1000, "roles": sampler.by_role(), "cpu": cpu,
            "tail": seconds - last, "steady_rate": (jobs - 1) / steady if steady > 0 else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="pairs of runs, in the order xargs-system, system-xargs, ... (default: %(default)s)")
    args = ap.parse_args()
    compile_project()
    print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{args.jobs} jobs ({EPISODES_PER_ANIME} episodes per series), {args.workers} in "
          "parallel, simulated ani-cli writing 1 KiB, "
          f"{args.rounds} round(s)\n")
    rows, ratios, cpu_ratios, split = [], [], [], []
    for n in range(args.rounds):
        # Odd rounds run the system first (xargs, system, system, xargs, ...): this host's
        # speed drifts by tens of percent over minutes, and a fixed order would charge a
        # drift to one side.
        if n % 2 == 0:
            base = run_xargs(args.jobs, args.workers)
            sysr = run_system(args.jobs, args.workers)
        else:
            sysr = run_system(args.jobs, args.workers)
            base = run_xargs(args.jobs, args.workers)
        ratio = sysr["rate"] / base["rate"]
        ratios.append(ratio)
        cpu_ratios.append(base["cpu_ms"] / sysr["cpu_ms"])
        rows.append([n + 1, f"{base['rate']:.1f}", f"{sysr['rate']:.1f}", f"{ratio:.3f}",
                     f"{sysr['steady_rate']:.1f}", f"{sysr['steady_rate'] / base['rate']:.3f}",
                     f"{sysr['startup']:.2f}", f"{sysr['tail']:.2f}", f"{sysr['exit']:.1f}",
                     f"{base['cpu_ms']:.0f}", f"{sysr['cpu_ms']:.0f}",
                     f"{sysr['cpu_ms'] - base['cpu_ms']:+.0f}"])
        roles = sysr["roles"]
        roles["ani-cli and the rest"] = sysr["cpu"] - sum(roles.values())
        split.append(f"round {n + 1}: " + ", ".join(
            f"{k} {v / args.jobs * 1000:.1f}" for k, v in sorted(roles.items(), key=lambda kv: -kv[1])))
    print(table(["round", "xargs jobs/s", "system jobs/s", "ratio", "steady jobs/s", "steady ratio",
                 "start-up s", "tail s", "exit s", "xargs CPU ms/job", "system CPU ms/job",
                 "orchestration CPU ms/job"], rows))
    print("\nsystem CPU ms/job by process:\n" + "\n".join(split))
    ratio = median(ratios)
    print(f"\nratio (median of {len(ratios)}): {ratio:.3f}, goal >= {GOAL}: {verdict(ratio >= GOAL)}")
    cpu_ratio = median(cpu_ratios)
    print(f"CPU-bound ratio (xargs CPU per job / system CPU per job, median): {cpu_ratio:.3f}, "
          f"goal >= {GOAL}: {verdict(cpu_ratio >= GOAL)} (what the ratio is on a quiet machine, "
          "where both sides saturate the cores)")
    print("ratio = system jobs/s (launch to summary line) / xargs jobs/s; steady = first ani-cli started "
          "to last download recorded (start-up and tail excluded); tail = last download to the "
          "summary (done check, supervisord stopping the services); exit s = launch to the "
          "launcher's exit. CPU = user+sys of every process of the side (getrusage of reaped "
          f"children), per job. Load average after: {os.getloadavg()[0]:.2f} (others' load skews "
          "the rates; the CPU figures much less)")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
