"""The worker's bookkeeping of ani-cli's output (services/worker/output.py, attempt.py), fed with the
recorded yt-dlp and ffmpeg output of tests/fixtures: one parser and one tail per stream,
the figures the heartbeat carries (a percent that never goes backwards within a
download), the error tail, and the fallback to the bytes in the private directory.
"""

from __future__ import annotations

import select
import sys
from pathlib import Path

import pytest

from services.worker import process
from services.worker.attempt import Attempt
from services.worker.progress import ProgressParser
from shared.config import load_config
from shared.protocol import JobAssign
from tests.system import render_toml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.fixture
def attempt(tmp_path: Path) -> Attempt:
    config_path = tmp_path / "config.toml"
    config_path.write_text(render_toml({
        "data": {"root_dir": str(tmp_path / "data"), "storage_dir": str(tmp_path / "storage")},
        "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8},
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }))
    job = JobAssign(job_id=7, attempt=1, anime_id=5114, anime_title="Show", episode=3,
                    selected_index=1, selected_title="Show (site)", confidence="high",
                    lease_seconds=6.0, rate_limit_bps=0)
    return Attempt(job, load_config(config_path), worker_id="w01")


def test_hls_percent_sent_with_the_heartbeat_never_goes_backwards(attempt: Attempt) -> None:
    data = fixture("ytdlp_hls.out")
    raw = [p.percent for p in ProgressParser().feed(data)]
    assert any(b < a for a, b in zip(raw, raw[1:])), "the recording has a percent going down"

    sent = []
    for chunk in chunks(data, 7):
        attempt.output.feed("stdout", chunk)
        percent, _, _ = attempt.output.progress()
        if percent is not None:
            sent.append(percent)
    assert sent == sorted(sent)
    assert sent[-1] == 100.0
    assert max(raw) == 100.0 and sent[0] == raw[0]


def test_hls_eta_comes_from_the_estimated_total_when_yt_dlp_says_unknown(attempt: Attempt) -> None:
    data = fixture("ytdlp_hls.out")
    cut = data.index(b"29.0%") + 100  # a few states in, before the end
    attempt.output.feed("stdout", data[:cut])
    p = attempt.output.latest
    assert p is not None and not p.done and p.eta_seconds is None and p.speed_bps
    percent, speed, eta = attempt.output.progress()
    assert speed == p.speed_bps
    assert eta == round((p.total_bytes - p.downloaded_bytes) / p.speed_bps, 1)
    assert eta > 0


def test_the_running_max_restarts_with_a_second_download_in_one_run(attempt: Attempt) -> None:
    one = fixture("ytdlp_direct.out")  # a plain file: 0% ... 100% of ... in ...
    attempt.output.feed("stdout", one)
    assert attempt.output.progress()[0] == 100.0
    second_start = one[: one.index(b"%") + 60]  # the second download's first state(s)
    attempt.output.feed("stdout", second_start + b"\r")
    percent = attempt.output.progress()[0]
    assert percent is not None and percent < 100.0


def test_two_streams_interleaved_keep_their_own_lines(attempt: Attempt) -> None:
    out, err = fixture("ytdlp_hls_color.out"), fixture("ffmpeg_stats.err")
    err_chunks = chunks(err, 7)
    out_chunks = chunks(out, -(-len(out) // len(err_chunks)))  # both end in the last round
    assert len(out_chunks) == len(err_chunks)
    for a, b in zip(out_chunks, err_chunks):
        attempt.output.feed("stdout", a)
        attempt.output.feed("stderr", b)
    alone_out, alone_err = ProgressParser(), ProgressParser()
    alone_out.feed(out)
    alone_err.feed(err)
    assert attempt.output.parsers["stdout"].latest == alone_out.latest
    assert attempt.output.parsers["stderr"].latest == alone_err.latest
    # ffmpeg's stats came last: they are what the heartbeat shows (no percent, a speed).
    assert attempt.output.latest == alone_err.latest
    percent, speed, eta = attempt.output.progress()
    assert percent is None and eta is None and speed and speed > 0
    assert all("\x1b" not in line for line in attempt.output.tails["stdout"].lines())


def test_the_error_tail_is_stderr_else_stdout(attempt: Attempt) -> None:
    attempt.output.feed("stdout", fixture("ytdlp_404.merged"))
    tail = attempt.output.tail()
    assert "HTTP Error 404" in tail
    attempt.output.feed("stderr", b"\x1b[2K\r\x1b[1;31mEpisode not released!\x1b[0m\n")
    assert attempt.output.tail() == "Episode not released!"


def test_bytes_fall_back_to_the_private_directory(attempt: Attempt) -> None:
    attempt.download_dir.mkdir(parents=True)
    (attempt.download_dir / "Show Episode 3.mp4.part").write_bytes(b"x" * 5000)
    attempt.output.feed("stdout", b"[download] Destination: Show Episode 3.mp4\nno progress here\n")
    assert attempt.output.latest is None
    assert attempt.bytes_written() == 5000
    assert attempt.output.progress() == (None, None, None)


def test_read_pipes_feeds_both_streams_of_a_real_process(attempt: Attempt, tmp_path: Path) -> None:
    """The worker's read loop on a real child writing the recordings to stdout and stderr."""
    script = ("import sys\n"
              f"o = open({str(FIXTURES / 'ytdlp_hls.out')!r}, 'rb').read()\n"
              f"e = open({str(FIXTURES / 'ffmpeg_stats.err')!r}, 'rb').read()\n"
              "for i in range(0, max(len(o), len(e)), 97):\n"
              "    sys.stdout.buffer.write(o[i:i + 97]); sys.stdout.flush()\n"
              "    sys.stderr.buffer.write(e[i:i + 97]); sys.stderr.flush()\n")
    attempt.proc = process.start([sys.executable, "-c", script], tmp_path, {})
    code = None
    for _ in range(10_000):
        fds = attempt.fds()
        if fds:
            select.select(fds, [], [], 1.0)
        attempt.read_pipes()
        exit = attempt.exited()
        code = exit.code if exit is not None else None
        if code is not None:
            break
    assert code == 0
    alone = ProgressParser()
    alone.feed(fixture("ytdlp_hls.out"))
    assert attempt.output.parsers["stdout"].latest == alone.latest
    assert attempt.output.latest in (alone.latest, attempt.output.parsers["stderr"].latest)
    assert any("100% of" in line for line in attempt.output.tails["stdout"].lines())
    assert attempt.output.tails["stderr"].lines()[-1].startswith("frame=")
