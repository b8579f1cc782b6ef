"""Exact stage counts at a million jobs: three ways, measured side by side (run by hand).

    python bench/counts_strategies.py [--jobs 1000000] [--ops 3000]

The queue of bench/queue_scale.py (70 % queued, 25 % downloaded, 5 % failed), then:

* the pass: what one pass over the queue costs (the stage counts, the queue detail, the
  recent failures, the series without a selection), the dispatcher's own store queries;
* a pass on a thread (what the dispatcher does, counts.py ThreadPasses): the longest
  gap of a loop that goes on claiming and landing jobs on its own connection while the
  pass runs, against the same loop with the pass inline (in the loop);
* counting triggers: a table of counts kept by triggers on jobs (insert, delete, update
  of stage): the cost of a claim and a landing with and without them, and of a
  neighbour's bulk insert of 10,000 jobs (anime-enqueue, the selector), and reading the
  counts. Triggers would live in the shared database: every neighbour's write pays them,
  and they give only the stage counts (the queue detail needs the selection table and
  the clock: a pass all the same).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import compile_project, machine, table  # noqa: E402
from queue_scale import fill  # noqa: E402
from services.dispatcher.store import QueueReader, SqlJobStore, tally  # noqa: E402

TRIGGERS = """
CREATE TABLE IF NOT EXISTS job_stage_counts (stage TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR REPLACE INTO job_stage_counts SELECT stage, COUNT(*) FROM jobs GROUP BY stage;
CREATE TRIGGER IF NOT EXISTS jobs_count_insert AFTER INSERT ON jobs BEGIN
  INSERT INTO job_stage_counts VALUES (NEW.stage, 1)
    ON CONFLICT(stage) DO UPDATE SET n = n + 1; END;
CREATE TRIGGER IF NOT EXISTS jobs_count_delete AFTER DELETE ON jobs BEGIN
  UPDATE job_stage_counts SET n = n - 1 WHERE stage = OLD.stage; END;
CREATE TRIGGER IF NOT EXISTS jobs_count_update AFTER UPDATE OF stage ON jobs
  WHEN OLD.stage IS NOT NEW.stage BEGIN
  UPDATE job_stage_counts SET n = n - 1 WHERE stage = OLD.stage;
  INSERT INTO job_stage_counts VALUES (NEW.stage, 1)
    ON CONFLICT(stage) DO UPDATE SET n = n + 1; END;
"""
NO_TRIGGERS = """
DROP TRIGGER IF EXISTS jobs_count_insert; DROP TRIGGER IF EXISTS jobs_count_delete;
DROP TRIGGER IF EXISTS jobs_count_update; DROP TABLE IF EXISTS job_stage_counts;
"""


def claim_and_land(store: SqlJobStore, ops: int) -> list[float]:
    """Seconds of each claim and each landing, ``ops`` jobs."""
    now = time.time()
    out = []
    for _ in range(ops):
        t0 = time.perf_counter()
        job = store.claim_next("bench/1", now + 60, now)
        t1 = time.perf_counter()
        store.mark_downloaded(job.id, job.attempt, "/x.mkv", 1000, None, now)
        out += [t1 - t0, time.perf_counter() - t1]
    return out


def longest_gap_while(store: SqlJobStore, run_pass, background: bool) -> tuple[float, float]:
    """(longest gap between two loop steps, pass seconds): the loop claims and lands jobs
    while ``run_pass`` runs, on a thread or inline between two steps."""
    gaps: list[float] = []
    done = threading.Event()
    took = [0.0]

    def work() -> None:
        t0 = time.perf_counter()
        run_pass()
        took[0] = time.perf_counter() - t0
        done.set()

    now = time.time()
    if background:
        threading.Thread(target=work).start()
    last = time.perf_counter()
    steps = 0
    while not done.is_set() or steps < 20:
        if not background and steps == 10:
            work()
        job = store.claim_next("bench/1", now + 60, now)
        store.mark_downloaded(job.id, job.attempt, "/x.mkv", 1000, None, now)
        t = time.perf_counter()
        gaps.append(t - last)
        last = t
        steps += 1
    return max(gaps), took[0]


def bulk_insert(db_path: Path, rows: int, first_id: int) -> float:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO jobs (id, anime_id, anime_title, episode) VALUES (?, ?, 'B', ?)",
                         ((first_id + i, 900_000 + i // 20, i % 20 + 1) for i in range(rows)))
        conn.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        conn.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--ops", type=int, default=3000, help="claims and landings per side")
    args = ap.parse_args()
    compile_project()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="adb-counts-") as tmp:
        db_path = Path(tmp) / "jobs.db"
        fill(db_path, args.jobs)
        store = SqlJobStore(db_path)
        store.open()  # adds the columns and indexes, as the dispatcher's first start
        execute = store.db.execute_sql
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            tally(execute, time.time(), None, True)
            passes.append(time.perf_counter() - t0)
        one_pass = statistics.median(passes)
        counts_only = []
        for _ in range(3):
            t0 = time.perf_counter()
            execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage", []).fetchall()
            counts_only.append(time.perf_counter() - t0)

        reader = QueueReader(db_path)

        def threaded_pass() -> None:
            reader.pin()
            reader.tally(time.time(), True)

        inline_gap, inline_took = longest_gap_while(store, lambda: tally(execute, time.time(), None, True),
                                                    background=False)
        thread_gap, thread_took = longest_gap_while(store, threaded_pass, background=True)

        plain = claim_and_land(store, args.ops)
        insert_plain = bulk_insert(db_path, 10_000, 2_000_000)
        store.db.connection().executescript(TRIGGERS)
        with_triggers = claim_and_land(store, args.ops)
        insert_triggers = bulk_insert(db_path, 10_000, 2_100_000)
        t0 = time.perf_counter()
        trigger_counts = {stage: n for stage, n in
                          execute("SELECT stage, n FROM job_stage_counts", []).fetchall() if n}
        read_triggers = time.perf_counter() - t0
        truth = dict(execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage", []).fetchall())
        store.db.connection().executescript(NO_TRIGGERS)
        reader.close()
        store.close()

    p_plain, p_trig = statistics.median(plain), statistics.median(with_triggers)
    rows = [
        ["one pass (counts, detail, failures, series without a selection), median of 3",
         ms(one_pass), "", ""],
        ["  of which SELECT stage, COUNT(*) ... GROUP BY stage", ms(statistics.median(counts_only)), "", ""],
        ["longest gap of the loop, pass inline", ms(inline_gap), f"pass {ms(inline_took)}", ""],
        ["longest gap of the loop, pass on a thread", ms(thread_gap), f"pass {ms(thread_took)}",
         f"{thread_gap / inline_gap:.3f} of inline"],
        [f"claim or landing, median of {len(plain)}: no triggers / counting triggers",
         f"{p_plain * 1e6:.0f} / {p_trig * 1e6:.0f} us", "", f"{p_trig / p_plain:.2f}x"],
        ["neighbour inserts 10,000 jobs: no triggers / counting triggers",
         f"{ms(insert_plain)} / {ms(insert_triggers)}", "", f"{insert_triggers / insert_plain:.2f}x"],
        ["reading the trigger-kept counts", ms(read_triggers), "", ""],
        ["trigger-kept counts equal GROUP BY", str(trigger_counts == truth), "", ""],
    ]
    print(table(["figure", "value", "baseline", "ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
