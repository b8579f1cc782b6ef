"""The systemd unit in contrib/: ``systemctl stop`` leaves nothing behind.

systemd does not run here (PID 1 is something else), so the test does what systemd
would with the unit: it runs ExecStart in a control group of its own, stops it
the way KillMode and KillSignal say, waits at most TimeoutStopSec for the main
process, and then looks at what systemd would have to SIGKILL: nothing may be
left in the group, and the interrupted downloads must be back in the queue with
no retry counted. Skipped where no control group can be made (not root, no
writable cgroup hierarchy).
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.test_launcher import EPISODES, all_hanging, hanging_downloads
from tests.system import BIN, REPO, System, wait_for

pytestmark = pytest.mark.slow

UNIT = REPO / "contrib" / "anime-downloader.service"


def read_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def seconds(span: str) -> float:
    """A systemd time span: "90", "90s", "1min 30s", "500ms"."""
    units = {"": 1, "s": 1, "sec": 1, "ms": 0.001, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.strip())
    assert parts, f"TimeoutStopSec={span!r} is not a time span"
    return sum(float(n) * units[u] for n, u in parts)


def exec_start(line: str, system: System) -> list[str]:
    """ExecStart, pointed at this installation: the same program from this venv, the
    same options, this test's config file."""
    argv = shlex.split(line.lstrip("-@+!:"))
    assert Path(argv[0]).name == "anime-downloader", argv
    argv[0] = str(BIN / "anime-downloader")
    assert "-c" in argv, f"ExecStart names no config file: {line}"
    argv[argv.index("-c") + 1] = str(system.config_path)
    return argv


def cgroup_bases() -> list[Path]:
    """Writable-looking cgroup hierarchies: cgroup2 mounts first, then cgroup v1 "pids"."""
    v2, v1 = [], []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, kind, options = line.split()[:4]
        if kind == "cgroup2":
            v2.append(Path(where))
        elif kind == "cgroup" and "pids" in options.split(","):
            v1.append(Path(where))
    return v2 + v1


@pytest.fixture
def cgroup():
    for base in cgroup_bases():
        path = base / f"anime-downloader-test-{os.getpid()}-{time.monotonic_ns()}"
        try:
            path.mkdir()
        except OSError:
            continue
        if can_join(path):
            break
        path.rmdir()
    else:
        pytest.skip("no control group can be made here (needs root and a writable "
                    "cgroup2 or cgroup v1 'pids' hierarchy under /sys/fs/cgroup)")
    yield path
    for pid in members(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not members(path), 10, "the test's control group to empty")
    path.rmdir()


def can_join(group: Path) -> bool:
    """Whether a process can be moved into the group (mkdir alone does not prove it)."""
    try:
        probe = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: join(group))
    except subprocess.SubprocessError:
        return False
    probe.kill()
    probe.wait()
    return True


def join(group: Path) -> None:
    """As systemd does for a unit's process between fork and exec."""
    (group / "cgroup.procs").write_text(str(os.getpid()))


def members(group: Path) -> list[int]:
    """Live processes in the group (a zombie waits only for its parent to reap it)."""
    pids = []
    for pid in map(int, (group / "cgroup.procs").read_text().split()):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z":
                pids.append(pid)
        except (OSError, IndexError):
            continue
    return pids


def systemctl_stop(main: subprocess.Popen, group: Path, service: configparser.SectionProxy,
                   timeout: float) -> list[int]:
    """Stop as systemd stops a unit; returns what it would then have to SIGKILL."""
    mode = service.get("KillMode", "control-group")
    sig = signal.Signals[service.get("KillSignal", "SIGTERM")]
    for pid in (members(group) if mode == "control-group" else [main.pid]):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # ended meanwhile
            pass
    deadline = time.monotonic() + timeout
    try:
        main.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    if mode == "control-group":  # systemd waits for the whole group here
        try:
            wait_for(lambda: not members(group), max(0.0, deadline - time.monotonic()), "the group")
        except AssertionError:
            pass
    return members(group)


def test_stopping_the_systemd_unit_leaves_nothing_behind(make_system, cgroup) -> None:
    unit = read_unit(UNIT)
    service = unit["Service"]
    timeout = seconds(service.get("TimeoutStopSec", "90s"))
    system = make_system()
    hanging_downloads(system)
    argv = exec_start(service["ExecStart"], system)
    out = open(system.root / "journal.txt", "wb")  # where systemd's journal would be
    main = subprocess.Popen(argv, cwd=system.root, env=system.env(), stdin=subprocess.DEVNULL,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: join(cgroup))
    out.close()
    system.processes.append(main)
    wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    # at least the launcher, supervisord, 2 services, and per download a worker, ani-cli
    # and its child: the group holds the whole tree, as systemd's would
    assert len(members(cgroup)) >= 4 + 3 * EPISODES, members(cgroup)
    t0 = time.monotonic()
    left = systemctl_stop(main, cgroup, service, timeout)
    took = time.monotonic() - t0
    journal = (system.root / "journal.txt").read_text(errors="replace")[-2000:]
    assert left == [], f"systemd would SIGKILL {left} after {took:.1f}s\n{journal}"
    assert main.returncode == 0, f"the unit would count as failed: {main.returncode}\n{journal}"
    print(f"systemctl stop took {took:.2f}s (TimeoutStopSec {timeout:g}s)")
    jobs = [(j["stage"], j["retry_count"]) for j in system.jobs()]
    assert jobs == [("queued", 0)] * EPISODES, jobs
