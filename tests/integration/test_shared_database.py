"""jobs.db shared with neighbours (issue 21 §1, §4, §5): the real processes under the
real supervisord, the real SQLite file, and a neighbour process that takes the write
lock with BEGIN IMMEDIATE for longer than any busy timeout, as a transcriber's batch
update or anime-selector does; a neighbour that changes a job the dispatcher holds;
two live workers with one id; concurrent anime-enqueue.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from shared import layout
from shared.models import CONTRACT_DDL
from tests.integration.test_crash_safety import pid_alive
from tests.integration.test_remote_workers import machines  # noqa: F401 (a fixture)
from tests.system import System, WaitTimeout, wait_for

pytestmark = pytest.mark.slow

# A neighbour: holds the write lock once for each of HOLDS seconds (or until the file
# GO.release.<n> appears); before each round after the first it waits for the file GO.<n>
# (so a test chooses the moments). Each lock and release is a line in EVENTS.
NEIGHBOUR = r"""
import json, os, sqlite3, sys, time
db, holds, go, events = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
conn = sqlite3.connect(db, timeout=60, isolation_level=None)
def note(event):
    with open(events, "a") as f:
        f.write(json.dumps({"event": event, "at": time.time()}) + "\n")
for n, hold in enumerate(float(h) for h in holds.split(",")):
    while n and not os.path.exists(f"{go}.{n}"):
        time.sleep(0.05)  # sync-ok: the neighbour program polls for its go file
    conn.execute("BEGIN IMMEDIATE")
    note("locked")
    until = time.monotonic() + hold
    while time.monotonic() < until and not os.path.exists(f"{go}.release.{n}"):
        time.sleep(0.05)  # sync-ok: it holds the lock until told or its time is up
    conn.execute("COMMIT")
    note("released")
"""


class Neighbour:
    def __init__(self, system: System, *holds: float) -> None:
        self.events = system.root / "neighbour.jsonl"
        self.go = system.root / "neighbour-go"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR, str(system.db_path), ",".join(map(str, holds)),
             str(self.go), str(self.events)], stdin=subprocess.DEVNULL, start_new_session=True)
        system.processes.append(self.proc)

    def seen(self, event: str) -> int:
        if not self.events.exists():
            return 0
        return sum(json.loads(line)["event"] == event for line in self.events.read_text().splitlines())

    def lock_again(self, n: int) -> None:
        self.go.with_name(f"{self.go.name}.{n}").touch()

    def release(self, n: int) -> None:
        self.go.with_name(f"{self.go.name}.release.{n}").touch()


def upstream_database(system: System, animes: dict[int, int]) -> None:
    """jobs.db as the upstream tools create it: the contract's tables, rollback journal."""
    system.db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(system.db_path)
    for ddl in CONTRACT_DDL:
        conn.execute(ddl)
    for mal_id, episodes in animes.items():
        conn.execute("INSERT INTO anime_selection_cache VALUES (?, 1, ?, 'high')",
                     (mal_id, f"Show {mal_id} (site)"))
        conn.executemany("INSERT INTO jobs (anime_id, anime_title, episode) VALUES (?, ?, ?)",
                         [(mal_id, f"Show {mal_id}", ep) for ep in range(1, episodes + 1)])
    conn.commit()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


def catalog(system: System, animes: dict[int, int], duration: float, size: int = 3000,
            behaviour: dict[tuple[int, int], dict] | None = None) -> None:
    cat = {"defaults": {"size": size, "duration": duration}, "anime": []}
    for mal_id, episodes in animes.items():
        per_episode = {str(ep): (behaviour or {}).get((mal_id, ep), {"size": size, "duration": duration})
                       for ep in range(1, episodes + 1)}
        system.add_anime(cat, f"Show {mal_id}", [{"title": f"Show {mal_id} (site)",
                                                  "episodes": episodes,
                                                  "episode_behaviour": per_episode}])
    system.write_catalog(cat)


def status(system: System, *args: str) -> subprocess.CompletedProcess:
    return system.run("anime-status", "-c", str(system.config_path), "--timeout", "2", *args,
                      timeout=30)


def spawned(system: System, program: str) -> int:
    """How many times supervisord started ``program``."""
    return len(re.findall(rf"spawned: '{re.escape(program)}'", system.log("supervisord")))


def each_episode_once(system: System, animes: dict[int, int]) -> None:
    """Every job downloaded by its first attempt, one ani-cli run and one file each."""
    jobs = system.jobs()
    assert len(jobs) == sum(animes.values())
    for job in jobs:
        assert (job["stage"], job["attempt"], job["retry_count"]) == ("downloaded", 1, 0), job
        assert Path(job["video_path"]).is_file(), job
    runs = Counter((r["query"], r["episode"]) for r in system.sim_runs("start"))
    assert len(runs) == len(jobs) and set(runs.values()) == {1}, runs
    videos = [p for p in system.storage_files() if "/videos/" in str(p) and p.suffix == ".mp4"]
    assert len(videos) == len(jobs)


# --- a neighbour holding the write lock, at start and during the run ------------------------

@pytest.mark.timeout(120)
def test_a_neighbour_holding_the_lock_at_start_and_during_the_run_changes_nothing(make_system):
    """On a rollback-journal database locked at start (journal_mode=wal is refused at once
    then), and locked again while downloads run, for longer than the leases and than
    SQLite's default busy timeout (5 s): the dispatcher waits, keeps serving, never exits;
    every job ends exactly once and --exit-when-done says so."""
    system = make_system()
    animes = {11: 6}
    upstream_database(system, animes)
    catalog(system, animes, duration=2.0)
    neighbour = Neighbour(system, 60, 6.5)  # then 6.5 s > lease_seconds (6) > 5 s
    wait_for(lambda: neighbour.seen("locked") == 1, 10, "the neighbour to take the lock")
    launcher = system.spawn("anime-downloader", "-c", str(system.config_path), "-w", "3",
                            "--exit-when-done")
    system.wait_logged("dispatcher", "waiting for the database", timeout=20)
    busy = json.loads(wait_for(lambda: status(system, "--json").stdout, 10,
                               "anime-status to answer while the database is locked"))
    assert busy["database"]["busy_since"] is not None, busy["database"]
    assert "database busy since" in status(system).stdout
    neighbour.release(0)

    # Released: the dispatcher starts; the second lock comes while downloads run.
    wait_for(lambda: len(system.sim_runs("start")) >= 3, 20, "three downloads running")
    neighbour.lock_again(1)
    wait_for(lambda: neighbour.seen("locked") == 2, 10, "the neighbour to lock again")
    locked_at = time.monotonic()

    def busy_and_serving():
        result = status(system, "--json")
        doc = json.loads(result.stdout) if result.returncode == 0 else {}
        return doc if (doc.get("database") or {}).get("busy_since") else None

    doc = wait_for(busy_and_serving, 6, "anime-status to show the database busy during the run")
    assert time.monotonic() - locked_at < 6.5 and neighbour.seen("released") == 1
    assert all(w["last_seen_seconds"] < 3 for w in doc["workers"]), doc["workers"]  # heard
    assert launcher.wait(timeout=60) == 0, system.output(launcher)
    assert neighbour.seen("released") == 2
    assert "summary: downloaded=6, failed=0, still_queued=0" in system.output(launcher)
    each_episode_once(system, animes)
    dispatcher_log = system.log("dispatcher")
    assert spawned(system, "dispatcher") == 1, "supervisord restarted the dispatcher"
    assert dispatcher_log.count("dispatcher started") == 1
    assert dispatcher_log.count("waiting for the database") == 1
    assert "Lease lost" not in dispatcher_log and "Traceback" not in dispatcher_log
    assert system.query("PRAGMA journal_mode")[0][0] == "wal"


# --- a neighbour changes a job the dispatcher holds --------------------------------------------

def test_a_job_a_neighbour_changes_while_it_downloads_is_left_to_it(make_system):
    system = make_system()
    animes = {21: 3}
    catalog(system, animes, duration=0.3,
            behaviour={(21, 1): {"size": 200_000, "duration": 20, "chunk": 4096}})
    system.enqueue(21, "Show 21", [1, 2, 3], selected_index=1)
    system.start_supervisord(2)
    wait_for(lambda: any(r["episode"] == 1 for r in system.sim_runs("start")), 20,
             "ani-cli downloading episode 1")
    ani_cli = next(r["pid"] for r in system.sim_runs("start") if r["episode"] == 1)
    conn = sqlite3.connect(system.db_path, timeout=10)
    with conn:  # e.g. the user or another tool takes the job out of the queue
        conn.execute("UPDATE jobs SET stage = 'skipped' WHERE id = 1 AND stage = 'downloading'")
    conn.close()
    system.wait_logged("dispatcher", "job changed by another program: left to it job_id=1 ",
                       timeout=10)
    wait_for(lambda: system.stages() == {"skipped": 1, "downloaded": 2}, 20,
             f"the other two downloaded ({system.stages()})")
    wait_for(lambda: "lease lost: discarding this attempt" in system.log("worker_01")
             + system.log("worker_02"), 10, "the worker to drop episode 1")
    wait_for(lambda: not pid_alive(ani_cli), 10, "episode 1's ani-cli to be stopped")
    job = system.jobs()[0]
    assert (job["stage"], job["video_path"], job["retry_count"]) == ("skipped", None, 0), job
    assert layout.find_landed(system.storage, 21, 1) is None, "episode 1 landed anyway"
    assert spawned(system, "dispatcher") == 1
    assert "Traceback" not in system.log("dispatcher") + system.log("worker_01") + system.log("worker_02")


# --- §5: a private directory locked by another attempt ------------------------------------------

def test_a_job_whose_private_directory_is_locked_backs_off_while_the_others_run(make_system):
    system = make_system()
    animes = {31: 4}
    catalog(system, animes, duration=0.2)
    system.enqueue(31, "Show 31", [1, 2, 3, 4], selected_index=1)
    private = layout.job_dir(system.storage, 1)
    private.mkdir(parents=True)
    fd = os.open(private / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live attempt elsewhere still holds job 1's directory
    try:
        system.start_supervisord(2)
        wait_for(lambda: system.stages().get("downloaded", 0) == 3, 30,
                 f"the other three downloaded ({system.stages()})")
        wait_for(lambda: system.jobs()[0]["attempt"] >= 3, 15, "job 1 tried again")
        tried = system.jobs()[0]["attempt"]
        assert tried <= 6, f"job 1 was claimed {tried} times in a few seconds: a tight loop"
    finally:
        os.close(fd)  # that attempt ends
    wait_for(lambda: system.stages() == {"downloaded": 4}, 30, f"job 1 downloaded ({system.stages()})")
    job = system.jobs()[0]
    assert job["attempt"] <= 8 and job["retry_count"] <= 1, job


# --- §4: two live workers with the same id --------------------------------------------------------

def test_two_live_workers_with_one_id_the_second_is_refused_until_the_first_is_gone(make_system):
    """As from two machines (two installations, one dispatcher): the same-host lock cannot
    see it. No lease goes back and forth; when the first dies the second takes over at once."""
    system = make_system()
    animes = {41: 4}
    slow = {(41, 4): {"size": 200_000, "duration": 30, "chunk": 4096}}
    catalog(system, animes, duration=1.0, behaviour=slow)
    system.enqueue(41, "Show 41", [1, 2, 3, 4], selected_index=1)
    cfg = str(system.config_path)
    run = system.data / "run"
    twin_cfg = system.root / "twin.toml"
    twin_cfg.write_text(system.config_path.read_text().replace(
        'root_dir = "data"', 'root_dir = "twin"') + "\n[zmq]\n" + "".join(
        f'{key} = "ipc://{run / name}"\n' for key, name in (
            ("dispatcher", "dispatcher.sock"), ("status", "status.sock"),
            ("disk_state", "disk-state.sock"), ("disk_control", "disk-control.sock"),
            ("control", "control.sock"))))
    system.spawn("anime-disk-watcher", "-c", cfg)
    dispatcher = system.spawn("anime-dispatcher", "-c", cfg)
    wait_for(lambda: "dispatcher started" in system.output(dispatcher), 20, "the dispatcher")
    first = system.spawn("anime-worker", "-c", cfg, "--worker-id", "w01")
    wait_for(lambda: system.stages().get("downloading"), 20, "the first w01 downloading")
    twin = system.spawn("anime-worker", "-c", str(twin_cfg), "--worker-id", "w01")
    wait_for(lambda: "the dispatcher refused this worker" in system.output(twin), 10,
             "the second w01 to be refused")
    assert "another worker with id w01 is running" in system.output(twin)
    wait_for(lambda: any(r["episode"] == 4 for r in system.sim_runs("start")), 30,
             "the first w01 downloading episode 4 (after 1-3)")
    jobs = system.jobs()
    assert [(j["stage"], j["attempt"], j["retry_count"]) for j in jobs] == [
        ("downloaded", 1, 0)] * 3 + [("downloading", 1, 0)], jobs
    assert len(system.sim_runs("start")) == 4  # the twin ran nothing
    # The first one dies mid-download: the twin is taken at once, the job goes back at once.
    catalog(system, animes, duration=0.5)
    first.send_signal(signal.SIGKILL)
    wait_for(lambda: system.stages() == {"downloaded": 4}, 30, f"all downloaded ({system.stages()})")
    lost = system.jobs()[3]
    assert (lost["attempt"], lost["retry_count"]) == (2, 1), lost
    out = system.output(dispatcher)
    # taken back when the twin asked, not when the lease ran out ("no heartbeat")
    assert "Lease lost: worker w01 restarted during the download" in out
    assert "Traceback" not in out and out.count("Lease lost") == 1


# --- anime-enqueue beside itself ----------------------------------------------------------------

def test_concurrent_anime_enqueue_inserts_every_episode_once(make_system):
    system = make_system()
    system.enqueue(51, "Show 51", [1], selected_index=1)  # a WAL database, as in use
    neighbour = Neighbour(system, 30)
    wait_for(lambda: neighbour.seen("locked") == 1, 10, "the neighbour to take the lock")
    cfg = str(system.config_path)
    procs = [system.spawn("anime-enqueue", "-c", cfg, "--mal-id", "51", "--title", "Show 51",
                          "--episodes", "1-20", "--selected-index", "1") for _ in range(6)]

    def waiting(proc: subprocess.Popen) -> bool:  # in SQLite's busy handler
        try:
            return Path(f"/proc/{proc.pid}/wchan").read_text() == "hrtimer_nanosleep"
        except OSError:
            return False

    wait_for(lambda: all(waiting(p) for p in procs), 20, "every anime-enqueue waiting for the lock")
    said = lambda: all("is locked by another program; waiting" in system.output(p) for p in procs)
    try:  # they say so after a second of waiting
        wait_for(said, 5, "every anime-enqueue to say it waits")
    except WaitTimeout:
        pass  # asserted below, after what matters most
    neighbour.proc.kill()  # the lock goes with it
    for proc in procs:
        assert proc.wait(timeout=30) == 0, system.output(proc)
    episodes = Counter(ep for (ep,) in system.query("SELECT episode FROM jobs WHERE anime_id = 51"))
    assert episodes == Counter(range(1, 21)), {e: n for e, n in episodes.items() if n != 1}
    outputs = [system.output(p) for p in procs]
    assert sum("queued 19 episode(s)" in o for o in outputs) == 1, outputs
    assert sum("queued 0 episode(s) of MAL ID 51 (20 already present)" in o for o in outputs) == 5
    assert said(), outputs


# --- CURVE: a worker id and its routing id belong to the key that used them first ------------

# Another authorised machine (key r2) speaks as worker r1, as a new session of it (which
# once took r1's lease as a "restart"), asking for work and failing r1's job. Prints the
# kinds of the answers it got to each.
IMPOSTOR = r"""
import json, sys, time, zmq, zmq.auth
from shared.protocol import JobFailed, WorkerReady, decode, encode
host, port, secret, server_key = sys.argv[1:5]
public, secret_key = zmq.auth.load_certificate(secret)
server_public, _ = zmq.auth.load_certificate(server_key)
ctx = zmq.Context()
def ask(identity, msg):
    sock = ctx.socket(zmq.DEALER)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret_key, server_public
    sock.setsockopt(zmq.ROUTING_ID, identity.encode())
    sock.connect(f"tcp://{host}:{port}")
    sock.send_multipart(encode(msg))
    got, deadline = [], time.monotonic() + 10
    while time.monotonic() < deadline:
        if sock.poll(100):
            got.append(decode(sock.recv_multipart()).KIND)
            deadline = min(deadline, time.monotonic() + 1)
    sock.close(linger=0)
    print(json.dumps({"identity": identity, "got": got}), flush=True)
ask("r1/ffffffff", WorkerReady(worker_id="r1", session="ffffffff", seq=0))
ask("r1/eeeeeeee", JobFailed(worker_id="r1", session="eeeeeeee", job_id=1, attempt=1,
                             reason="error", error="forged"))
"""


def test_another_authorised_machine_cannot_take_a_workers_id_or_its_lease(make_system, machines):
    from tests.integration.test_remote_workers import (SERVER_IP, keys, output, printed_config,
                                                       spawn_in, worker_config)
    from tests.system import BASE_CONFIG, REPO, render_toml

    system = make_system()
    animes = {61: 2}
    catalog(system, animes, duration=0.3,
            behaviour={(61, 1): {"size": 100_000, "duration": 6, "chunk": 4096}})
    system.enqueue(61, "Show 61", [1, 2], selected_index=1)
    kdir = system.root / "keys"
    tables = {t: dict(v) for t, v in BASE_CONFIG.items()}
    tables.update(printed_config(keys(system, "init", "--dir", str(kdir), "--address", SERVER_IP)))
    system.config_path.write_text(render_toml(tables))
    r1_cfg = worker_config(system, "r1", keys(system, "client", "--dir", str(kdir), "--name", "r1",
                                              "--address", SERVER_IP), kdir, "r1")
    keys(system, "client", "--dir", str(kdir), "--name", "r2", "--address", SERVER_IP)
    cfg = str(system.config_path)
    spawn_in(system, machines.server, "disk-watcher", "anime-disk-watcher", "-c", cfg)
    spawn_in(system, machines.server, "dispatcher", "anime-dispatcher", "-c", cfg)
    wait_for(lambda: "dispatcher started" in output(system, "dispatcher"), 15, "the dispatcher")
    spawn_in(system, machines.remote, "r1", "anime-worker", "-c", str(r1_cfg), "--worker-id", "r1")
    wait_for(lambda: any(r["episode"] == 1 for r in system.sim_runs("start")), 20,
             "r1 downloading episode 1")
    impostor = subprocess.run(
        [*machines.remote, sys.executable, "-c", IMPOSTOR, SERVER_IP, "5555",
         str(kdir / "clients" / "r2.key_secret"), str(kdir / "server.key")],
        cwd=REPO, env=system.env(), capture_output=True, text=True, timeout=60)
    assert impostor.returncode == 0, impostor.stderr
    answers = [json.loads(line) for line in impostor.stdout.splitlines()]
    assert [a["got"] for a in answers] == [["worker.refused"], ["worker.refused", "job.ack"]], answers
    wait_for(lambda: system.stages() == {"downloaded": 2}, 30, f"r1 done ({system.stages()})")
    assert [(j["attempt"], j["retry_count"]) for j in system.jobs()] == [(1, 0), (1, 0)]
    dispatcher_log = output(system, "dispatcher")
    assert "another CURVE key" in dispatcher_log and "Lease lost" not in dispatcher_log
    assert len(system.sim_runs("start")) == 2
