"""``anime-status --json`` as a whole process, this tree against another revision (run by hand).

    python bench/status_cli.py [--baseline-rev main] [--rounds 20] [--jobs 10000]

Starts this tree's disk-watcher and dispatcher on a queue of ``--jobs`` jobs, then
runs ``anime-status --json`` again and again, interleaved in one run so that the
machine's noise falls on both sides alike:

* this tree through its console script (what a user runs);
* this tree and the baseline (``git archive`` of ``--baseline-rev`` in a temp
  directory) started the same way, ``python -c 'from services.status import main'``
  with the tree first on ``PYTHONPATH``, so the two differ in their code only;
* ``python -c "import zmq"`` with the same interpreter and environment: the floor of
  any command-line tool that talks ZeroMQ (issue 16: the console script within 1.5x).

The baseline's anime-status talks to this tree's dispatcher: the wire format is the
same (README, "How the parts fit"). Goals: the console script under 100 ms (the
median) and within 1.5x of ``import zmq``; the ratio of this tree to the baseline says
what a change cost or saved.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, REPO, Install, insert_simple_queue, machine, median, stop, table, verdict  # noqa: E402
from queue_scale import STATUS_GOAL_MS, start_dispatcher  # noqa: E402
from shared.config import load_config  # noqa: E402

STUB = "import sys; from services.status import main; sys.exit(main())"
ZMQ_FLOOR = "import zmq"
FLOOR_GOAL_RATIO = 1.5


def unpack(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             check=True, capture_output=True).stdout
    tar = into / "baseline.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into / "tree", filter="data")
    return into / "tree"


def compile_tree(tree: Path) -> None:
    """Write the .pyc files of a tree's code, as pip does at install. The warm-up runs
    cannot when PYTHONDONTWRITEBYTECODE is set (it is on these machines): every run
    would compile services/ and shared/ again, ~35 ms that no installed copy pays."""
    for package in ("services", "shared"):
        if not compileall.compile_dir(tree / package, quiet=1):
            raise RuntimeError(f"cannot compile {tree / package}")


def side(inst: Install, tree: Path | None) -> tuple[list[str], dict[str, str]]:
    args = ["-c", str(inst.config_path), "--json"]
    env = inst.env()
    if tree is None:
        return [str(BIN / "anime-status"), *args], env
    env["PYTHONPATH"] = str(tree)  # before the editable install's finder
    return [sys.executable, "-c", STUB, *args], env


def imported_from(tree: Path, env: dict[str, str]) -> str:
    probe = "import services.status as s; print(s.__file__)"
    return subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(tree)},
                          check=True, capture_output=True, text=True, cwd="/").stdout.strip()


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, cwd="/")
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]}: exit {res.returncode}: {res.stderr.strip()}")
    return seconds, json.loads(res.stdout) if res.stdout.strip() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="main")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=10_000)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    inst = Install(animes=1)
    ctx = zmq.Context()
    procs: list[subprocess.Popen] = []
    ok = False
    with tempfile.TemporaryDirectory(prefix="adb-base-") as tmp:
        try:
            baseline = unpack(args.baseline_rev, Path(tmp))
            insert_simple_queue(inst.db_path, args.jobs)
            procs.append(subprocess.Popen([str(BIN / "anime-disk-watcher"), "-c", str(inst.config_path)],
                                          env=inst.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=open(inst.root / "disk-watcher.log", "ab")))
            dispatcher, _ = start_dispatcher(inst, ctx, load_config(inst.config_path).zmq.status)
            procs.append(dispatcher)
            sides = {"this tree, console script": side(inst, None),
                     "this tree, python -c": side(inst, REPO),
                     f"baseline {args.baseline_rev}, python -c": side(inst, baseline),
                     "python -c \"import zmq\" (the floor)": ([sys.executable, "-c", ZMQ_FLOOR],
                                                            inst.env())}
            for tree in (REPO, baseline):
                compile_tree(tree)
                print(f"imports {imported_from(tree, inst.env())}")
            names = list(sides)
            times: dict[str, list[float]] = {n: [] for n in names}
            shapes = set()
            for _ in range(2):  # warm the page cache
                for name in names:
                    timed(*sides[name])
            for r in range(args.rounds):
                k = r % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    seconds, doc = timed(*sides[name])
                    times[name].append(seconds)
                    if doc:
                        shapes.add(tuple(sorted(doc)))
            ours, base = median(times[names[1]]), median(times[names[2]])
            script = median(times[names[0]])
            rows = [[n, f"{median(t) * 1000:.1f} ms", f"{min(t) * 1000:.1f} / {max(t) * 1000:.1f} ms"]
                    for n, t in times.items()]
            print(table(["anime-status --json", f"median of {args.rounds}", "best / worst"], rows))
            print(f"\nthis tree / baseline (python -c, medians): {ours / base:.3f}")
            floor = median(times[names[3]])
            floor_ok = script / floor < FLOOR_GOAL_RATIO
            print(f"console script / python -c \"import zmq\" (medians): {script / floor:.3f} "
                  f"(goal < {FLOOR_GOAL_RATIO:g}): {verdict(floor_ok)}")
            ok = script * 1000 < STATUS_GOAL_MS and floor_ok
            print(f"console script {script * 1000:.1f} ms against the goal of {STATUS_GOAL_MS:g} ms: "
                  f"{verdict(script * 1000 < STATUS_GOAL_MS)}; the same top-level keys on both sides: "
                  f"{len(shapes) == 1}")
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    stop(p)
            ctx.destroy(0)
            inst.finish(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    sys.exit(main())
