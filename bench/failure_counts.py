"""What the failure classes cost the counts pass, at 100,000 jobs (run by hand).

    python bench/failure_counts.py [--jobs 100000] [--rounds 30]

The dispatcher re-reads its counts (stage counts, queue detail, recent failures) after
every change, at most once a second (services/dispatcher/counts.py). Issue 18 adds two
aggregates to the queue detail (jobs waiting for a release, their next re-check) and one
query (the anime needing a selection review). Baseline, measured in the same run on the
same database: the queue detail as it was before, without the review query.

The database: series of 20 episodes, 70 % queued (2 % of all jobs waiting for a
release), 25 % downloaded, 5 % failed (a fifth of those on their selection); 1 % of the
series without a cached selection. Interleaved rounds, medians.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import insert_jobs, machine, median, table, title_of  # noqa: E402
from services.dispatcher.store import SqlJobStore  # noqa: E402

PER_ANIME = 20
# The queue detail before issue 18 (store.py at 6f8dd81), the baseline.
OLD_DETAIL = (
    "SELECT SUM(s.mal_id IS NULL), "
    "SUM(s.mal_id IS NOT NULL AND j.next_attempt_at > ?), "
    "MIN(CASE WHEN s.mal_id IS NOT NULL THEN j.next_attempt_at END), "
    "COUNT(*) "
    "FROM jobs j LEFT JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
    "WHERE j.stage = 'queued'")


def fill(db: Path, jobs: int) -> None:
    rows = []
    for i in range(jobs):
        anime, ep = i // PER_ANIME + 1, i % PER_ANIME + 1
        r = (i * 7919) % 100
        stage = "downloaded" if r < 25 else "failed" if r < 30 else "queued"
        rows.append((i + 1, anime, title_of(anime), ep, stage, None,
                     300_000_000 if stage == "downloaded" else None))
    animes = (jobs + PER_ANIME - 1) // PER_ANIME
    insert_jobs(db, rows, [(a, 1, title_of(a), "high") for a in range(1, animes + 1) if a % 100 != 7])
    store = SqlJobStore(db)
    store.open()  # adds the columns, as the dispatcher does at start
    store.close()
    now = time.time()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE jobs SET unreleased_since = ?, next_attempt_at = ?, "
                     "failure_class = 'not_released' WHERE stage = 'queued' AND id % 50 = 0",
                     [now, now + 6 * 3600])
        conn.execute("UPDATE jobs SET failure_class = 'selection', finished_at = ? "
                     "WHERE stage = 'failed' AND id % 5 = 0", [now])
    conn.close()


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fc-") as tmp:
        db = Path(tmp) / "jobs.db"
        fill(db, args.jobs)
        store = SqlJobStore(db)
        store.open()
        now = time.time()

        def baseline() -> None:
            store.stage_counts()
            store.db.execute_sql(OLD_DETAIL, [now]).fetchone()
            store.recent_failures()

        def with_classes() -> None:
            store.stage_counts()
            store.queue_detail(now)
            store.recent_failures()
            store.selection_review()

        def review() -> None:
            store.selection_review()

        results: dict[str, list[float]] = {"baseline": [], "with classes": [], "review alone": []}
        for fn in (baseline, with_classes):  # warm the page cache
            fn()
        for _ in range(args.rounds):
            results["baseline"].append(timed(baseline))
            results["with classes"].append(timed(with_classes))
            results["review alone"].append(timed(review))
        detail = store.queue_detail(now)
        store.close()
    base = median(results["baseline"])
    print(f"machine: {machine()}")
    print(f"{args.jobs} jobs, {args.rounds} interleaved rounds; waiting for a release: "
          f"{detail['waiting_for_release']}, runnable: {detail['runnable']}")
    print(table(["counts pass", "median ms", "ratio to baseline"],
                [[name, f"{median(v):.1f}", f"{median(v) / base:.2f}"]
                 for name, v in results.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
