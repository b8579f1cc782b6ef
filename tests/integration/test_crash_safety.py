"""Never lose a job, never duplicate an episode: the real processes under the real
supervisord, killed, restarted, rescaled and stopped while they download.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.system import System, wait_for

pytestmark = pytest.mark.slow


# --- helpers -------------------------------------------------------------------

def start(system: System, workers: int) -> subprocess.Popen:
    return system.start_supervisord(workers)


def build_catalog(system: System, animes: dict[int, int], rng: random.Random,
                  duration: tuple[float, float], extra: dict | None = None) -> dict[tuple[int, int], int]:
    """One catalog entry per anime, a random size and duration per episode; the sizes."""
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    sizes = {}
    for mal_id, episodes in animes.items():
        per_episode = {}
        for ep in range(1, episodes + 1):
            size = rng.randint(1_000, 60_000)
            sizes[(mal_id, ep)] = size
            per_episode[str(ep)] = {"size": size, "duration": round(rng.uniform(*duration), 3),
                                    "chunk": 4096, **(extra or {})}
        system.add_anime(catalog, f"Show {mal_id}", [
            {"title": f"Show {mal_id} (site)", "episodes": episodes,
             "episode_behaviour": per_episode}])
        system.enqueue(mal_id, f"Show {mal_id}", list(range(1, episodes + 1)), selected_index=1,
                       max_retries=50)
    system.write_catalog(catalog)
    return sizes


def check_storage(system: System, sizes: dict[tuple[int, int], int]) -> None:
    """Each episode exactly once at its final path, right size; nothing else in videos/."""
    videos = system.storage / "videos"
    found: dict[tuple[int, int], list[Path]] = {}
    strays = []
    for path in sorted(videos.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(videos).parts
        m = re.fullmatch(r"ep(\d{3})\.mp4", rel[-1])
        if len(rel) == 3 and rel[1] == "episodes" and m:
            found.setdefault((int(rel[0]), int(m.group(1))), []).append(path)
        elif len(rel) == 2 and rel[1] == "metadata.json":
            continue
        else:
            strays.append(path)
    assert strays == [], f"partial or stray files under videos/: {strays[:10]}"
    assert set(found) == set(sizes), set(sizes) ^ set(found)
    wrong = {k: (p[0].stat().st_size, sizes[k]) for k, p in found.items()
             if p[0].stat().st_size != sizes[k]}
    assert wrong == {}, f"episodes with the wrong size: {dict(list(wrong.items())[:10])}"
    for job in system.jobs():
        key = (job["anime_id"], job["episode"])
        assert job["stage"] == "downloaded", job
        assert job["video_path"] == str(found[key][0]), job
        assert job["video_size_bytes"] == sizes[key], job


def transitions(system: System) -> Counter:
    """How many times the dispatcher log records each job becoming downloaded."""
    text = system.log("dispatcher")
    lines = re.findall(r"(?:^|\s)(?:downloaded|settled a landed file without a second download) "
                       r"job_id=(\d+)", text)
    return Counter(int(j) for j in lines)


def runs_per_episode(system: System) -> Counter:
    return Counter((r["query"], r["episode"]) for r in system.sim_runs("start"))


def running(system: System, name: str) -> int | None:
    info = system.process_info(name)
    return info["pid"] if info["statename"] == "RUNNING" and info["pid"] else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def no_private_dirs(system: System) -> None:
    """The worker removes its private directory after the ack that follows the DB write."""
    wait_for(lambda: not system.private_dirs(), 10, "no private directory left")


def hanging(system: System, size: int) -> bool:
    """A ``hang`` run reached its hang: half the bytes are in the ``.part``."""
    return any(p.stat().st_size >= size // 2
               for d in system.private_dirs() for p in d.glob("dl/*.part"))


def downloaded(system: System) -> int:
    return system.stages().get("downloaded", 0)


# --- chaos ---------------------------------------------------------------------

# Fixed, so that a failure can be run again as it happened; another seed explores other
# orders of kills (CHAOS_SEED=... in the environment). Printed on every run: pytest shows
# it with the failure.
CHAOS_SEED = 20261125


@pytest.mark.timeout(180)
def test_chaos_kill_9_anything_every_job_lands_exactly_once(make_system) -> None:
    seed = int(os.environ.get("CHAOS_SEED", CHAOS_SEED))
    print(f"\nchaos seed={seed} (rerun the same chaos with CHAOS_SEED={seed})")
    rng = random.Random(seed)
    system = make_system({"queue": {"lease_seconds": 4, "heartbeat_seconds": 1}})
    sizes = build_catalog(system, {101: 50, 102: 50, 103: 50, 104: 50}, rng, (0.05, 0.2))
    started = time.monotonic()
    start(system, 4)
    victims = ["dispatcher", "disk-watcher"] + [f"worker:worker_{i:02d}" for i in range(1, 5)]
    kills: Counter = Counter()
    # every kind of process dies at least twice, in a random order, then anything
    plan = ["dispatcher", "disk-watcher"] * 2 + [rng.choice(victims[2:]) for _ in range(6)]
    rng.shuffle(plan)
    chaos_until = started + 25
    while plan or time.monotonic() < chaos_until and downloaded(system) < len(sizes) - 10:
        # a random moment: after a random number of further ani-cli starts
        target = len(system.sim_runs("start")) + rng.randint(1, 8)
        try:
            wait_for(lambda: len(system.sim_runs("start")) >= target, 15, "more downloads")
        except AssertionError:
            pass  # nothing starting (everything restarting): kill anyway
        name = plan.pop() if plan else rng.choice(victims)
        pid = running(system, name)
        if pid is None:  # still restarting from the last kill: later
            plan.insert(0, name)
            continue
        os.kill(pid, signal.SIGKILL)
        kills[name.split(":")[0]] += 1
    total_kills = sum(kills.values())
    wait_for(lambda: downloaded(system) == len(sizes), 60,
             f"all {len(sizes)} jobs downloaded (stages {system.stages()}, seed {seed})")
    # the restarted dispatcher removes what killed workers left behind; live ones clean up
    wait_for(lambda: not system.private_dirs(), 20,
             f"no private directory left: {system.private_dirs()[:5]}")
    elapsed = time.monotonic() - started
    check_storage(system, sizes)
    seen = transitions(system)
    twice = {j: n for j, n in seen.items() if n > 1}
    assert twice == {}, f"jobs recorded downloaded more than once: {twice}"
    # a dispatcher killed between its commit and its log line loses at most that line
    assert len(seen) >= len(sizes) - kills["dispatcher"], (len(seen), kills)
    runs = runs_per_episode(system)
    assert len(runs) == len(sizes) and min(runs.values()) >= 1
    reruns = sum(runs.values()) - len(runs)
    print(f"chaos seed={seed}: {len(sizes)} jobs, kills={dict(kills)} ({total_kills}), "
          f"ani-cli runs={sum(runs.values())} reruns={reruns} "
          f"max runs/episode={max(runs.values())}, retries={sum(j['retry_count'] for j in system.jobs())}, "
          f"{elapsed:.1f}s")
    assert kills["dispatcher"] >= 2 and kills["disk-watcher"] >= 2 and kills["worker"] >= 4, \
        f"too little chaos: {kills}"


# --- scaling -------------------------------------------------------------------

def test_scaling_numprocs_2_to_4_loses_nothing_and_counts_no_retry(make_system) -> None:
    system = make_system()
    rng = random.Random(5)
    # Downloads long enough to still be running when `update` restarts the workers.
    sizes = build_catalog(system, {201: 8}, rng, (3.0, 4.0))
    start(system, 2)
    wait_for(lambda: system.stages().get("downloading", 0) == 2 and downloaded(system) >= 1, 30,
             "two downloads in flight after a first one landed")
    conf = system.data / "run" / "supervisord.conf"
    text = conf.read_text()
    assert "numprocs = 2" in text or "numprocs=2" in text
    conf.write_text(re.sub(r"numprocs\s*=\s*2", "numprocs = 4", text))
    reread = system.supervisorctl("reread")
    assert reread.returncode == 0 and "worker: changed" in reread.stdout, reread
    update = system.supervisorctl("update")
    assert update.returncode == 0, update
    wait_for(lambda: all(running(system, f"worker:worker_{i:02d}") for i in range(1, 5)), 30,
             "four workers running")
    wait_for(lambda: downloaded(system) == len(sizes), 90, f"all downloaded ({system.stages()})")
    jobs = system.jobs()
    assert [j for j in jobs if j["retry_count"]] == [], "a restart for scaling counted a retry"
    interrupted = [j for j in jobs if j["attempt"] > 1]
    assert interrupted, "the update restarted no download (the test proved nothing)"
    worker_logs = "".join(system.log(f"worker_{i:02d}") for i in (1, 2))
    assert "reason=interrupted" in worker_logs
    check_storage(system, sizes)
    no_private_dirs(system)


# --- stopping ------------------------------------------------------------------

def test_sigterm_to_the_whole_system_then_start_again(make_system) -> None:
    system = make_system()
    sizes = build_catalog(system, {301: 6}, random.Random(7), (1.0, 1.5))
    launcher = start(system, 3)
    wait_for(lambda: system.stages().get("downloading", 0) == 3, 30, "three downloads in flight")
    stopped_at = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0
    assert time.monotonic() - stopped_at < 15
    jobs = system.jobs()
    assert {j["stage"] for j in jobs} <= {"queued", "downloaded"}, [j["stage"] for j in jobs]
    assert all(j["retry_count"] == 0 for j in jobs)
    system.processes.remove(launcher)
    start(system, 3)
    wait_for(lambda: downloaded(system) == len(sizes), 60, f"all downloaded ({system.stages()})")
    jobs = system.jobs()
    assert [j["id"] for j in jobs if j["retry_count"]] == []
    check_storage(system, sizes)


def test_graceful_stop_of_one_worker_hands_its_job_back(make_system) -> None:
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Slow Show", [{"title": "Slow Show (site)", "episodes": 2,
                                             "behaviour": {"size": 400_000, "duration": 20,
                                                           "spawn_child": True}}])
    system.write_catalog(catalog)
    system.enqueue(401, "Slow Show", [1], selected_index=1)
    start(system, 1)
    wait_for(lambda: system.sim_runs("child") and system.stages().get("downloading"), 30,
             "ani-cli running with a child")
    child = system.sim_runs("child")[0]["child_pid"]
    ani_cli = system.sim_runs("start")[0]["pid"]
    assert pid_alive(child)
    t0 = time.monotonic()
    result = system.supervisorctl("stop", "worker:worker_01")
    took = time.monotonic() - t0
    assert result.returncode == 0, result
    info = system.process_info("worker:worker_01")
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0, info
    assert took < 8, f"stop took {took:.1f}s (stopwaitsecs is 20)"
    assert not pid_alive(ani_cli) and not pid_alive(child), "ani-cli's process group survived"
    job = system.jobs()[0]
    assert (job["stage"], job["retry_count"]) == ("queued", 0), job
    assert "interrupted" in (job["error_message"] or "")
    system.wait_logged("worker_01", "reason=interrupted")
# --- one dispatcher per database -----------------------------------------------

def test_a_second_dispatcher_exits_at_once_with_a_clear_message(make_system) -> None:
    system = make_system()
    system.enqueue(501, "Any", [1], selected_index=1)
    first = system.spawn("anime-dispatcher", "-c", str(system.config_path))
    lock = system.data / "run" / "dispatcher.lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), 20,
             "the first dispatcher to hold the lock")
    t0 = time.monotonic()
    second = system.run("anime-dispatcher", "-c", str(system.config_path), timeout=20)
    assert second.returncode == 3, second
    assert time.monotonic() - t0 < 10
    assert "already running" in second.stderr and str(first.pid) in second.stderr, second.stderr
    assert first.poll() is None


def test_a_second_stop_signal_makes_the_worker_exit_at_once(make_system) -> None:
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Stuck Show", [{"title": "Stuck Show (site)", "episodes": 1,
                                              "behaviour": {"size": 100_000,
                                                            "hang": "ignore_term"}}])
    system.write_catalog(catalog)
    system.enqueue(601, "Stuck Show", [1], selected_index=1)
    start(system, 1)
    wait_for(lambda: hanging(system, 100_000), 30, "ani-cli hanging half-way (SIGTERM ignored)")
    ani_cli = system.sim_runs("start")[0]["pid"]
    # supervisord calls it RUNNING only after startsecs; on a quiet machine ani-cli is faster
    worker = wait_for(lambda: running(system, "worker:worker_01"), 10, "worker_01 RUNNING")
    os.kill(worker, signal.SIGTERM)
    wait_for(lambda: "stop requested: taking no more work" in system.log("worker_01"), 10,
             "the worker to take the first signal")
    assert pid_alive(worker) and pid_alive(ani_cli)  # ani-cli ignores SIGTERM: still waiting
    t0 = time.monotonic()
    os.kill(worker, signal.SIGTERM)
    wait_for(lambda: not pid_alive(worker), 5, "the worker to exit on the second signal")
    assert time.monotonic() - t0 < 1.5
    system.wait_logged("worker_01", "second stop signal: exiting now")
    wait_for(lambda: not pid_alive(ani_cli), 5, "ani-cli's group to be killed")
    # the job is not lost: the restarted worker's new session takes it again
    catalog["anime"][0]["results"][0]["behaviour"] = {"size": 100_000}
    system.write_catalog(catalog)
    wait_for(lambda: system.stages() == {"downloaded": 1}, 30, f"the job done ({system.stages()})")


def test_a_dispatcher_restart_does_not_disturb_running_downloads(make_system) -> None:
    system = make_system()
    sizes = build_catalog(system, {701: 3}, random.Random(3), (2.0, 2.5))
    start(system, 3)
    wait_for(lambda: system.stages().get("downloading", 0) == 3, 30, "three downloads in flight")
    t0 = time.monotonic()
    stop = system.supervisorctl("stop", "dispatcher")
    # below stopwaitsecs (10): it stopped by itself, not by supervisord's SIGKILL; the
    # bound includes supervisorctl's start-up, so it is generous
    assert stop.returncode == 0 and time.monotonic() - t0 < 8, stop
    info = system.process_info("dispatcher")
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0, info
    # the downloads go on and finish while the dispatcher is away
    wait_for(lambda: len(system.sim_runs("end")) >= 3, 20, "the in-flight downloads to end")
    assert system.stages().get("downloading", 0) == 3
    assert system.supervisorctl("start", "dispatcher").returncode == 0
    wait_for(lambda: downloaded(system) == len(sizes), 60, f"all downloaded ({system.stages()})")
    jobs = system.jobs()
    assert [(j["id"], j["retry_count"], j["attempt"]) for j in jobs if j["retry_count"]
            or j["attempt"] != 1] == []
    assert max(runs_per_episode(system).values()) == 1, "a download was run twice"
    system.wait_logged("dispatcher", "lease re-adopted")
    check_storage(system, sizes)
    no_private_dirs(system)


def test_ani_cli_stopped_by_a_signal_from_outside_is_not_the_jobs_fault(make_system) -> None:
    """A shutdown signals every process at once: ani-cli may die of SIGTERM before the
    worker hears its own signal. That is an interruption, not a failed attempt."""
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Long Show", [{"title": "Long Show (site)", "episodes": 1,
                                             "behaviour": {"size": 100_000, "duration": 30}}])
    system.write_catalog(catalog)
    system.enqueue(801, "Long Show", [1], selected_index=1, max_retries=0)
    start(system, 1)
    wait_for(lambda: system.sim_runs("start") and system.stages().get("downloading"), 30,
             "ani-cli running")
    catalog["anime"][0]["results"][0]["behaviour"] = {"size": 100_000}
    system.write_catalog(catalog)
    os.killpg(system.sim_runs("start")[0]["pid"], signal.SIGTERM)
    wait_for(lambda: system.stages() == {"downloaded": 1}, 30, f"the job done ({system.stages()})")
    assert system.jobs()[0]["retry_count"] == 0
    system.wait_logged("worker_01", "reason=interrupted")
def test_ani_cli_orphaned_by_a_killed_worker_is_stopped_before_the_retry(make_system) -> None:
    """kill -9 of a worker leaves ani-cli running in its own session; the next attempt
    on the same private directory kills it first, so two downloaders never share it."""
    system = make_system()
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Long Show", [{"title": "Long Show (site)", "episodes": 1,
                                             "behaviour": {"size": 200_000, "hang": True}}])
    system.write_catalog(catalog)
    system.enqueue(901, "Long Show", [1], selected_index=1)
    start(system, 1)
    # a hung ani-cli writes nothing more, so the closed pipes of its dead worker do not
    # end it (one that writes dies of SIGPIPE)
    wait_for(lambda: hanging(system, 200_000), 30, "ani-cli hanging half-way")
    orphan = system.sim_runs("start")[0]["pid"]
    catalog["anime"][0]["results"][0]["behaviour"] = {"size": 200_000, "duration": 1.0}
    system.write_catalog(catalog)
    os.kill(wait_for(lambda: running(system, "worker:worker_01"), 10, "worker_01 RUNNING"),
            signal.SIGKILL)
    wait_for(lambda: len(system.sim_runs("start")) >= 2, 30, "the retry to start")
    assert not pid_alive(orphan), "the killed worker's ani-cli still runs beside the retry"
    wait_for(lambda: system.stages() == {"downloaded": 1}, 30, f"the job done ({system.stages()})")
    check_storage(system, {(901, 1): 200_000})
    system.wait_logged("worker_01", "killed ani-cli left running by a killed worker")