"""Scale of the queue: the dispatcher with 100,000 jobs in the database (run by hand).

    python bench/queue_scale.py [--jobs 100000] [--handout 3000] [--fake-workers 5]
                                [--priorities] [--claims 2000]

Inserts the jobs directly with sqlite3 in the contract schema (series of 20
episodes; 70 % queued, 25 % downloaded, 5 % failed; 1 % of the series without a
cached selection) and runs the real disk-watcher and dispatcher processes:

* start: from spawning ``anime-dispatcher`` to its first status answer; the
  first start also adds the project's columns and indexes, then restarts;
* status: ``anime-status --json`` wall time (a whole process: interpreter,
  imports, one request), and the request round trip from a DEALER kept in this
  process, idle and while jobs are being handed out;
* hand-out: fake workers over ZeroMQ with shared/protocol.py messages, each job
  the whole exchange (ready -> assign, finished -> commit, landed -> ack), so
  every job costs the dispatcher a claim and a landing in the database.

* claim: ``SqlJobStore.claim_next`` alone, in this process, ``--claims`` times on a
  copy of the filled database (each claimed job then landed, timed apart: the cost of
  the claim's two indexes on every write), against the claim of before priorities
  (``ORDER BY id``, without those indexes: the baseline) on another copy in the same run. ``--priorities`` mixes priorities in
  first (10 % of the series high, 10 % low, 1 % of the jobs at a number of their own).

Goals: status under 100 ms, start under 2 s; hand-out compared with the spawn
limit of these machines (about 600 short commands/s with 5 in parallel); a claim
with priorities no dearer than about twice the old one, and well under a millisecond.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (compile_project, stop, BIN, Install, insert_jobs, machine, median, percentile, table,  # noqa: E402
                    title_of, verdict)
from services.dispatcher import store as job_store  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.protocol import (JobAck, JobAssign, JobCommit, JobFinished, JobLanded,  # noqa: E402
                             StatusReply, StatusRequest, WorkerReady, decode, encode)

START_GOAL_S = 2.0
STATUS_GOAL_MS = 100.0
SPAWN_LIMIT_PER_S = 600.0
PER_ANIME = 20


def fill(db_path: Path, jobs: int) -> dict[str, int]:
    rows, stages = [], {"queued": 0, "downloaded": 0, "failed": 0}
    animes = (jobs + PER_ANIME - 1) // PER_ANIME
    for i in range(jobs):
        anime, ep = i // PER_ANIME + 1, i % PER_ANIME + 1
        r = (i * 7919) % 100  # a fixed, well mixed pattern
        stage = "downloaded" if r < 25 else "failed" if r < 30 else "queued"
        stages[stage] += 1
        path = f"/srv/anime/videos/{anime}/episodes/ep{ep:03d}.mkv" if stage == "downloaded" else None
        rows.append((i + 1, anime, title_of(anime), ep, stage, path,
                     300_000_000 + r if stage == "downloaded" else None))
    selections = [(a, 1, title_of(a), "high") for a in range(1, animes + 1) if a % 100 != 7]
    insert_jobs(db_path, rows, selections)
    return stages


# The claim before priorities (main before issue 18): the baseline of the claim figures.
OLD_CLAIM_SQL = """
UPDATE jobs SET stage = 'downloading', attempt = attempt + 1, lease_owner = ?,
       lease_deadline = ?, started_at = ?
WHERE id = (
    SELECT j.id FROM jobs j JOIN anime_selection_cache s ON s.mal_id = j.anime_id
    WHERE j.stage = 'queued' AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= ?)
    ORDER BY j.id LIMIT 1)
RETURNING id, anime_id, anime_title, episode, attempt, retry_count, max_retries
"""
CLAIM_GOAL_MS = 1.0


def upgrade(db_path: Path) -> None:
    """Add the dispatcher's columns and indexes (as its first start does), then fold the WAL
    into the file so that a copy of the file is the whole database."""
    store = job_store.SqlJobStore(db_path)
    store.open()
    store.close()
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def mix_priorities(db_path: Path, seed: int) -> dict[int, int]:
    """10 % of the series high, 10 % low, 1 % of the jobs at a priority of their own."""
    rng = random.Random(seed)
    conn = sqlite3.connect(db_path)
    try:
        animes = [a for (a,) in conn.execute("SELECT DISTINCT anime_id FROM jobs")]
        with conn:
            for a in animes:
                r = rng.random()
                if r < 0.2:
                    conn.execute("UPDATE jobs SET priority = ? WHERE anime_id = ?",
                                 (10 if r < 0.1 else -10, a))
            ids = [i for (i,) in conn.execute("SELECT id FROM jobs")]
            for i in rng.sample(ids, max(1, len(ids) // 100)):
                conn.execute("UPDATE jobs SET priority = ? WHERE id = ?", (rng.randint(-50, 50), i))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return dict(conn.execute("SELECT priority, COUNT(*) FROM jobs WHERE stage = 'queued' "
                                 "GROUP BY priority"))
    finally:
        conn.close()


class OldClaimStore(job_store.SqlJobStore):
    """The store with the claim of before priorities (same transaction, same selection read)."""

    def claim_next(self, owner: str, deadline: float, now: float):
        with self.db.atomic():
            row = self.db.execute_sql(OLD_CLAIM_SQL, [owner, deadline, now, now]).fetchone()
            return self._with_selection(row) if row is not None else None


def claim_times(db_path: Path, claims: int, old: bool) -> tuple[list[float], list[float], list[tuple]]:
    """Seconds per claim_next and per landing (mark_downloaded) of what it claimed; ``old``:
    the claim of before priorities, on a database without the two indexes it added (what
    main was). And the (job, anime, episode) handed out, in order."""
    store = (OldClaimStore if old else job_store.SqlJobStore)(db_path)
    store.open()
    if old:
        for index in ("idx_jobs_claim", "idx_jobs_anime_claim"):
            store.db.execute_sql(f"DROP INDEX {index}")
    claimed, landed, order = [], [], []
    try:
        for n in range(claims):
            now = 1000.0 + n
            t0 = time.perf_counter()
            job = store.claim_next("bench/claim", 1e12, now)
            claimed.append(time.perf_counter() - t0)
            if job is None:
                break
            order.append((job.id, job.anime_id, job.episode))
            t0 = time.perf_counter()
            store.mark_downloaded(job.id, job.attempt, f"/v/{job.id}.mkv", 1, None, now)
            landed.append(time.perf_counter() - t0)
        sql, params = (OLD_CLAIM_SQL, ["o", 0, 0, 0]) if old else (store._claim_sql, ["o", 0, 0, 0, 0])
        plan = store.db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    finally:
        store.close()
    if not old:
        print("claim plan: " + "; ".join(str(row[-1]) for row in plan))
    return claimed, landed, order


def claim_bench(db_path: Path, claims: int) -> list[list[str]]:
    """The claim with priorities against the old one, each on its own copy of the database."""
    results = {}
    for old in (True, False):
        copy = db_path.with_name(f"claim-{len(results)}.db")
        shutil.copy(db_path, copy)
        results[old] = claim_times(copy, claims, old)
        copy.unlink()
    (old_claim, old_land, _), (new_claim, new_land, order) = results[True], results[False]
    check_order(db_path, order)
    ratio = median(new_claim) / median(old_claim)

    def ms(values: list[float]) -> str:
        return f"{median(values) * 1000:.3f} / {percentile(values, 99) * 1000:.3f} ms"
    return [
        [f"claim, before priorities (p50 / p99 of {len(old_claim)})", ms(old_claim), "baseline", "1.00"],
        [f"claim, with priorities (p50 / p99 of {len(new_claim)})", ms(new_claim),
         f"p50 < {CLAIM_GOAL_MS:g} ms", f"{ratio:.2f} x old {verdict(median(new_claim) * 1000 < CLAIM_GOAL_MS)}"],
        [f"landing write, before the claim indexes (p50 / p99)", ms(old_land), "baseline", "1.00"],
        [f"landing write, with them (p50 / p99)", ms(new_land), "",
         f"{median(new_land) / median(old_land):.2f} x old"],
    ]


def check_order(db_path: Path, order: list[tuple]) -> None:
    """What was handed out went by priority, never up again (the queue only shrinks)."""
    conn = sqlite3.connect(db_path)
    try:
        priority = dict(conn.execute("SELECT id, priority FROM jobs"))
    finally:
        conn.close()
    seen = [priority[job_id] for job_id, _, _ in order]
    if any(b > a for a, b in zip(seen, seen[1:])):
        raise RuntimeError("the claims did not go by priority")


class StatusClient:
    """A DEALER on the status endpoint, kept open: the request round trip alone."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.connect(endpoint)

    def ask(self, timeout: float) -> tuple[float, dict] | None:
        t0 = time.perf_counter()
        self.sock.send_multipart(encode(StatusRequest()))
        if not self.sock.poll(timeout * 1000):
            return None
        reply = decode(self.sock.recv_multipart())
        assert isinstance(reply, StatusReply)
        return time.perf_counter() - t0, reply.status

    def close(self) -> None:
        self.sock.close(0)


def start_dispatcher(inst: Install, ctx: zmq.Context, endpoint: str) -> tuple[subprocess.Popen, float]:
    """Spawn the dispatcher; seconds until its first status answer."""
    client = StatusClient(ctx, endpoint)
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "anime-dispatcher"), "-c", str(inst.config_path)],
                                env=inst.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(inst.root / "dispatcher.log", "ab"))
        # The request waits in the DEALER's queue until the endpoint exists and connects.
        answer = client.ask(timeout=60)
        if answer is None:
            raise RuntimeError(f"no status answer within 60 s; see {inst.root / 'dispatcher.log'}")
        return proc, time.perf_counter() - t0
    finally:
        client.close()


def status_latencies(ctx: zmq.Context, endpoint: str, n: int, pause: float = 0.0,
                     until: threading.Event | None = None) -> list[float]:
    client = StatusClient(ctx, endpoint)
    out = []
    try:
        while len(out) < n and not (until is not None and until.is_set()):
            answer = client.ask(timeout=10)
            if answer is None:
                raise RuntimeError("status request unanswered for 10 s")
            out.append(answer[0])
            if pause:
                time.sleep(pause)
    finally:
        client.close()
    return out


def cli_latencies(inst: Install, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = subprocess.run([str(BIN / "anime-status"), "-c", str(inst.config_path), "--json"],
                             env=inst.env(), capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise RuntimeError(f"anime-status: exit {res.returncode}: {res.stderr.strip()}")
    return out


def hand_out(ctx: zmq.Context, endpoint: str, workers: int, jobs: int) -> tuple[float, int]:
    """Fake workers run ``jobs`` whole job exchanges; returns (seconds, jobs done)."""
    socks = []
    poller = zmq.Poller()
    for w in range(workers):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTING_ID, f"fw{w}/bench{w}".encode())
        s.connect(endpoint)
        socks.append(s)
        poller.register(s, zmq.POLLIN)
    seq = {s: 0 for s in socks}
    wid = {s: f"fw{socks.index(s)}" for s in socks}
    done = 0
    t0 = time.perf_counter()
    for s in socks:
        s.send_multipart(encode(WorkerReady(worker_id=wid[s], session=f"bench{socks.index(s)}",
                                            seq=0)))
    last_progress = time.monotonic()
    try:
        while done < jobs:
            events = dict(poller.poll(1000))
            if not events:
                if time.monotonic() - last_progress > 15:
                    raise RuntimeError(f"no job handed out for 15 s ({done} done)")
                for s in socks:  # re-send the credit, as a real idle worker does
                    s.send_multipart(encode(WorkerReady(worker_id=wid[s],
                                                        session=f"bench{socks.index(s)}", seq=seq[s])))
                continue
            last_progress = time.monotonic()
            for s in events:
                session = f"bench{socks.index(s)}"
                msg = decode(s.recv_multipart())
                if isinstance(msg, JobAssign):
                    s.send_multipart(encode(JobFinished(
                        worker_id=wid[s], session=session, job_id=msg.job_id, attempt=msg.attempt,
                        ext=".mkv", size_bytes=300_000_000)))
                elif isinstance(msg, JobCommit):
                    s.send_multipart(encode(JobLanded(
                        worker_id=wid[s], session=session, job_id=msg.job_id, attempt=msg.attempt,
                        video_path=msg.video_path, size_bytes=300_000_000)))
                elif isinstance(msg, JobAck):
                    done += 1
                    seq[s] += 1
                    s.send_multipart(encode(WorkerReady(worker_id=wid[s], session=session,
                                                        seq=seq[s])))
        return time.perf_counter() - t0, done
    finally:
        for s in socks:
            s.close(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--handout", type=int, default=3000, help="jobs the fake workers run")
    ap.add_argument("--fake-workers", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--priorities", action="store_true",
                    help="mix priorities into the queue (10%% of series high, 10%% low, 1%% of jobs own)")
    ap.add_argument("--claims", type=int, default=2000, help="claims timed in-process (0: none)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the priority mix")
    args = ap.parse_args()
    compile_project()
    print(f"machine: {machine()}")
    inst = Install(animes=1)
    ctx = zmq.Context()
    procs: list[subprocess.Popen] = []
    ok = False
    try:
        t0 = time.perf_counter()
        stages = fill(inst.db_path, args.jobs)
        print(f"{args.jobs} jobs inserted in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} {v}" for k, v in stages.items()))
        t0 = time.perf_counter()
        upgrade(inst.db_path)
        upgraded = time.perf_counter() - t0
        if args.priorities:
            seed = args.seed if args.seed is not None else random.randrange(2**32)
            mix = mix_priorities(inst.db_path, seed)
            print(f"priorities mixed in (seed {seed}): queued by priority "
                  + ", ".join(f"{p}: {n}" for p, n in sorted(mix.items(), reverse=True)
                              if n > 100 or p in (10, 0, -10)))
        claim_rows = claim_bench(inst.db_path, args.claims) if args.claims > 0 else []
        config = load_config(inst.config_path)
        endpoint = config.zmq.status
        procs.append(subprocess.Popen([str(BIN / "anime-disk-watcher"), "-c", str(inst.config_path)],
                                      env=inst.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=open(inst.root / "disk-watcher.log", "ab")))

        dispatcher, first_start = start_dispatcher(inst, ctx, endpoint)
        starts = []
        for _ in range(args.restarts):
            stop(dispatcher)
            dispatcher, seconds = start_dispatcher(inst, ctx, endpoint)
            starts.append(seconds)
        procs.append(dispatcher)
        start = median(starts)

        status_latencies(ctx, endpoint, 5)  # warm up
        idle = status_latencies(ctx, endpoint, 200, pause=0.005)
        cli = cli_latencies(inst, 10)

        busy: list[float] = []
        finished = threading.Event()
        prober = threading.Thread(target=lambda: busy.extend(
            status_latencies(ctx, endpoint, 10**9, pause=0.02, until=finished)))
        prober.start()
        try:
            seconds, done = hand_out(ctx, config.zmq.dispatcher, args.fake_workers, args.handout)
        finally:
            finished.set()
            prober.join()
        rate = done / seconds
        answer = StatusClient(ctx, endpoint)
        try:
            status = answer.ask(10)[1]
        finally:
            answer.close()
        q = status["queue"]

        rows = [
            ["schema upgrade (the dispatcher's columns + indexes)", f"{upgraded:.3f} s", "", ""],
            ["dispatcher start, first", f"{first_start:.3f} s", "", ""],
            [f"dispatcher start (median of {len(starts)} restarts)", f"{start:.3f} s",
             f"< {START_GOAL_S:g} s", f"{start / START_GOAL_S:.2f} {verdict(start < START_GOAL_S)}"],
            ["anime-status --json, whole process (median of 10)", f"{median(cli) * 1000:.1f} ms",
             f"< {STATUS_GOAL_MS:g} ms",
             f"{median(cli) * 1000 / STATUS_GOAL_MS:.2f} {verdict(median(cli) * 1000 < STATUS_GOAL_MS)}"],
            ["anime-status --json, worst of 10", f"{max(cli) * 1000:.1f} ms", "", ""],
            ["status round trip, idle (p50 / p99 of 200)",
             f"{median(idle) * 1000:.2f} / {percentile(idle, 99) * 1000:.2f} ms", f"< {STATUS_GOAL_MS:g} ms",
             f"{percentile(idle, 99) * 1000 / STATUS_GOAL_MS:.3f} "
             f"{verdict(percentile(idle, 99) * 1000 < STATUS_GOAL_MS)}"],
            [f"status round trip, handing out (p50 / p99 / max of {len(busy)})",
             f"{median(busy) * 1000:.2f} / {percentile(busy, 99) * 1000:.2f} / {max(busy) * 1000:.2f} ms",
             f"< {STATUS_GOAL_MS:g} ms",
             f"{max(busy) * 1000 / STATUS_GOAL_MS:.3f} {verdict(max(busy) * 1000 < STATUS_GOAL_MS)}"],
            [f"jobs handed out and landed ({args.fake_workers} fake workers, {done} jobs)",
             f"{rate:.0f} jobs/s", f"spawn limit ~{SPAWN_LIMIT_PER_S:g}/s",
             f"{rate / SPAWN_LIMIT_PER_S:.2f}"],
        ] + claim_rows
        print(table(["figure", "value", "goal / baseline", "ratio"], rows))
        print(f"\nafter the run the status reports: queued {q['queued']}, downloaded {q['downloaded']}, "
              f"failed {q['failed']}, waiting for a selection {q['waiting_for_selection']}")
        ok = (start < START_GOAL_S and median(cli) * 1000 < STATUS_GOAL_MS
              and max(busy) * 1000 < STATUS_GOAL_MS)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                stop(p)
        ctx.destroy(0)
        inst.finish(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
