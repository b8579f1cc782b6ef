"""verify_and_remux (services/worker/one_pass.py): one ffmpeg pass that verifies and remuxes.

Its verdicts are verify_video's, word for word: the same reason for a bad file, the same
VideoInfo for a good one; a good file ffmpeg cannot put into Matroska is a remux failure,
not a bad file. Sample media is made once with the real ffmpeg (imageio-ffmpeg's).
"""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest

from services.worker import one_pass, video
from services.worker.video import NotAVideo, RemuxError, verify_video
from tests.fakes.media import garbled_sample_sizes

FFMPEG = video.find_ffmpeg()
pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg (on PATH or via imageio-ffmpeg)")
EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def _ff(*args: str) -> None:
    subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-v", "error", "-y", *args], check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=60)



@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("one-pass-media")
    m = {"mp4": d / "good.mp4", "ts": d / "ts inside.mp4", "subs": d / "mov_text.mp4",
         "garbled": d / "garbled.mp4", "random": d / "random.mp4"}
    src = ["-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:duration=4",
           "-f", "lavfi", "-i", "sine=frequency=440:duration=4",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "25", "-c:a", "aac"]
    _ff(*src, str(m["mp4"]))
    _ff(*src, "-f", "mpegts", str(m["ts"]))  # what yt-dlp leaves without its ffmpeg fix-up
    srt = d / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:02,000\nhello\n")
    _ff("-i", str(m["mp4"]), "-i", str(srt), "-map", "0", "-map", "1", "-c", "copy", "-c:s", "mov_text",
        str(m["subs"]))
    m["garbled"].write_bytes(garbled_sample_sizes(m["mp4"].read_bytes()))
    m["random"].write_bytes(random.Random(16).randbytes(65536))
    return m


@pytest.mark.parametrize("name", ["mp4", "ts"])
def test_a_whole_video_is_remuxed_and_described_as_the_verify_pass_would(media, tmp_path: Path,
                                                                         name: str) -> None:
    dst = tmp_path / "out.mkv"
    info = one_pass.verify_and_remux(media[name], dst)
    alone = verify_video(media[name])  # (with ffprobe installed its duration has more digits)
    assert (info.container, info.has_video, info.has_audio) == (alone.container, alone.has_video,
                                                                alone.has_audio)
    assert info.duration_seconds == pytest.approx(alone.duration_seconds, abs=0.01)
    assert info.duration_seconds == pytest.approx(4, abs=0.5) and info.has_video and info.has_audio
    assert dst.read_bytes()[:4] == EBML_MAGIC
    assert verify_video(dst).duration_seconds == pytest.approx(4, abs=0.5)


# Random bytes named .mp4: "ffmpeg cannot read it", or with ffmpeg 5.1 a cut MP4 (it tries
# its MP4 demuxer on the name and finds no index).
RANDOM_REASON = "ffmpeg cannot read it|moov atom not found"


@pytest.mark.parametrize("name, reason", [("garbled", "truncated: "), ("random", RANDOM_REASON)])
def test_a_bad_file_is_refused_with_the_verify_pass_s_own_reason(media, tmp_path: Path, name: str,
                                                                 reason: str) -> None:
    with pytest.raises(NotAVideo) as verdict:
        verify_video(media[name])
    dst = tmp_path / "out.mkv"
    with pytest.raises(NotAVideo) as exc:
        one_pass.verify_and_remux(media[name], dst)
    assert str(exc.value) == str(verdict.value) and re.search(reason, str(exc.value))
    assert not dst.exists()


def test_a_good_file_matroska_cannot_hold_is_a_remux_failure_not_a_bad_file(media, tmp_path: Path) -> None:
    """A mov_text subtitle: the verify pass accepts the file, the Matroska muxer refuses it."""
    dst = tmp_path / "out.mkv"
    with pytest.raises(RemuxError) as exc:
        one_pass.verify_and_remux(media["subs"], dst)
    assert not exc.value.no_space and not exc.value.timed_out
    # ffmpeg 7 and later name the codec, 5.1 (Debian 12's) its number: the cause either way
    assert re.search("mov_text|Subtitle codec", str(exc.value)) and "[info]" not in str(exc.value), \
        str(exc.value)
    assert not dst.exists() and media["subs"].stat().st_size > 0
