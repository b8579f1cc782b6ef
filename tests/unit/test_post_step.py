"""The worker's post-download step (services/worker/post_step.py): verify, remux, stage.

A time-out is no verdict on the file, a remux that runs out of space is lack of space,
and stopping the step (a cancelled lease, a stop, the hard limit) ends its ffmpeg and
frees its pipe. Slow tools are stand-ins named ``ffmpeg``/``ffprobe`` first on PATH
(a slow NFS mount); the ENOSPC is a real remux into a real full tmpfs (root only).
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from services.worker import private_dir, video
from services.worker.actions import Exit, Figures, Send, Start, StartPost
from services.worker.agent import Worker
from services.worker.attempt import Attempt
from services.worker.core import WorkerCore
from shared.config import load_config
from shared.protocol import REASON_NO_SPACE, REASON_TIMEOUT, DiskStateMsg, JobAssign
from tests.system import mount_tmpfs, render_toml, unmount, wait_for

SLOW_TOOL = """#!/bin/sh
echo $$ >> "$FAKE_TOOL_PIDS"
exec sleep 60
"""


def make_attempt(tmp_path: Path, **downloader) -> Attempt:
    config_path = tmp_path / "config.toml"
    config_path.write_text(render_toml({
        "data": {"root_dir": str(tmp_path / "data"), "storage_dir": str(tmp_path / "disk")},
        "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8},
        "downloader": downloader,
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }))
    (tmp_path / "disk").mkdir(exist_ok=True)
    job = JobAssign(job_id=7, attempt=1, anime_id=5114, anime_title="Show", episode=3,
                    selected_index=1, selected_title="Show (site)", confidence="high",
                    lease_seconds=6.0, rate_limit_bps=0)
    a = Attempt(job, load_config(config_path), worker_id="w01")
    a.prepare()
    return a


@pytest.fixture
def slow_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ffmpeg and ffprobe that never finish; returns the file their pids go to."""
    bin_dir = tmp_path / "slowbin"
    bin_dir.mkdir()
    for name in ("ffmpeg", "ffprobe"):
        (bin_dir / name).write_text(SLOW_TOOL)
        (bin_dir / name).chmod(0o755)
    pids = tmp_path / "tool-pids"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TOOL_PIDS", str(pids))
    return pids


def started_pids(pids: Path) -> list[int]:
    return [int(p) for p in pids.read_text().split()] if pids.exists() else []


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def post_result(a: Attempt, timeout: float = 10.0):
    assert select.select([a.post.wakeup[0]], [], [], timeout)[0], "the post step did not end"
    return a.post.result


def into_verifying(core: WorkerCore, a: Attempt) -> WorkerCore:
    """Drive the core through its public events to the post step of ``a``'s job."""
    now = time.monotonic()
    core.on_disk(disk_state("running"), now)
    assert isinstance(core.on_message(a.job, now)[0], Start)
    core.started(4242, now)
    exit = Exit(0, files=private_dir.files_under(a.download_dir))
    assert any(isinstance(act, StartPost) for act in core.exited(exit, now))
    return core


def core_for(a: Attempt) -> WorkerCore:
    return into_verifying(WorkerCore(a.config, "w01", "session", "host", storage_problem=lambda _: None,
                                     figures=lambda _: Figures()), a)


def reasons(actions) -> list[str]:
    """The reasons of the failures the worker reports."""
    return [act.msg.reason for act in actions if isinstance(act, Send)]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def download(a: Attempt, data: bytes = b"\0" * 1000, name: str = "Show Episode 3.mp4") -> Path:
    file = a.download_dir / name
    file.write_bytes(data)
    return file


@pytest.mark.parametrize("container", ["keep", "mkv"])
def test_a_verify_time_out_keeps_the_file_and_is_a_time_out(tmp_path: Path, slow_tools: Path,
                                                            container: str) -> None:
    a = make_attempt(tmp_path, verify=True, container=container, verify_timeout_seconds=0.5)
    file = download(a)
    core = core_for(a)
    started = time.monotonic()
    a.start_post(file.name)
    post = post_result(a)
    assert time.monotonic() - started < 5
    assert post.timed_out and not post.no_space and "verify timed out" in post.error, post
    assert file.exists(), "a time-out is no proof of a bad file: the retry needs it"
    assert list(a.private_dir.glob("ready-a*")) == [], "the partial copy is left behind"
    assert not any(running(pid) for pid in started_pids(slow_tools)), "the slow tool outlived it"
    # and the worker reports it as a time-out (a counted retry that keeps the file)
    calls = reasons(core.post_done(post, time.monotonic()))
    assert calls == [REASON_TIMEOUT]
    a.release()


def test_the_time_allowed_grows_with_the_file() -> None:
    assert video.timeout_for(10**6, 120) == 120
    assert video.timeout_for(3 * 10**9, 120) == 360


def test_cancelling_during_the_verify_ends_ffmpeg_and_frees_its_pipe(tmp_path: Path,
                                                                     slow_tools: Path) -> None:
    a = make_attempt(tmp_path, verify=True, container="mkv", verify_timeout_seconds=60)
    file = download(a)
    before = open_fds()
    a.start_post(file.name)
    pid = wait_for(lambda: started_pids(slow_tools), 10, "the slow tool to start")[0]
    a.discard(keep_partials=True)  # what the worker does on JobCancel
    assert wait_for(lambda: not running(pid), 5, "the slow tool to be killed")
    assert open_fds() <= before - 1, "the post step's pipe is still open"  # minus the lock fd
    assert a.post.thread is not None and not a.post.thread.is_alive()
    assert file.exists()  # partials kept: the lease went elsewhere, the next attempt may resume


def test_stop_post_before_a_tool_starts_stops_it_too(tmp_path: Path, slow_tools: Path) -> None:
    stopper = video.Stopper()
    stopper.stop()
    with pytest.raises(video.Stopped):
        video.remux_to_mkv(download(make_attempt(tmp_path)), tmp_path / "out.mkv",
                           stopper=stopper)
    assert started_pids(slow_tools) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, "1m")
    yield disk
    unmount(disk)


# The ffmpeg first on PATH runs the real one and exits 0 whatever it did, as Debian 12's 5.1
# does when the disk fills while it writes the trailer (its messages say so; its exit does not).
EXIT_ZERO_FFMPEG = """#!/bin/sh
"$REAL_FFMPEG" "$@"
exit 0
"""


@pytest.fixture(params=["its exit code", "exit 0 (ffmpeg 5.1)"])
def ffmpeg_exit(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    real = video.find_ffmpeg()
    if request.param.startswith("exit 0"):
        bin_dir = tmp_path / "exit0bin"
        bin_dir.mkdir()
        (bin_dir / "ffmpeg").write_text(EXIT_ZERO_FFMPEG)
        (bin_dir / "ffmpeg").chmod(0o755)
        monkeypatch.setenv("REAL_FFMPEG", str(real))
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return str(real)


@pytest.mark.skipif(video.find_ffmpeg() is None, reason="needs ffmpeg (PATH or imageio-ffmpeg)")
@pytest.mark.parametrize("verify", [False, True], ids=["remux", "verify-while-remuxing"])
def test_a_remux_that_runs_out_of_space_is_lack_of_space(tmp_path: Path, small_tmpfs: Path,
                                                         verify: bool, ffmpeg_exit: str) -> None:
    source = tmp_path / "src.mp4"  # ~650 kB of real video: its copy does not fit in 1 MiB
    subprocess.run([ffmpeg_exit, "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=25:duration=8", "-c:v", "libx264", "-preset",
                    "ultrafast", "-b:v", "1700k", str(source)], check=True, timeout=60)
    assert 550_000 < source.stat().st_size < 1_000_000, source.stat().st_size
    a = make_attempt(tmp_path, verify=verify, container="mkv")
    file = download(a, source.read_bytes())
    core = core_for(a)
    a.start_post(file.name)
    post = post_result(a, 30)
    assert post.no_space and "No space left on device" in post.error, post
    assert list(a.private_dir.glob("ready-a*")) == [], "the partial copy is left behind"
    assert file.exists(), "a full disk says nothing against the download"
    calls = reasons(core.post_done(post, time.monotonic()))
    assert calls == [REASON_NO_SPACE]
    a.release()


# --- the worker stops a post step for the disk ---------------------------------------


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real Worker whose dispatcher is not there (sends go nowhere) and whose stop signals
    stay pytest's."""
    from services.worker import agent

    class NoSignals:
        requested, count, wakeup_fd = False, 0, -1

    monkeypatch.setattr(agent, "StopRequest", NoSignals)
    (tmp_path / "data").mkdir(exist_ok=True)
    made = []

    def make(a: Attempt) -> Worker:
        w = Worker(a.config, "w01")
        w._open()
        into_verifying(w.core, a)
        w.attempt = a
        made.append(w)
        return w

    yield make
    for w in made:
        w.sockets.close()


def disk_state(state: str, reason: str = "") -> DiskStateMsg:
    now = time.time()
    fields = dict(seq=1, state=state, usage_bytes=0, breakdown={}, free_bytes=10**12,
                  pause_threshold_bytes=1, resume_threshold_bytes=0, hard_limit_bytes=2,
                  min_free_bytes=0, measured_at=now, published_at=now)
    return DiskStateMsg(**fields, **({"reason": reason} if reason else {}))


@pytest.mark.parametrize("verify", [False, True], ids=["remux", "verify-while-remuxing"])
def test_a_remux_at_the_hard_limit_is_aborted_and_its_files_freed(tmp_path: Path, slow_tools: Path,
                                                                   worker, verify: bool) -> None:
    a = make_attempt(tmp_path, verify=verify, container="mkv", verify_timeout_seconds=60)
    file = download(a)
    w = worker(a)
    a.start_post(file.name)
    pid = wait_for(lambda: started_pids(slow_tools), 10, "the remux to start")[0]
    w._do(w.core.on_disk(disk_state("hard_limit"), time.monotonic()))
    assert not running(pid), "the remux went on writing at the hard limit"
    assert (w.core.pending.reason, w.core.pending.error) == ("hard_limit",
                                                   "aborted: disk usage reached hard_limit_gb")
    assert not file.exists() and list(a.private_dir.glob("ready-a*")) == []


def test_a_verify_on_a_storage_that_went_away_is_handed_back_with_its_files(
        tmp_path: Path, slow_tools: Path, worker) -> None:
    a = make_attempt(tmp_path, verify=True, container="mkv", verify_timeout_seconds=60)
    file = download(a)
    w = worker(a)
    a.start_post(file.name)
    pid = wait_for(lambda: started_pids(slow_tools), 10, "the verify to start")[0]
    why = "storage_dir /x is no longer a mount point (is the disk mounted?)"
    w._do(w.core.on_disk(disk_state("unavailable", why), time.monotonic()))
    assert not running(pid)
    assert (w.core.pending.reason, w.core.pending.error) == ("storage_unavailable", f"storage unavailable: {why}")
    assert file.exists()  # nothing touched: the disk may come back with it
