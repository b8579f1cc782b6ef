"""The worker's hold on ani-cli's downloader and on what it left (services/worker/):
the wrappers on ani-cli's PATH, the JSON progress they ask yt-dlp for, the search-safe
query, the site title in the file name, the file anywhere under the private directory,
the landing that never replaces an episode and writes metadata.json only after the link.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from services.worker import download, landing, private_dir, shims, titles
from services.worker.attempt import Attempt, PostResult
from services.worker.progress import ProgressParser
from shared.config import load_config
from shared.protocol import JobAssign
from tests.system import render_toml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def fake_tool(directory: Path, name: str) -> Path:
    """A stand-in for a real tool that records its argv and one environment variable."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$0.args\"\n"
                    f"printf '%s' \"${shims.ENV_UNDER_YTDLP}\" > \"$0.env\"\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def tools(tmp_path: Path) -> tuple[shims.Shims, dict[str, str], Path]:
    real = tmp_path / "real"
    fake_tool(real, "yt-dlp")
    fake_tool(real, "ffmpeg")
    installed = shims.install(tmp_path / "run")
    base = {"PATH": f"{real}{os.pathsep}/usr/bin{os.pathsep}/bin", "ANI_CLI_PLAYER_FLAGS": "-N 1",
            "HOME": str(tmp_path)}
    return installed, base, real


def run_env(tools, rate: int, tmp_path: Path) -> dict[str, str]:
    installed, base, _ = tools
    return download.build_env(base, tmp_path / "dl", tmp_path, rate, installed)


# --------------------------------------------------------------------------- environment


def test_ani_cli_gets_no_player_flags_a_dumb_terminal_and_a_menu_that_fails_loudly(tools, tmp_path):
    env = run_env(tools, 0, tmp_path)
    assert "ANI_CLI_PLAYER_FLAGS" not in env  # ani-cli would pass on only its first word
    assert env["TERM"] == "dumb" and env["ANI_CLI_PLAYER"] == "download"
    menu = subprocess.run([env["ANI_CLI_MENU"], "Select anime: "], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=10)
    assert menu.returncode == 1 and "ani-cli tried to open a menu (Select anime: )" in menu.stderr


def test_the_wrappers_go_first_on_path_only_for_tools_that_exist(tools, tmp_path):
    installed, base, real = tools
    env = run_env(tools, 0, tmp_path)
    first = env["PATH"].split(os.pathsep)[:3]
    assert first == [str(installed.ytdlp_dir), str(installed.ffmpeg_dir), str(real)]
    assert env[shims.ENV_REAL_YTDLP] == str(real / "yt-dlp")
    (real / "yt-dlp").unlink()
    assert str(installed.ytdlp_dir) in run_env(tools, 0, tmp_path)["PATH"]  # looked up again later
    installed._cache = None  # RESOLVE_SECONDS later
    env = run_env(tools, 0, tmp_path)
    assert str(installed.ytdlp_dir) not in env["PATH"] and shims.ENV_REAL_YTDLP not in env


def test_yt_dlp_gets_one_fragment_at_a_time_the_rate_and_json_progress(tools, tmp_path):
    installed, _, real = tools
    env = run_env(tools, 31250, tmp_path)
    # ani-cli's own command line (line 300), through the wrapper it finds on PATH
    args = ["URL", "--no-skip-unavailable-fragments", "--fragment-retries", "infinite",
            "-N", "16", "-o", "dl/T Episode 1.mp4"]
    assert subprocess.run(["yt-dlp", *args], env=env, timeout=10).returncode == 0
    got = (real / "yt-dlp.args").read_text().splitlines()
    assert got == args + ["-N", "1", "--limit-rate", "31250", "--newline", "--progress-template",
                          shims.PROGRESS_TEMPLATE]
    assert (real / "yt-dlp.env").read_text() == "1"  # its ffmpeg fix-up passes through
    env = run_env(tools, 0, tmp_path)
    subprocess.run(["yt-dlp", *args], env=env, timeout=10)
    assert (real / "yt-dlp.args").read_text().splitlines()[len(args):] == [
        "--newline", "--progress-template", shims.PROGRESS_TEMPLATE]  # uncapped: ani-cli's -N 16


def test_ffmpeg_passes_through_for_yt_dlp_and_refuses_ani_cli_s_fallback_under_a_cap(tools, tmp_path):
    _, _, real = tools
    fallback = ["-extension_picky", "0", "-loglevel", "error", "-stats", "-i", "URL", "-c", "copy", "o.mp4"]
    env = run_env(tools, 31250, tmp_path)
    refused = subprocess.run(["ffmpeg", *fallback], env=env, capture_output=True, text=True, timeout=10)
    assert refused.returncode == 1 and not (real / "ffmpeg.args").exists()
    assert refused.stderr.startswith(shims.FFMPEG_REFUSAL) and "total_bandwidth_mbps" in refused.stderr
    under = dict(env, **{shims.ENV_UNDER_YTDLP: "1"})
    assert subprocess.run(["ffmpeg", "-i", "x"], env=under, timeout=10).returncode == 0
    assert (real / "ffmpeg.args").read_text().splitlines() == ["-i", "x"]
    uncapped = run_env(tools, 0, tmp_path)
    assert subprocess.run(["ffmpeg", *fallback], env=uncapped, timeout=10).returncode == 0
    assert (real / "ffmpeg.args").read_text().splitlines() == fallback


def test_imageio_s_ffmpeg_is_found_without_importing_it() -> None:
    found = shims.bundled_ffmpeg()
    pytest.importorskip("imageio_ffmpeg")
    assert found and os.access(found, os.X_OK)


# --------------------------------------------------------------------------- progress


def test_json_progress_of_hls_with_16_fragments_counts_exact_bytes() -> None:
    parser = ProgressParser()
    figures = parser.feed((FIXTURES / "ytdlp_hls_json_N16.out").read_bytes())
    assert len(figures) == 85 and figures[-1].done and figures[-1].percent == 100.0
    assert figures[-1].downloaded_bytes == figures[-1].total_bytes == 407772
    assert parser.destination and parser.destination.endswith("x Episode 1.mp4")
    lines = [json.loads(line.split(" ", 1)[1]) for line in
             (FIXTURES / "ytdlp_hls_json_N16.out").read_text().splitlines()
             if line.startswith(shims.PROGRESS_TAG)]
    for figure, raw in zip(figures, lines):
        assert figure.downloaded_bytes == raw["bytes"]
        if raw["frags"]:  # never below the share of fragments done
            assert figure.percent >= 100 * raw["frag"] / raw["frags"] - 1e-9


# --------------------------------------------------------------------------- titles


@pytest.mark.parametrize("title, query", [
    ("[Oshi no Ko]", "Oshi no Ko"), ("Steins;Gate #2", "Steins;Gate 2"), ("Kiss & Tell", "Kiss Tell"),
    ("A+B?", "A B"), ("100%", "100"), ("Fate/Zero", "Fate/Zero"), ("JoJo's", "JoJo's"),
    ('"Q" {x}\nnext', "Q x next"), ("[]#", ""),
])
def test_the_search_query_carries_no_character_curl_or_the_url_changes(title: str, query: str) -> None:
    assert titles.search_query(title) == query


def test_the_site_title_is_read_from_the_file_name_and_compared_loosely() -> None:
    assert titles.site_title("Fate/Zero Episode 12.mp4") == ("Fate/Zero", "12")
    assert titles.site_title("Kiss &amp; Tell Episode 1.mp4") == ("Kiss &amp; Tell", "1")
    assert titles.site_title("random.mkv") is None
    assert titles.same_show("Kiss & Tell", "Kiss &amp; Tell")
    assert titles.same_show("Re:ZERO  -Starting Life-", "re zero starting life")
    assert not titles.same_show("Kaguya-sama: Love is War", "Kaguya-sama: Love is War Season 2")


# --------------------------------------------------------------------------- judging


def test_the_one_file_is_found_in_a_subdirectory(tmp_path: Path) -> None:
    dl = tmp_path / "dl"
    (dl / "Fate").mkdir(parents=True)
    (dl / "Fate" / "Zero Episode 1.mp4").write_bytes(b"x" * 10)
    outcome = download.judge(0, private_dir.files_under(dl), "")
    assert dl / outcome.file == dl / "Fate" / "Zero Episode 1.mp4" and outcome.error is None
    assert private_dir.bytes_in(dl) == 10


def test_no_file_says_what_was_found_and_the_downloader_s_destination(tmp_path: Path) -> None:
    dl = tmp_path / "dl"
    (dl / "Fate").mkdir(parents=True)
    (dl / "Fate" / "Zero Episode 1.mp4.part").write_bytes(b"x")
    outcome = download.judge(0, private_dir.files_under(dl), "ERROR: fragment 3 not found",
                             "dl/Fate/Zero Episode 1.mp4")
    assert outcome.file is None
    assert outcome.error == ("Downloaded video not found in expected location (found: "
                             "Fate/Zero Episode 1.mp4.part; the downloader's destination: "
                             "dl/Fate/Zero Episode 1.mp4)\nERROR: fragment 3 not found")


def test_a_file_vanishing_while_it_is_judged_is_no_crash(tmp_path: Path, monkeypatch) -> None:
    """yt-dlp deletes its fragment files as it appends them: one listed a moment ago may be
    gone when it is looked at (the worker judged from its timers and died of it)."""
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / "Show Episode 1.mp4").write_bytes(b"x" * 5)
    frag = dl / "Show Episode 1 (1).mp4"  # e.g. removed by a leftover of the downloader
    frag.write_bytes(b"y")
    real_stat, gone = os.stat, []

    def stat_then_vanish(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == str(frag) and not gone:
            gone.append(frag)
            os.unlink(frag)  # listed, stat-ed once, then deleted by "yt-dlp"
        return result

    monkeypatch.setattr(os, "stat", stat_then_vanish)
    outcome = download.judge(0, private_dir.files_under(dl), "")
    assert outcome.file is None and outcome.error.startswith("Downloaded video not found")


# --------------------------------------------------------------------------- landing


@pytest.fixture
def attempt(tmp_path: Path) -> Attempt:
    config_path = tmp_path / "config.toml"
    config_path.write_text(render_toml({
        "data": {"root_dir": str(tmp_path / "data"), "storage_dir": str(tmp_path / "storage")},
        "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8},
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }))
    (tmp_path / "storage").mkdir()  # the disk is there (shared/storage.py: never created)
    job = JobAssign(job_id=7, attempt=1, anime_id=5114, anime_title="Show", episode=3,
                    selected_index=1, selected_title="Show (site)", confidence="high",
                    lease_seconds=6.0, rate_limit_bps=0)
    a = Attempt(job, load_config(config_path), worker_id="w01")
    a.prepare()
    staged = a.private_dir / "ready-a1.mkv"
    staged.write_bytes(b"new episode")
    a.post.result = PostResult(staged=staged, ext=".mkv", size=11)
    return a


def target_of(a: Attempt) -> Path:
    return a.config.storage_dir / "videos" / "5114" / "episodes" / "ep003.mkv"


def test_metadata_json_is_written_only_after_the_link(attempt: Attempt) -> None:
    target = target_of(attempt)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"another episode")  # the link fails: a different file is there
    with pytest.raises(FileExistsError):
        attempt.land(str(target), None, False)
    assert target.read_bytes() == b"another episode"
    assert not (attempt.config.storage_dir / "videos" / "5114" / "metadata.json").exists()


def test_the_rename_fallback_never_replaces_an_episode(attempt: Attempt, monkeypatch) -> None:
    """No hard links (some SMB mounts): the episode appears after any check could look."""
    target = target_of(attempt)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"another episode")

    def no_links(*_args, **_kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(Path, "exists", lambda self: False)  # a check that came too early
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    with pytest.raises(FileExistsError):
        attempt.land(str(target), None, False)
    assert target.read_bytes() == b"another episode"
    assert attempt.post.result.staged.read_bytes() == b"new episode"


def test_the_rename_fallback_lands_when_the_name_is_free(attempt: Attempt, monkeypatch) -> None:
    def no_links(*_args, **_kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    attempt.land(str(target_of(attempt)), None, False)
    assert target_of(attempt).read_bytes() == b"new episode"
    meta = json.loads((attempt.config.storage_dir / "videos" / "5114" / "metadata.json").read_text())
    assert meta["episodes"]["3"]["file"] == "ep003.mkv"


def test_rename_noreplace_is_atomic_in_the_kernel(tmp_path: Path) -> None:
    src, dst, lock = tmp_path / "a", tmp_path / "b", tmp_path / "lock"
    src.write_text("a")
    dst.write_text("b")
    with pytest.raises(FileExistsError):
        landing.rename_noreplace(src, dst, lock)
    assert landing._renameat2() is not None, "glibc without renameat2: only the locked fallback"
    dst.unlink()
    landing.rename_noreplace(src, dst, lock)
    assert dst.read_text() == "a" and not src.exists()
