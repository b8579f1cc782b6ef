"""Tests of services.worker.video (verify.py, remux.py, media_tools.py, containers.py): tool
discovery, verify_video's verdicts, remux_to_mkv.

Sample media is made once per module with the real ffmpeg (imageio-ffmpeg's
binary); tests that need it skip with a reason when it is missing.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from services.worker import video
except ModuleNotFoundError:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from services.worker import video

from services.worker import media_tools, remux, verify  # noqa: E402
from services.worker.video import NotAVideo, RemuxError, VerifyTimeout, VideoInfo, remux_to_mkv, verify_video

FFMPEG = video.find_ffmpeg()
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg (on PATH or via imageio-ffmpeg)")
DURATION = 4.0
MP4_FORMAT = "mov,mp4,m4a,3gp,3g2,mj2"

HTML = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body><h1>404 Not Found</h1><p>nginx</p></body></html>\n")
PLAYLIST = (b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n"
            b"http://127.0.0.1:9/seg000.ts\n#EXT-X-ENDLIST\n")


def _ff(*args: str) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def _cut(src: Path, dst: Path, fraction: float = 0.6, extra: int = 0) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction) + extra])
    return dst


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good and broken sample files, generated once."""
    if FFMPEG is None:
        pytest.skip("needs ffmpeg (on PATH or via imageio-ffmpeg)")
    d = tmp_path_factory.mktemp("media")
    src = ["-f", "lavfi", "-i", f"testsrc=size=160x120:rate=25:duration={DURATION}",
           "-f", "lavfi", "-i", f"sine=frequency=440:duration={DURATION}",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "25", "-c:a", "aac"]
    m: dict[str, Path] = {}
    m["mp4"] = d / "good.mp4"
    _ff(*src, str(m["mp4"]))  # moov at the end (ffmpeg's default)
    m["faststart"] = d / "faststart.mp4"
    _ff("-i", str(m["mp4"]), "-c", "copy", "-movflags", "+faststart", str(m["faststart"]))
    m["ts"] = d / "good.ts"
    _ff(*src, "-f", "mpegts", str(m["ts"]))
    m["ts_as_mp4"] = d / "ts inside.mp4"  # what yt-dlp leaves when it cannot run the ffmpeg fix-up
    m["ts_as_mp4"].write_bytes(m["ts"].read_bytes())
    m["mkv"] = d / "good.mkv"
    _ff("-i", str(m["mp4"]), "-c", "copy", str(m["mkv"]))
    m["colon"] = d / "Re:Zero Episode 1.mp4"
    m["colon"].write_bytes(m["mp4"].read_bytes())
    m["audio"] = d / "audio-only.m4a"
    _ff("-f", "lavfi", "-i", f"sine=duration={DURATION}", "-c:a", "aac", str(m["audio"]))
    m["png"] = d / "image.mp4"
    _ff("-f", "lavfi", "-i", "testsrc=size=64x64:duration=1", "-frames:v", "1", "-f", "image2", "-c:v", "png",
        str(d / "image.png"))
    m["png"].write_bytes((d / "image.png").read_bytes())
    m["html"] = d / "html.mp4"
    m["html"].write_bytes(HTML)
    m["playlist"] = d / "playlist.mp4"
    m["playlist"].write_bytes(PLAYLIST)
    m["text"] = d / "text.mp4"
    m["text"].write_bytes(b"Error: the requested file could not be found on this server.\n" * 3)
    m["empty"] = d / "empty.mp4"
    m["empty"].write_bytes(b"")
    m["random"] = d / "random.mp4"
    m["random"].write_bytes(random.Random(1116).randbytes(16384))
    m["trunc_mp4"] = _cut(m["mp4"], d / "trunc.mp4")
    m["trunc_faststart"] = _cut(m["faststart"], d / "trunc-faststart.mp4")
    m["trunc_ts"] = _cut(m["ts"], d / "trunc.ts", extra=5)
    m["trunc_mkv"] = _cut(m["mkv"], d / "trunc.mkv")
    return m


# --------------------------------------------------------------------------- tool discovery


def test_module_import_does_not_load_imageio() -> None:
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", "import sys, services.worker.video; print('imageio_ffmpeg' in sys.modules)"],
        cwd=repo, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_find_ffmpeg_prefers_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert video.find_ffmpeg() == str(fake)


def test_find_ffmpeg_falls_back_to_imageio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("imageio_ffmpeg", reason="imageio-ffmpeg not installed")
    monkeypatch.setenv("PATH", str(tmp_path))  # empty dir: nothing on PATH
    exe = video.find_ffmpeg()
    assert exe is not None and os.access(exe, os.X_OK)
    assert "imageio_ffmpeg" in exe


def test_find_ffmpeg_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import raises ImportError
    assert video.find_ffmpeg() is None


def test_find_ffprobe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert video.find_ffprobe() is None
    fake = tmp_path / "ffprobe"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert video.find_ffprobe() == str(fake)


# --------------------------------------------------------------------------- verify_video: accepted


@needs_ffmpeg
@pytest.mark.parametrize("name,container", [
    ("mp4", MP4_FORMAT), ("faststart", MP4_FORMAT), ("ts", "mpegts"), ("ts_as_mp4", "mpegts"),
    ("mkv", "matroska,webm"), ("colon", MP4_FORMAT),
])
def test_accepts_whole_videos(media: dict[str, Path], name: str, container: str) -> None:
    info = verify_video(media[name])
    assert info.container == container
    assert info.has_video and info.has_audio
    assert info.duration_seconds == pytest.approx(DURATION, abs=0.5)


# --------------------------------------------------------------------------- verify_video: rejected


@needs_ffmpeg
@pytest.mark.parametrize("name,reason", [
    ("empty", "empty file"),
    ("html", "HTML page"),
    ("playlist", "HLS playlist"),
    ("text", "text file"),
    ("trunc_mp4", "truncated MP4"),
    ("trunc_faststart", "truncated MP4"),
    ("trunc_ts", "truncated MPEG-TS"),
    ("trunc_mkv", "truncated Matroska"),
    ("audio", "no video stream"),
    ("png", "image"),
    ("random", "ffmpeg cannot read it|moov atom not found"),  # the latter: ffmpeg 5.1, on the name
])
def test_rejects(media: dict[str, Path], name: str, reason: str) -> None:
    with pytest.raises(NotAVideo) as exc:
        verify_video(media[name])
    assert re.search(reason, str(exc.value)), str(exc.value)


def test_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotAVideo, match="no such file"):
        verify_video(tmp_path / "nope.mp4")


def test_rejects_directory(tmp_path: Path) -> None:
    with pytest.raises(NotAVideo, match="not a regular file"):
        verify_video(tmp_path)


@needs_ffmpeg
@pytest.mark.parametrize("name,reason", [
    ("trunc_mp4", "moov atom not found"),
    ("trunc_faststart", "truncated"),
    ("trunc_mkv", "truncated"),
])
def test_ffmpeg_alone_detects_truncation(media: dict[str, Path], name: str, reason: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: with the structural checks off, the ffmpeg pass still rejects."""
    monkeypatch.setattr(verify, "structural_check", lambda *a: None)
    with pytest.raises(NotAVideo) as exc:
        verify_video(media[name])
    assert re.search(reason, str(exc.value)), str(exc.value)


@needs_ffmpeg
def test_ts_cut_on_packet_boundary_passes_as_shorter(media: dict[str, Path], tmp_path: Path) -> None:
    """Documented limit: a TS cut exactly between packets is a valid, shorter stream."""
    data = media["ts"].read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: (len(data) // 2) // 188 * 188])
    info = verify_video(cut)
    assert info.duration_seconds is not None and info.duration_seconds < DURATION - 1


# --------------------------------------------------------------------------- without tools / with ffprobe


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "find_ffmpeg", lambda: None)
    monkeypatch.setattr(verify, "find_ffprobe", lambda: None)


@needs_ffmpeg
@pytest.mark.parametrize("name,container", [("mp4", MP4_FORMAT), ("faststart", MP4_FORMAT),
                                            ("ts", "mpegts"), ("mkv", "matroska,webm")])
def test_magic_fallback_accepts(media: dict[str, Path], no_tools: None, name: str, container: str) -> None:
    assert verify_video(media[name]) == VideoInfo(None, container, True, False)


@needs_ffmpeg
@pytest.mark.parametrize("name,reason", [
    ("html", "HTML page"), ("playlist", "HLS playlist"), ("empty", "empty"),
    ("trunc_mp4", "truncated MP4"), ("trunc_faststart", "truncated MP4"), ("trunc_ts", "truncated MPEG-TS"),
    ("trunc_mkv", "truncated Matroska"), ("random", "unrecognised format"), ("audio", "unrecognised"),
])
def test_magic_fallback_rejects(media: dict[str, Path], no_tools: None, name: str, reason: str) -> None:
    if name == "audio":
        # An .m4a is an MP4 container: without tools it cannot be told from a video. Documented limit.
        assert verify_video(media[name]).container == MP4_FORMAT
        return
    with pytest.raises(NotAVideo) as exc:
        verify_video(media[name])
    assert re.search(reason, str(exc.value)), str(exc.value)


def _fake_ffprobe(bin_dir: Path, payload: dict | None, rc: int = 0, stderr: str = "") -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "ffprobe"
    record = bin_dir / "ffprobe.args"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        f"sys.stdout.write({json.dumps(payload)!r} if {payload is not None} else '')\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({rc})\n")
    exe.chmod(0o755)
    return record


@needs_ffmpeg
def test_ffprobe_used_for_metadata(media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"programs": [], "streams": [{"codec_type": "video", "disposition": {"attached_pic": 0}}],
               "format": {"format_name": MP4_FORMAT, "duration": "4.100000"}}
    record = _fake_ffprobe(tmp_path / "bin", payload)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    info = verify_video(media["mp4"])
    assert info == VideoInfo(4.1, MP4_FORMAT, True, False)  # ffprobe's view (fake: no audio)
    args = json.loads(record.read_text())
    assert "format=duration,format_name:stream=codec_type:stream_disposition=attached_pic" in args
    assert args[-1] == "file:" + str(media["mp4"])


@needs_ffmpeg
def test_ffprobe_attached_pic_is_not_video(media: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    payload = {"streams": [{"codec_type": "audio"}, {"codec_type": "video", "disposition": {"attached_pic": 1}}],
               "format": {"format_name": MP4_FORMAT, "duration": "4.0"}}
    _fake_ffprobe(tmp_path / "bin", payload)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(NotAVideo, match="no video stream"):
        verify_video(media["mp4"])


@needs_ffmpeg
def test_ffprobe_failure_is_rejection(media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_ffprobe(tmp_path / "bin", None, rc=1, stderr="file:x: Invalid data found when processing input\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    with pytest.raises(NotAVideo, match="Invalid data found"):
        verify_video(media["mp4"])


# --------------------------------------------------------------------------- process hygiene


@needs_ffmpeg
def test_timeout_kills_the_tool(media: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "pid"
    hang = tmp_path / "ffmpeg-hang"
    hang.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(verify, "find_ffmpeg", lambda: str(hang))
    monkeypatch.setattr(verify, "find_ffprobe", lambda: None)
    t0 = time.monotonic()
    with pytest.raises(VerifyTimeout, match="did not read the file within"):
        verify_video(media["mp4"], timeout_seconds=0.5)
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


@needs_ffmpeg
def test_subprocess_calls_are_argument_lists(media: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = subprocess.Popen

    def spy(args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((args, kwargs))
        return real(args, **kwargs)

    monkeypatch.setattr(media_tools.subprocess, "Popen", spy)
    verify_video(media["mp4"])
    remux_to_mkv(media["mp4"], tmp_path / "out.mkv")
    assert len(calls) == (3 if video.find_ffprobe() else 2)  # ffprobe, where there is one, first
    for args, kwargs in calls:
        assert isinstance(args, list) and all(isinstance(a, str) for a in args)
        assert not kwargs.get("shell")
        assert kwargs["stdin"] is subprocess.DEVNULL
        assert "-nostdin" in args or Path(args[0]).name == "ffprobe"  # ffprobe reads no stdin


# --------------------------------------------------------------------------- remux_to_mkv


@needs_ffmpeg
@pytest.mark.parametrize("name", ["mp4", "ts", "ts_as_mp4", "colon"])
def test_remux_to_mkv(media: dict[str, Path], tmp_path: Path, name: str) -> None:
    dst = tmp_path / "Re:Zero out.mkv.tmp"  # odd name, no .mkv extension: -f matroska decides
    remux_to_mkv(media[name], dst)
    assert dst.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"
    before, after = verify_video(media[name]), verify_video(dst)
    assert after.container == "matroska,webm"
    assert after.has_video and after.has_audio
    assert after.duration_seconds == pytest.approx(before.duration_seconds, abs=0.1)


@needs_ffmpeg
def test_remux_is_lossless(media: dict[str, Path], tmp_path: Path) -> None:
    """Stream copy: same number of video packets and the same codec."""
    dst = tmp_path / "out.mkv"
    remux_to_mkv(media["mp4"], dst)

    def packets(p: Path) -> str:
        r = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-i", str(p), "-map", "0:v", "-c", "copy",
                            "-f", "null", "-"], capture_output=True, text=True, timeout=60)
        return [ln for ln in r.stderr.splitlines() if "video:" in ln][-1].split()[0]

    assert packets(dst) == packets(media["mp4"])


@needs_ffmpeg
def test_remux_overwrites_existing_destination(media: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "out.mkv"
    dst.write_bytes(b"stale")
    remux_to_mkv(media["mp4"], dst)
    assert dst.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"


@needs_ffmpeg
@pytest.mark.parametrize("name", ["html", "trunc_mp4"])
def test_remux_failure_raises_and_removes_output(media: dict[str, Path], tmp_path: Path, name: str) -> None:
    dst = tmp_path / "out.mkv"
    with pytest.raises(RemuxError, match="ffmpeg exit"):
        remux_to_mkv(media[name], dst)
    assert not dst.exists()


def test_remux_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remux, "find_ffmpeg", lambda: None)
    with pytest.raises(RemuxError, match="no ffmpeg"):
        remux_to_mkv(tmp_path / "a.mp4", tmp_path / "a.mkv")
