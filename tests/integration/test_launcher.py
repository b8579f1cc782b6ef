"""Nobody left behind: however ``anime-downloader`` ends (its terminal closed, SIGTERM,
kill -9, Ctrl-C with its output piped to a reader that is gone), nothing it started
keeps running, and the downloads it interrupted are back in the queue without a
retry counted. A second launcher, or a second worker with a taken id, is refused
with one line naming the pid, before it changes anything.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import threading
import time

import psutil
import pytest

from tests.system import System, wait_for

pytestmark = pytest.mark.slow

STOP_BOUND = 20.0  # the workers' stopwaitsecs: the longest supervisord waits for a program
EPISODES = 3
SIZE = 100_000


def installation_processes(system: System) -> list[str]:
    """Every live process of this installation (its root in the command line or the
    environment: supervisord, the services, ani-cli and its children), as text."""
    root = str(system.root)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            if root in cmdline or any(root in v for v in proc.environ().values()):
                found.append(f"{proc.pid} (ppid {proc.ppid()}): {cmdline[:100]}")
        except psutil.Error:
            continue
    return found


def hanging_downloads(system: System) -> None:
    """EPISODES jobs whose ani-cli writes half the file, then hangs until stopped."""
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Hang Show", [{"title": "Hang Show (site)", "episodes": EPISODES,
                                             "behaviour": {"size": SIZE, "hang": True,
                                                           "spawn_child": True}}])
    system.write_catalog(catalog)
    system.enqueue(700, "Hang Show", list(range(1, EPISODES + 1)), selected_index=1)


def all_hanging(system: System) -> bool:
    """Every download is in flight: a row each, and each ani-cli has its child and half its bytes."""
    parts = [p for d in system.private_dirs() for p in d.glob("dl/*.part") if p.stat().st_size >= SIZE // 2]
    return (system.stages().get("downloading", 0) == EPISODES and len(parts) == EPISODES
            and len(system.sim_runs("child")) == EPISODES)


def assert_nothing_left_and_jobs_queued(system: System, since: float) -> None:
    try:
        wait_for(lambda: not installation_processes(system), STOP_BOUND, "every process to end")
    except AssertionError:
        raise AssertionError("left running: " + "; ".join(installation_processes(system))) from None
    print(f"everything stopped {time.monotonic() - since:.2f}s after the signal")
    jobs = [(j["stage"], j["retry_count"]) for j in system.jobs()]
    assert jobs == [("queued", 0)] * EPISODES, jobs


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL],
                         ids=["sighup", "sigterm", "kill-9"])
def test_a_signal_to_the_launcher_stops_everything_it_started(make_system, sig) -> None:
    system = make_system()
    hanging_downloads(system)
    launcher = system.start_supervisord(EPISODES)
    wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    t0 = time.monotonic()
    launcher.send_signal(sig)
    assert_nothing_left_and_jobs_queued(system, t0)
    assert launcher.wait(timeout=5) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    if sig != signal.SIGKILL:  # what --exit-when-done prints, after a stop too
        summary = f"summary: downloaded=0, failed=0, still_queued={EPISODES}, waiting_for_selection=0\n"
        wait_for(lambda: summary in system.lines(launcher), 5, "the summary line")


def test_closing_its_terminal_stops_everything(make_system) -> None:
    """The launcher on a terminal of its own (a pty it controls, as under a login shell
    or ssh), which then goes away: the kernel hangs it up (SIGHUP), and from then on
    every write to it fails (EIO)."""
    system = make_system()
    hanging_downloads(system)
    master, slave = os.openpty()
    launcher = subprocess.Popen(
        system.command("anime-downloader", "-c", str(system.config_path), "-w", str(EPISODES)),
        cwd=system.root, env=system.env(), stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    system.processes.append(launcher)
    reading = threading.Event()
    reading.set()

    def read_terminal() -> None:  # as the terminal does: else a full pty blocks the launcher
        while reading.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    os.read(master, 65536)
                except OSError:
                    return

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    finally:
        reading.clear()
        reader.join(timeout=5)
    t0 = time.monotonic()
    os.close(master)  # the terminal window closes, the ssh connection drops
    assert_nothing_left_and_jobs_queued(system, t0)
    assert launcher.wait(timeout=5) == 0


def test_ctrl_c_with_the_output_piped_stops_everything(make_system) -> None:
    """``anime-downloader ... 2>&1 | grep ...`` and Ctrl-C: the grep dies too, and every
    later write of the launcher (and, before, of supervisord) meets a broken pipe."""
    system = make_system()
    hanging_downloads(system)
    read_end, write_end = os.pipe()
    reader = subprocess.Popen(["cat"], stdin=read_end, stdout=subprocess.DEVNULL)
    os.close(read_end)
    launcher = subprocess.Popen(system.command("anime-downloader", "-c", str(system.config_path),
                                               "-w", str(EPISODES)),
                                cwd=system.root, env=system.env(), stdin=subprocess.DEVNULL,
                                stdout=write_end, stderr=write_end, start_new_session=True)
    os.close(write_end)
    system.processes += [launcher, reader]
    wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    reader.kill()  # Ctrl-C reaches the whole pipeline; the reader is gone first
    reader.wait(timeout=5)
    t0 = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    assert_nothing_left_and_jobs_queued(system, t0)
    assert launcher.wait(timeout=5) == 0


def test_a_second_launcher_refuses_before_rewriting_anything(make_system) -> None:
    system = make_system()
    first = system.start_supervisord(1)
    conf = system.data / "run" / "supervisord.conf"
    before = (conf.read_bytes(), conf.stat().st_mtime_ns)
    t0 = time.monotonic()
    second = system.run("anime-downloader", "-c", str(system.config_path), "-w", "2", timeout=20)
    assert (second.returncode, second.stdout) == (3, ""), second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"already running (pid {first.pid})" in lines[0], second.stderr
    assert f"kill {first.pid}" in lines[0]
    # at once, not after waiting for the first one's supervisord; the bound includes the
    # second launcher's own start-up (seconds on a loaded machine), so it is generous
    assert time.monotonic() - t0 < 15
    assert (conf.read_bytes(), conf.stat().st_mtime_ns) == before, "run/supervisord.conf was rewritten"
    assert first.poll() is None and system.rpc_ok()
    assert system.process_info("worker:worker_01")["statename"] in ("STARTING", "RUNNING")


def test_leftovers_of_a_crashed_run_are_named_and_nothing_starts(make_system) -> None:
    """A dispatcher and a worker still holding their locks (left by a run whose launcher
    and supervisord died): the launcher names both pids and writes nothing."""
    system = make_system()
    system.enqueue(701, "Any", [1], selected_index=1)
    config = str(system.config_path)
    dispatcher = system.spawn("anime-dispatcher", "-c", config)
    worker = system.spawn("anime-worker", "-c", config, "--worker-id", "w01")
    wait_for(lambda: "dispatcher started" in system.output(dispatcher)
             and "worker started" in system.output(worker), 20, "the leftovers running")
    second = system.run("anime-downloader", "-c", config, timeout=20)
    assert second.returncode == 3, second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"already running (pids {dispatcher.pid} {worker.pid})" in lines[0], lines[0]
    assert f"kill {dispatcher.pid} {worker.pid}" in lines[0] and "worker w01" in lines[0]
    assert not (system.data / "run" / "supervisord.conf").exists()
    assert not (system.data / "run" / "supervisor.sock").exists()


def test_a_second_live_worker_with_the_same_id_is_refused(make_system) -> None:
    system = make_system()
    config = str(system.config_path)
    first = system.spawn("anime-worker", "-c", config, "--worker-id", "w01")
    wait_for(lambda: "worker started" in system.output(first), 20, "worker w01 running")
    second = system.run("anime-worker", "-c", config, "--worker-id", "w01", timeout=20)
    assert second.returncode == 3, second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"already running (pid {first.pid})" in lines[0], second.stderr
    assert "worker w01" in lines[0]
    assert first.poll() is None
    other = system.spawn("anime-worker", "-c", config, "--worker-id", "w02")
    wait_for(lambda: "worker started" in system.output(other), 20, "worker w02 running beside it")


def test_services_stop_when_their_supervisord_is_killed(make_system) -> None:
    """kill -9 of supervisord itself: every program gets SIGTERM from the kernel and
    stops as usual (workers kill ani-cli); the launcher says what happened."""
    system = make_system()
    hanging_downloads(system)
    launcher = system.start_supervisord(EPISODES)
    wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    supervisord = system.rpc().supervisor.getPID()
    t0 = time.monotonic()
    os.kill(supervisord, signal.SIGKILL)
    try:
        wait_for(lambda: not installation_processes(system), STOP_BOUND, "every process to end")
    except AssertionError:
        raise AssertionError("left running: " + "; ".join(installation_processes(system))) from None
    print(f"everything stopped {time.monotonic() - t0:.2f}s after supervisord's death")
    assert launcher.wait(timeout=5) == 1
    wait_for(lambda: "supervisord was killed by signal 9" in system.output(launcher), 5,
             "the launcher to say supervisord died")


def test_when_supervisord_cannot_start_the_launcher_shows_why(make_system) -> None:
    """supervisord's own output goes to logs/supervisord.out, not to the launcher's
    stdout: when supervisord fails, the launcher prints its last words."""
    deep = "d" * 90  # its unix socket path gets too long for AF_UNIX (108 bytes)
    unbound = {key: f"tcp://127.0.0.1:{port}" for key, port in  # never bound: nothing starts
               zip(("dispatcher", "status", "disk_state", "disk_control", "control"),
                   range(45101, 45106))}
    system = make_system({"data": {"root_dir": f"{deep}/data"}, "zmq": unbound})
    result = system.run("anime-downloader", "-c", str(system.config_path), timeout=30)
    assert result.returncode == 2, result
    assert "anime-downloader: supervisord exited with code 2; see " in result.stderr, result.stderr
    out = system.root / deep / "data" / "logs" / "supervisord.out"
    assert f"  {out}:\n    Error: Cannot open an HTTP server" in result.stderr, result.stderr
    assert "AF_UNIX path too long" in out.read_text()
