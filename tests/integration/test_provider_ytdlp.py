"""The real download path from the m3u8 URL on: fake provider -> real yt-dlp -> verify -> remux.

yt-dlp runs exactly as ani-cli v5 runs it::

    yt-dlp URL --no-skip-unavailable-fragments --fragment-retries infinite -N 16 \
        -o "<dir>/<title> Episode <n>.mp4" $ANI_CLI_PLAYER_FLAGS

with a temp bin dir holding an ``ffmpeg`` symlink (imageio-ffmpeg's binary) first
on PATH so yt-dlp can fix up the MPEG-TS it downloads into a real MP4. Waits are
on the provider's access log (condition variable) or on bounded polls of a
file, never on fixed sleeps.

What is tested here is yt-dlp's real behaviour (the facts the worker relies on) and the
provider's fidelity to a real HLS CDN (playlists, segments, Range); the provider's own
knobs are exercised by the tests that use them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(REPO))

from services.worker.video import NotAVideo, remux_to_mkv, verify_video
from services.worker import video
from tests.fakes.provider import Provider, read_log_file
from tests.system import wait_for

FFMPEG = video.find_ffmpeg()


def _find_ytdlp() -> str | None:
    sibling = Path(sys.executable).with_name("yt-dlp")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("yt-dlp")


YTDLP = _find_ytdlp()
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg (on PATH or via imageio-ffmpeg)")
needs_ytdlp = pytest.mark.skipif(YTDLP is None or FFMPEG is None,
                                 reason="needs yt-dlp (next to the python or on PATH) and ffmpeg")
DURATION = 4.0


def ani_cli_ytdlp_args(url: str, download_dir: Path, title: str, episode: Any, player_flags: str = "") -> list[str]:
    """ani-cli v5's yt-dlp command line; ``player_flags`` is $ANI_CLI_PLAYER_FLAGS (word-split)."""
    return [YTDLP or "yt-dlp", url, "--no-skip-unavailable-fragments", "--fragment-retries", "infinite",
            "-N", "16", "-o", f"{download_dir}/{title} Episode {episode}.mp4", *player_flags.split()]


def ani_cli_ffmpeg_args(ffmpeg: str, url: str, out: Path) -> list[str]:
    """ani-cli's fallback when yt-dlp is not installed."""
    return [ffmpeg, "-extension_picky", "0", "-loglevel", "error", "-stats", "-i", url, "-c", "copy", str(out)]


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Bounded poll of something with no event to block on (a file another process writes);
    raises a TimeoutError when it runs out."""
    return wait_for(cond, timeout, what, interval=0.01)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("provider-cache")


@pytest.fixture(scope="module")
def provider(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Provider:
    if FFMPEG is None:
        pytest.skip("needs ffmpeg (on PATH or via imageio-ffmpeg) to generate the provider's media")
    log = tmp_path_factory.mktemp("provider-log") / "access.jsonl"
    with Provider(cache_dir, access_log=log) as p:
        yield p


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PATH with an ``ffmpeg`` symlink first; HOME/XDG isolated from the user's yt-dlp config; no proxy."""
    if FFMPEG is None:
        pytest.skip("needs ffmpeg")
    root = tmp_path_factory.mktemp("tools")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").symlink_to(FFMPEG)
    e = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    e.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(root),
             XDG_CONFIG_HOME=str(root / "config"), XDG_CACHE_HOME=str(root / "cache"),
             NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    return e


_slug_counter = iter(range(10**6))


@pytest.fixture
def slug(request: pytest.FixtureRequest) -> str:
    """A fresh slug per test so behaviours and log entries never mix."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-").lower()[:40]
    return f"{name}-{next(_slug_counter)}"


def run_ytdlp(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _seg_entries(p: Provider, slug: str, since_time: float = 0.0) -> list[dict]:
    return [e for e in p.log(slug=slug, kind="segment") if e["time"] >= since_time]


# --------------------------------------------------------------------------- provider on its own


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@needs_ffmpeg
def test_provider_serves_hls(provider: Provider, slug: str) -> None:
    status, body, headers = _get(provider.episode_url(slug, 1))
    assert status == 200 and headers["Content-Type"] == "application/vnd.apple.mpegurl"
    text = body.decode()
    assert text.startswith("#EXTM3U") and "#EXT-X-ENDLIST" in text
    segs = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert segs == ["seg000.ts", "seg001.ts", "seg002.ts", "seg003.ts"]
    assert sum(float(x) for x in re.findall(r"#EXTINF:([\d.]+)", text)) == pytest.approx(DURATION)
    status, seg, _ = _get(f"{provider.base_url}/{slug}/1/seg000.ts")
    assert status == 200 and seg[0] == 0x47 and len(seg) % 188 == 0
    # Range, as a CDN does (yt-dlp uses it to resume a fragment)
    status, part, headers = _get(f"{provider.base_url}/{slug}/1/seg000.ts", {"Range": "bytes=100-"})
    assert status == 206 and part == seg[100:] and headers["Content-Range"] == f"bytes 100-{len(seg) - 1}/{len(seg)}"
    assert _get(f"{provider.base_url}/{slug}/1/seg000.ts", {"Range": f"bytes={len(seg)}-"})[0] == 416
    assert _get(f"{provider.base_url}/{slug}/1/seg999.ts")[0] == 404
    assert _get(f"{provider.base_url}/{slug}/../etc/passwd")[0] == 404
    # An entry is logged when its response ends, on the server's thread: the client may be
    # done first, so wait for all five and take them in the order the server wrote them.
    entries = provider.wait_for(count=5, slug=slug)
    assert sorted(e["status"] for e in entries) == [200, 200, 206, 404, 416]
    whole = [e for e in entries if e["status"] == 200 and e["segment"] == 0]
    assert len(whole) == 1 and whole[0]["bytes"] == len(seg) and whole[0]["complete"]
    # the same entries are in the JSON-lines file
    assert [e for e in read_log_file(provider.access_log_path) if e.get("slug") == slug] == entries


# --------------------------------------------------------------------------- yt-dlp, the ani-cli way


@needs_ytdlp
def test_download_verify_remux(provider: Provider, env: dict[str, str], tmp_path: Path, slug: str) -> None:
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Re:Zero", 1), env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "Re:Zero Episode 1.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no .part/.ytdl/Frag debris
    assert "[FixupM3u8]" in r.stdout  # yt-dlp found our ffmpeg and turned the TS into MP4
    info = verify_video(out)
    assert info.container.startswith("mov,mp4")
    assert info.has_video and info.has_audio
    assert info.duration_seconds == pytest.approx(DURATION, abs=0.5)
    segs = _seg_entries(provider, slug)
    assert sorted(e["segment"] for e in segs) == [0, 1, 2, 3] and all(e["status"] == 200 for e in segs)

    mkv = tmp_path / "Re:Zero Episode 1.mkv.part"
    remux_to_mkv(out, mkv)
    assert mkv.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"
    minfo = verify_video(mkv)
    assert minfo.container == "matroska,webm" and minfo.has_video and minfo.has_audio
    assert minfo.duration_seconds == pytest.approx(info.duration_seconds, abs=0.1)


@needs_ytdlp
def test_bogus_playlist_is_rejected(provider: Provider, env: dict[str, str], tmp_path: Path, slug: str) -> None:
    """ani-cli #1116: a playlist whose segments are not video. yt-dlp fails in the fix-up but leaves the file."""
    provider.serve_bogus(slug, 1, "playlist")
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Bogus", 1), env)
    out = tmp_path / "Bogus Episode 1.mp4"
    # yt-dlp fails in its fix-up, except with an ffmpeg that exits 0 from it (Debian 12's 5.1):
    # then it says it succeeded, and only the worker's verify stands between the HTML and a landing.
    assert r.returncode != 0 or out.exists()
    if out.exists():  # yt-dlp 2026.10 leaves the concatenated HTML "segments" as the .mp4
        with pytest.raises(NotAVideo, match="HTML page"):
            verify_video(out)
    assert len(_seg_entries(provider, slug)) == 3


@needs_ytdlp
@pytest.mark.parametrize("kind", ["html", "html-as-video"])
def test_html_at_the_m3u8_url(provider: Provider, env: dict[str, str], tmp_path: Path, slug: str,
                              kind: str) -> None:
    provider.serve_bogus(slug, 1, kind)
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Html", 1), env)
    assert r.returncode != 0
    for f in tmp_path.iterdir():  # nothing normally; if anything is left it must not pass as a video
        with pytest.raises(NotAVideo):
            verify_video(f)


@needs_ytdlp
def test_failing_segment_is_retried(provider: Provider, env: dict[str, str], tmp_path: Path, slug: str) -> None:
    provider.fail_segment(slug, 1, 2, times=2)
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Retry", 1), env)
    assert r.returncode == 0, r.stderr
    assert verify_video(tmp_path / "Retry Episode 1.mp4").duration_seconds == pytest.approx(DURATION, abs=0.5)
    seg2 = [(e["status"], e["behaviour"]) for e in _seg_entries(provider, slug) if e["segment"] == 2]
    assert seg2 == [(500, "fail"), (500, "fail"), (200, None)]  # yt-dlp prints nothing about it with -N > 1


@needs_ytdlp
def test_dropped_connection_is_resumed(provider: Provider, env: dict[str, str], tmp_path: Path, slug: str) -> None:
    provider.drop_segment(slug, 1, 1, times=2)
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Drop", 1), env)
    assert r.returncode == 0, r.stderr
    assert verify_video(tmp_path / "Drop Episode 1.mp4").duration_seconds == pytest.approx(DURATION, abs=0.5)
    seg1 = [e for e in _seg_entries(provider, slug) if e["segment"] == 1]
    size = (provider.prepare(slug, 1).directory / "seg001.ts").stat().st_size
    assert [e["complete"] for e in seg1] == [False, False, True]
    # yt-dlp keeps what it got and asks for the rest with Range: half, then a quarter, then the last quarter
    assert seg1[0]["range"] is None and seg1[0]["bytes"] == size // 2
    assert seg1[1]["range"] == f"bytes={size // 2}-" and seg1[1]["status"] == 206
    assert seg1[2]["status"] == 206 and seg1[2]["range"] == f"bytes={size // 2 + seg1[1]['bytes']}-"
    assert sum(e["bytes"] for e in seg1) == size


@needs_ytdlp
def test_ani_cli_ffmpeg_fallback(provider: Provider, env: dict[str, str], tmp_path: Path, slug: str) -> None:
    out = tmp_path / "Fallback Episode 1.mp4"
    r = subprocess.run(ani_cli_ffmpeg_args(FFMPEG, provider.episode_url(slug, 1), out), env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert verify_video(out).duration_seconds == pytest.approx(DURATION, abs=0.5)


@needs_ytdlp
def test_killed_ffmpeg_fallback_leaves_a_rejected_file(provider: Provider, env: dict[str, str], tmp_path: Path,
                                                       slug: str) -> None:
    """ffmpeg killed mid-download (SIGKILL: no chance to write the moov atom) -> a truncated MP4."""
    provider.set_behaviour(slug, 1, segment_rate={2: 2000, 3: 2000})
    out = tmp_path / "Killed Episode 1.mp4"
    proc = subprocess.Popen(ani_cli_ffmpeg_args(FFMPEG, provider.episode_url(slug, 1), out), env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # ffmpeg asks every segment with "Range: bytes=0-", so the provider answers 206
        provider.wait_for(slug=slug, segment=1, complete=True, timeout=30)
        wait_until(lambda: out.exists() and out.stat().st_size > 0, 30, "ffmpeg to write some output")
    finally:
        proc.kill()
        proc.wait(10)
    with pytest.raises(NotAVideo, match="moov atom|truncated|incomplete"):
        verify_video(out)


_DONE_RE = re.compile(r"100% of\s+~?\s*([\d.]+)(B|KiB|MiB)\s+in\s+([\d:]+)\s+at\s+([\d.]+)(B|KiB|MiB)/s")
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2}


def _ytdlp_reported_rate(stdout: str) -> float:
    m = _DONE_RE.findall(stdout.replace("\r", "\n"))
    assert m, stdout[-2000:]
    return float(m[-1][3]) * _UNITS[m[-1][4]]


@pytest.mark.slow
@needs_ytdlp
def test_limit_rate_caps_throughput_with_one_connection(provider: Provider, env: dict[str, str], tmp_path: Path,
                                                        slug: str, capsys: pytest.CaptureFixture) -> None:
    """ANI_CLI_PLAYER_FLAGS='--limit-rate 100K -N 1': the later -N wins; aggregate is capped."""
    cap = 100 * 1024  # yt-dlp's K is 1024
    provider.set_duration(slug, 1, seconds=10)
    provider.prepare(slug, 1)
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Rate", 1, "--limit-rate 100K -N 1"),
                  env)
    assert r.returncode == 0, r.stderr
    segs = sorted(_seg_entries(provider, slug), key=lambda e: e["time"])
    # One connection: request k+1 is sent only once fragment k was fully read, so the span between the first
    # and the last request covers all bytes but the last fragment's, at the client's pace.
    server_rate = sum(e["bytes"] for e in segs[:-1]) / (segs[-1]["time"] - segs[0]["time"])
    reported = _ytdlp_reported_rate(r.stdout)
    with capsys.disabled():
        print(f"\n[limit-rate -N 1] cap {cap} B/s: provider sees {server_rate:.0f} B/s "
              f"({server_rate / cap:.1%}), yt-dlp reports {reported:.0f} B/s ({reported / cap:.1%})")
    assert server_rate == pytest.approx(cap, rel=0.25)
    assert reported == pytest.approx(cap, rel=0.25)
    assert verify_video(tmp_path / "Rate Episode 1.mp4").duration_seconds == pytest.approx(10, abs=0.5)


@pytest.mark.slow
@needs_ytdlp
def test_limit_rate_is_per_fragment_with_ani_cli_N16(provider: Provider, env: dict[str, str], tmp_path: Path,
                                                     slug: str, capsys: pytest.CaptureFixture) -> None:
    """ANI_CLI_PLAYER_FLAGS='--limit-rate 100K' alone: yt-dlp limits each of the 16 fragment downloads,
    so the aggregate is several times the cap. If this starts failing, yt-dlp has begun to cap the
    aggregate and the '-N 1' workaround is no longer needed."""
    cap = 100 * 1024
    provider.set_duration(slug, 1, seconds=10)
    provider.prepare(slug, 1)
    r = run_ytdlp(ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Rate16", 1, "--limit-rate 100K"), env)
    assert r.returncode == 0, r.stderr
    reported = _ytdlp_reported_rate(r.stdout)
    segs = _seg_entries(provider, slug)
    concurrent = max(sum(1 for f in segs if f["time"] <= e["time"] < f["time"] + f["elapsed"] + 0.05) for e in segs)
    with capsys.disabled():
        print(f"\n[limit-rate -N 16] cap {cap} B/s: yt-dlp reports {reported:.0f} B/s ({reported / cap:.1f}x the cap), "
              f"{len(segs)} fragments, up to {concurrent} requests in flight")
    assert reported > 1.5 * cap
    assert reported < 16 * cap * 1.25


@pytest.mark.slow
@needs_ytdlp
def test_interrupted_download_resumes_by_fragment(provider: Provider, env: dict[str, str], tmp_path: Path,
                                                  slug: str, capsys: pytest.CaptureFixture) -> None:
    """SIGTERM yt-dlp mid-episode, rerun the same command: only what is missing is fetched.

    yt-dlp's native HLS downloader keeps ``<out>.part`` (fragments appended in
    order), ``<out>.ytdl`` ({"current_fragment": {"index": k}} = fragments 1..k
    are in the .part) and ``<out>.part-Frag<n>[.part]`` for fragments in flight.
    With --continue (the default) a rerun skips fragments 1..k, reuses complete
    Frag files and resumes partial ones with an HTTP Range request.
    """
    n_segs, fast = 8, 3
    provider.set_behaviour(slug, 1, duration=n_segs, segment_rate={i: 4000 for i in range(fast, n_segs)})
    media = provider.prepare(slug, 1)
    sizes = [(media.directory / s).stat().st_size for s in media.segments]
    assert len(sizes) == n_segs
    args = ani_cli_ytdlp_args(provider.episode_url(slug, 1), tmp_path, "Resume", 1)
    out = tmp_path / "Resume Episode 1.mp4"
    part, ytdl = Path(f"{out}.part"), Path(f"{out}.ytdl")

    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        provider.wait_for(lambda e: e["segment"] < fast, slug=slug, kind="segment", status=200, complete=True,
                          count=fast, timeout=30)

        def appended() -> int:
            try:
                return json.loads(ytdl.read_text())["downloader"]["current_fragment"]["index"]
            except (OSError, ValueError, KeyError):
                return 0

        wait_until(lambda: appended() >= fast, 15, f"yt-dlp to append the first {fast} fragments")
        try:  # best effort: let some bytes of the slow fragments reach the disk so Range resumption shows
            wait_until(lambda: any(p.stat().st_size for p in tmp_path.glob("*-Frag*.part")), 5, "partial fragments")
        except TimeoutError:
            pass
    finally:
        proc.send_signal(signal.SIGTERM)  # yt-dlp has no SIGTERM handler: it dies on the spot
        proc.wait(10)
    assert not out.exists() and part.exists() and ytdl.exists()

    k = appended()
    assert k >= fast
    complete_frags = {int(m.group(1)) - 1 for p in tmp_path.iterdir() if (m := re.search(r"-Frag(\d+)$", p.name))}
    partial = {int(m.group(1)) - 1: p.stat().st_size for p in tmp_path.iterdir()
               if (m := re.search(r"-Frag(\d+)\.part$", p.name))}
    assert part.stat().st_size == sum(sizes[:k])
    missing = [i for i in range(k, n_segs) if i not in complete_frags]

    provider.set_behaviour(slug, 1, segment_rate={})  # the provider is fast again
    t_rerun = time.time()
    r = run_ytdlp(args, env)
    assert r.returncode == 0, r.stderr
    second = sorted(_seg_entries(provider, slug, since_time=t_rerun), key=lambda e: e["segment"])
    assert [e["segment"] for e in second] == missing
    for e in second:
        got = partial.get(e["segment"], 0)
        if got:
            assert (e["status"], e["range"]) == (206, f"bytes={got}-")
        else:
            assert (e["status"], e["range"]) == (200, None)
        assert e["bytes"] == sizes[e["segment"]] - got
    refetched = sum(e["bytes"] for e in second)
    with capsys.disabled():
        print(f"\n[resume] {n_segs} segments, {sum(sizes)} B; killed with {k} appended, "
              f"{len(complete_frags)} complete + {len(partial)} partial fragment files "
              f"({sum(partial.values())} B); rerun fetched segments {missing} = {refetched} B "
              f"({sum(1 for e in second if e['range'])} with Range)")
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert verify_video(out).duration_seconds == pytest.approx(n_segs, abs=0.5)
