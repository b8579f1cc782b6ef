"""The real ani-cli v5 script, unmodified and pinned, driven by the whole system.

Real supervisord, dispatcher, disk-watcher and workers run the real script (see
tests/third_party/ani-cli/README.md for where it comes from) against a local copy of
its provider, anidb.app (tests/fakes/provider.py), reached through a ``curl`` first on
PATH that sends ``https://anidb.app`` there and runs the real curl (tests/fakes/curl-shim).
The real yt-dlp downloads the HLS streams through the worker's wrappers. What is checked
is what a user checks: rows, files, metadata.json, the provider's access log.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared import failures
from services.worker import download, video
from services.worker.output import AniCliOutput
from tests.fakes.provider import Provider
from tests.integration.test_real_bytes import throughput
from tests.system import BIN, REPO, System

PIN_DIR = REPO / "tests" / "third_party" / "ani-cli"
PINNED = dict(line.split(" ", 1) for line in (PIN_DIR / "PINNED").read_text().splitlines())
CURL_SHIM = REPO / "tests" / "fakes" / "curl-shim"
TOOLS = ("curl", "sed", "grep", "tr", "cut", "head", "tail", "sort", "wc", "nl", "tput", "uname")


def find_real_ani_cli() -> tuple[Path | None, str]:
    """The pinned script, or None and why not."""
    candidates = [os.environ.get("ANI_CLI_REAL"), str(PIN_DIR / "ani-cli"), shutil.which("ani-cli")]
    seen = []
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest == PINNED["sha256"]:
            return path, ""
        seen.append(f"{path} (sha256 {digest[:12]}...)")
    found = f"; found only {', '.join(seen)}, not that one" if seen else ""
    return None, (f"needs the real ani-cli {PINNED['version']} (pystardust/ani-cli {PINNED['commit']}, "
                  f"sha256 {PINNED['sha256'][:12]}...) as $ANI_CLI_REAL, {PIN_DIR / 'ani-cli'} or "
                  f"ani-cli on PATH (see {PIN_DIR / 'README.md'}){found}")


REAL, WHY_NOT = find_real_ani_cli()
MISSING_TOOLS = [t for t in TOOLS if shutil.which(t) is None]
YTDLP = (BIN / "yt-dlp").is_file() or shutil.which("yt-dlp")
pytestmark = [
    pytest.mark.skipif(REAL is None, reason=WHY_NOT),
    pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"the real ani-cli needs {', '.join(MISSING_TOOLS)} "
                                                   "(Debian: curl, ncurses-bin, coreutils, sed, grep)"),
    pytest.mark.skipif(not YTDLP or video.find_ffmpeg() is None,
                       reason="needs yt-dlp and ffmpeg (pip install -e '.[test]')"),
]
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("site-cache")
    with Provider(cache, default_duration=2.0) as provider:
        yield provider


@pytest.fixture(autouse=True)
def real_surroundings(monkeypatch: pytest.MonkeyPatch, site: Provider, tmp_path: Path) -> None:
    """What the services inherit: the curl shim first on PATH, no proxy, no user yt-dlp
    configuration, and no TERM (as under supervisord started from a boot script)."""
    for name in [n for n in os.environ if "proxy" in n.lower()]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ANIDB_APP_URL", site.base_url)
    monkeypatch.setenv("PATH", f"{CURL_SHIM}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.delenv("ANI_CLI_PLAYER_FLAGS", raising=False)


def real_system(make_system, **downloader) -> System:
    return make_system({"downloader": {"command": str(REAL), "verify": True, "container": "mkv",
                                       "retry_backoff_seconds": 0, **downloader}})


def episode(system: System, mal_id: int, ep: int) -> Path:
    return system.storage / "videos" / str(mal_id) / "episodes" / f"ep{ep:03d}.mkv"


def test_real_episodes_land_and_failures_say_why(make_system, site: Provider) -> None:
    """A title with '/', one with brackets, one with '&', -S 2, a missing episode, a dead stream."""
    site.add_show("fate-zero-101", "Fate/Zero", 2, "fate-zero", mal_id=10087)
    site.add_show("oshi-no-ko-102", "[Oshi no Ko]", 1, "oshi-no-ko", mal_id=52034)
    site.add_show("kaguya-sama-love-is-war-103", "Kaguya-sama: Love is War", 1, "kaguya-1")
    site.add_show("kaguya-sama-love-is-war-season-2-104", "Kaguya-sama: Love is War Season 2", 1,
                  "kaguya-2", mal_id=40591)
    site.add_show("kiss-tell-105", "Kiss & Tell", 1, "kiss-tell")
    site.add_show("dead-stream-106", "Dead Stream", 1, "dead-stream")
    site.set_behaviour("dead-stream", 1, missing=True)
    for slug in ("fate-zero", "oshi-no-ko", "kaguya-2", "kiss-tell"):
        site.prepare(slug, 1)  # the media exists before the clock runs
    system = real_system(make_system)
    system.enqueue(10087, "Fate/Zero", [1, 2, 5], selected_index=1, max_retries=0)
    system.enqueue(52034, "[Oshi no Ko]", [1], selected_index=1)
    system.enqueue(40591, "Kaguya-sama: Love is War", [1], selected_index=2,
                   selected_title="Kaguya-sama: Love is War Season 2")
    system.enqueue(7, "Kiss & Tell", [1], selected_index=1)
    system.enqueue(8, "Dead Stream", [1], selected_index=1, max_retries=0)

    result = system.run("anime-downloader", "-c", str(system.config_path), "-w", "3",
                        "--exit-when-done", timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    rows = {(r["anime_id"], r["episode"]): r for r in system.jobs()}
    assert "summary: downloaded=5, failed=1" in result.stdout, (result.stdout, rows)
    for key in ((10087, 1), (10087, 2), (52034, 1), (40591, 1), (7, 1)):
        path, row = episode(system, *key), rows[key]
        assert (row["stage"], row["video_path"], row["retry_count"]) == ("downloaded", str(path), 0), row
        assert path.read_bytes()[:4] == EBML_MAGIC
        assert video.verify_video(path).duration_seconds == pytest.approx(2.0, abs=0.5)
    meta = {m: json.loads((system.storage / "videos" / str(m) / "metadata.json").read_text())
            for m in (10087, 52034, 40591, 7)}
    assert meta[10087]["episodes"]["2"]["site_title"] == "Fate/Zero"  # dl/Fate/Zero Episode 2.mp4
    assert meta[40591]["episodes"]["1"]["site_title"] == "Kaguya-sama: Love is War Season 2"
    assert meta[7]["episodes"]["1"]["site_title"] == "Kiss &amp; Tell"  # as the site sends it
    assert not any(e["title_mismatch"] for m in meta.values() for e in m["episodes"].values())
    # The queries ani-cli could carry: no brackets, no '&', '/' kept.
    searched = {e["query"] for e in site.log(kind="search")}
    assert searched == {"fate zero", "oshi no ko", "kaguya sama love is war", "kiss tell",
                        "dead stream"}, searched

    # An episode the site does not list: not released yet, so it waits for a re-check
    # (recheck_unreleased_hours) without using up a retry (max_retries=0 here).
    missing = rows[10087, 5]
    assert (missing["stage"], missing["retry_count"], missing["failure_class"]) == \
        ("queued", 0, "not_released"), missing
    assert missing["error_message"] == "ani-cli returned non-zero exit code: 1\nInvalid episode!"
    assert missing["next_attempt_at"] >= missing["unreleased_since"] + 6 * 3600 - 1, missing
    assert "waiting_for_release=1" in result.stdout, result.stdout
    dead = rows[8, 1]
    assert dead["stage"] == "failed", dead
    assert dead["error_message"].startswith("Downloaded video not found in expected location"), dead
    assert "404" in dead["error_message"] and "tput" not in dead["error_message"], dead
    assert system.private_dirs() == []


def run_real(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """The real script alone, as a worker runs it (download mode, no menu, TERM=dumb, stdin
    /dev/null), and the job's error message as the worker builds it from its output."""
    env = dict(os.environ, ANI_CLI_PLAYER="download", ANI_CLI_MENU="false", TERM="dumb",
               ANI_CLI_DOWNLOAD_DIR=str(tmp_path / "dl"), ANI_CLI_HIST_DIR=str(tmp_path / "hist"),
               PATH=f"{os.environ['PATH']}{os.pathsep}{BIN}")
    result = subprocess.run([str(REAL), *args], env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=60)
    out = AniCliOutput()
    out.feed("stdout", result.stdout)
    out.feed("stderr", result.stderr)
    error = download.judge(result.returncode, [], out.tail()).error or ""
    return result, error


def test_the_real_scripts_messages_are_classified(site: Provider, tmp_path: Path) -> None:
    """Each failure the real script reaches against its site, read as the worker reads it,
    has the class of shared/failures.py's table."""
    site.add_show("airing-show-301", "Airing Show", 2, "airing")
    site.add_show("sourceless-302", "Sourceless", 1, "sourceless", no_source=[1])
    cases = [
        (("-S", "1", "-e", "5", "-d", "Airing Show"), "Invalid episode!", failures.NOT_RELEASED),
        (("-S", "1", "-e", "1", "-d", "Nothing Like It"), "No results found!", failures.SELECTION),
        (("-S", "3", "-e", "1", "-d", "Airing Show"), "Invalid anime selection",
         failures.SELECTION),
        (("-S", "1", "-e", "1", "-d", "Sourceless"), "No sources found for sub!",
         failures.TRANSIENT),
    ]
    for args, message, expected in cases:
        result, error = run_real(tmp_path, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert error == f"ani-cli returned non-zero exit code: 1\n{message}", (args, error)
        assert failures.classify("error", error) == failures.Classified(expected, message), args
    site.challenge_searches()
    try:
        result, error = run_real(tmp_path, "-S", "1", "-e", "1", "-d", "Airing Show")
    finally:
        site.challenge_searches(False)
    # curl_exe is plain curl: the advice follows. The script dies in the search's subshell,
    # then again on the empty result: both lines, the block decides.
    said = "Blocked by cloudflare. Try installing curl-impersonate"
    assert error == f"ani-cli returned non-zero exit code: 1\n{said}\nNo results found!", error
    found = failures.classify("error", error)
    assert found == failures.Classified(failures.CLOUDFLARE, said)
    assert failures.stable_error(error, found) == f"ani-cli returned non-zero exit code: 1\n{said}"


def test_the_bandwidth_cap_holds_with_the_real_script(make_system, site: Provider, capsys) -> None:
    """total_bandwidth_mbps through the real ani-cli: 2 workers share 0.5 Mbit/s."""
    workers, cap_mbps = 2, 0.5
    cap = int(cap_mbps * 1_000_000 / 8)
    site.add_show("capped-show-201", "Capped Show", workers, "capped")
    site.set_duration("capped", seconds=4)
    last = len(site.prepare("capped", 1).segments) - 1
    system = real_system(make_system, total_bandwidth_mbps=cap_mbps)
    system.enqueue(201, "Capped Show", list(range(1, workers + 1)), selected_index=1)

    system.start_supervisord(workers)
    site.wait_for(lambda e: e["segment"] == last, slug="capped", kind="segment", count=workers,
                  timeout=60)

    rate, window = throughput(site, "capped", workers)
    with capsys.disabled():
        print(f"\n[real ani-cli bandwidth] cap {cap} B/s, {workers} workers: served {rate:.0f} B/s "
              f"({rate / cap:.1%}) over {window:.2f} s", file=sys.stderr)
    assert window >= 2.0, f"measurement window too short: {window:.2f}s"
    assert rate == pytest.approx(cap, rel=0.15)
