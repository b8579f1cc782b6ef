"""Tests of services.worker.progress against real yt-dlp / ffmpeg output (tests/fixtures)."""

from __future__ import annotations

import re
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

try:
    from services.worker import progress as progress_mod
except ModuleNotFoundError:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from services.worker import progress as progress_mod

from services.worker.progress import MAX_LINE_BYTES, OutputTail, Progress, ProgressParser, parse_line

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHUNK_SIZES = [1, 7, None]  # None: the whole file in one chunk
KiB, MiB, GiB = 1024, 1024**2, 1024**3


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def parse_chunked(data: bytes, size: int | None) -> list[Progress]:
    parser = ProgressParser()
    step = size or max(len(data), 1)
    out: list[Progress] = []
    for i in range(0, len(data), step):
        out += parser.feed(data[i:i + step])
    out += parser.flush()
    assert parser.latest == (out[-1] if out else None)
    return out


def tail_of(data: bytes, size: int | None = 7, **kwargs: int) -> OutputTail:
    tail = OutputTail(**kwargs)
    step = size or max(len(data), 1)
    for i in range(0, len(data), step):
        tail.feed(data[i:i + step])
    return tail


def kib(x: float) -> int:
    return round(x * KiB)


# --------------------------------------------------------------------------- yt-dlp fixtures

# name -> (first total "~121.17KiB", final speed in bytes/s); every run: 6 fragments of 120.25KiB.
YTDLP_HLS = {
    "ytdlp_hls.out": kib(281.07),            # no --newline: \r redraws, --limit-rate 50K
    "ytdlp_hls_anicli.out": round(2.66 * MiB),  # exactly ani-cli's command line
    "ytdlp_hls_newline.out": kib(283.47),
    "ytdlp_hls_color.out": kib(279.59),      # --color always
}


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("name", sorted(YTDLP_HLS))
def test_ytdlp_hls_fixture(name: str, size: int | None) -> None:
    data = fixture(name)
    figures = parse_chunked(data, size)

    # One figure per progress state in the raw bytes, whatever the chunking.
    assert len(figures) == len(re.findall(rb"\d%", data)) == 37
    assert figures == parse_chunked(data, None)
    assert {f.source for f in figures} == {"yt-dlp"}

    first, last = figures[0], figures[-1]
    assert first.percent == 0.8
    assert first.total_bytes == kib(121.17)        # "of ~ 121.17KiB": binary units
    assert first.downloaded_bytes == round(kib(121.17) * 0.008)
    assert first.eta_seconds is None               # "ETA Unknown"
    assert first.speed_bps == 0.0                  # "0.00B/s"
    assert not first.done

    assert last.done and last.percent == 100.0
    assert last.total_bytes == last.downloaded_bytes == kib(120.25)
    assert last.speed_bps == YTDLP_HLS[name]
    assert last.eta_seconds == 0.0
    assert [f.done for f in figures].count(True) == 1

    running = [f.percent for f in figures[:-1]]
    assert all(p is not None and 0 < p < 100 for p in running)
    assert max(running[:5]) < 10 and running[-1] > 80  # rises overall...
    # ...but not monotonically: with -N 16 the estimated total swings as fragments
    # land out of order (real output, e.g. "14.7% ... 14.4% ... 13.8%").
    assert any(b < a for a, b in zip(running, running[1:]))


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_ytdlp_speed_units_in_limited_run(size: int | None) -> None:
    figures = parse_chunked(fixture("ytdlp_hls.out"), size)
    speeds = [f.speed_bps for f in figures[:-1]]
    # The rate limiter's figures as printed: 0.00B/s, then 36.64KiB/s ...
    assert speeds[:6] == [0.0] * 6
    assert speeds[6] == kib(36.64)
    assert speeds[-1] == kib(139.85)


def test_colour_codes_do_not_change_figures() -> None:
    """The same lines, coloured the way ``--color always`` does, give the same figures."""
    plain = fixture("ytdlp_hls_newline.out")
    coloured = re.sub(rb"( *\d+\.\d%)", b"\x1b[0;94m\\1\x1b[0m", plain)
    coloured = re.sub(rb"(at +)([\d.]+\w+/s)", b"\\1\x1b[0;32m\\2\x1b[0m", coloured)
    coloured = coloured.replace(b"[download]", b"\r\x1b[K[download]")
    assert coloured.count(b"\x1b[") > 100
    for size in CHUNK_SIZES:
        assert parse_chunked(coloured, size) == parse_chunked(plain, None)


def test_colour_fixture_is_really_coloured() -> None:
    data = fixture("ytdlp_hls_color.out")
    assert b"\x1b[0;94m" in data and b"\x1b[K" in data
    figures = parse_chunked(data, 3)
    assert figures[6].speed_bps == kib(36.84)  # "\x1b[0;32m  36.84KiB/s\x1b[0m"


@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_ytdlp_direct_file_known_total(size: int | None) -> None:
    """A plain file: a real total, real ETA, and "100.0%" (running) before "100%" (done)."""
    figures = parse_chunked(fixture("ytdlp_direct.out"), size)
    assert [f.percent for f in figures] == [5.0, 14.9, 34.7, 74.3, 100.0, 100.0]
    assert [f.done for f in figures] == [False] * 5 + [True]
    assert {f.total_bytes for f in figures} == {kib(20.20)}
    assert figures[0].downloaded_bytes == round(kib(20.20) * 0.05)
    assert figures[0].speed_bps == kib(19.95)
    assert figures[0].eta_seconds == 0.0  # "ETA 00:00"
    assert figures[-1].speed_bps == kib(19.93)


def test_ytdlp_failed_fragment_run() -> None:
    data = fixture("ytdlp_hls_missing_frag.merged")
    figures = parse_chunked(data, 7)
    assert figures and not any(f.done for f in figures)
    # The last state had "ERROR: " glued on it and is still read.
    assert figures[-1].percent == 69.3 and figures[-1].total_bytes == kib(144.75)
    # "...(frag 1/6)[download] Got error: ..." is parsed as the progress before the junk.
    assert any(f.percent == 21.1 for f in figures)


# --------------------------------------------------------------------------- ffmpeg fixtures

@pytest.mark.parametrize("size", CHUNK_SIZES)
def test_ffmpeg_stats_fixture(size: int | None) -> None:
    figures = parse_chunked(fixture("ffmpeg_stats.err"), size)
    assert [f.media_seconds for f in figures] == [1.57, 2.57, 3.54, 4.54, 5.54, 6.03]
    assert [f.downloaded_bytes for f in figures] == [0] * 5 + [100 * KiB]  # "KiB" = 1024
    assert [f.done for f in figures] == [False] * 5 + [True]               # "Lsize="
    assert {f.source for f in figures} == {"ffmpeg"}
    assert all(f.percent is None and f.total_bytes is None and f.eta_seconds is None for f in figures)
    # bitrate= 135.5kbits/s (output bytes per media second) * speed=2.23x
    assert figures[-1].speed_bps == pytest.approx(135.5 * 1000 / 8 * 2.23)


def test_ffmpeg_anicli_fixture_single_final_report() -> None:
    figures = parse_chunked(fixture("ffmpeg_stats_anicli.err"), 1)
    assert len(figures) == 1
    f = figures[0]
    assert f.done and f.downloaded_bytes == 100 * KiB and f.media_seconds == 6.03
    assert f.speed_bps == pytest.approx(135.5 * 1000 / 8 * 689)  # "speed= 689x"


def test_ffmpeg_done_is_not_success() -> None:
    """ffmpeg skips a 404 segment silently (-loglevel error), exits 0 and prints Lsize=."""
    data = fixture("ffmpeg_missing_seg.err")
    assert b"frame=  125" in data  # 150 frames in the full stream
    (f,) = parse_chunked(data, 7)
    assert f.done and f.downloaded_bytes == 84 * KiB and f.media_seconds == 6.03


# --------------------------------------------------------------------------- hand-written lines

def P(percent=None, downloaded=None, total=None, speed=None, eta=None, media=None,
      source="yt-dlp", done=False) -> Progress:
    return Progress(percent, downloaded, total, speed, eta, media, source, done)


HAND_WRITTEN = [
    ("[download]  42.3% of ~ 1.20GiB at  3.10MiB/s ETA 04:12 (frag 3/120)",
     P(42.3, round(round(1.2 * GiB) * 0.423), round(1.2 * GiB), round(3.1 * MiB), 252.0)),
    ("[download]  42.3% of    1.20GiB at  3.10MiB/s ETA 04:12",
     P(42.3, round(round(1.2 * GiB) * 0.423), round(1.2 * GiB), round(3.1 * MiB), 252.0)),
    ("[download]   0.0% of ~  Unknown B at  Unknown B/s ETA Unknown (frag 0/12)", P(0.0)),
    ("[download]  10.0% of ~ 1.00GiB at Unknown speed ETA Unknown", P(10.0, GiB // 10, GiB)),
    ("[download]   5.0% of    2.00MiB at  Unknown B/s ETA --:--", P(5.0, round(2 * MiB * 0.05), 2 * MiB)),
    ("[download]  N/A% at  Unknown B/s ETA Unknown", P()),
    ("[download] 100% of   33.05KiB in 00:00:00 at 4.39MiB/s",
     P(100.0, kib(33.05), kib(33.05), round(4.39 * MiB), 0.0, done=True)),
    ("[download] 100% in 00:00:03", P(100.0, eta=0.0, done=True)),
    ("[download]  12.5% of 10.00MiB at 500.00KiB/s ETA 00:18",
     P(12.5, 10 * MiB // 8, 10 * MiB, 500 * KiB, 18.0)),
    ("[download]  12.5% of 10.00MiB at 500.00KiB/s ETA 1:02:03",
     P(12.5, 10 * MiB // 8, 10 * MiB, 500 * KiB, 3723.0)),
    ("[download]   1.0% of  300.00GiB at 1.00MiB/s ETA 85:19:15",
     P(1.0, round(300 * GiB * 0.01), 300 * GiB, MiB, 85 * 3600 + 19 * 60 + 15.0)),
    ("[download]  50.0% of 10.00MB at 1.50KB/s ETA 00:01",  # decimal spellings: powers of 1000
     P(50.0, 5_000_000, 10_000_000, 1500, 1.0)),
    ("[download]   12.50MiB at  1.20MiB/s (00:00:10)", P(None, round(12.5 * MiB), None, round(1.2 * MiB))),
    ("[download] Episode 1.mp4 has already been downloaded", P(100.0, eta=0.0, done=True)),
    ("size=    1024kB time=00:01:02.00 bitrate= 135.3kbits/s speed=2.01x",
     P(None, 1024 * KiB, speed=135.3 * 1000 / 8 * 2.01, media=62.0, source="ffmpeg")),
    ("size=    1024KiB time=00:01:02.00 bitrate= 135.3kbits/s speed=2.01x",
     P(None, 1024 * KiB, speed=135.3 * 1000 / 8 * 2.01, media=62.0, source="ffmpeg")),
    ("size=N/A time=00:00:10.00 bitrate=N/A speed=N/A", P(media=10.0, source="ffmpeg")),
    ("size=    1024KiB time=N/A bitrate=N/A speed=N/A", P(None, MiB, source="ffmpeg")),
    ("frame=  123 fps= 30 q=-1.0 size=    2048KiB time=00:00:04.92 bitrate=3410.1kbits/s speed=1.5x",
     P(None, 2 * MiB, speed=3410.1 * 1000 / 8 * 1.5, media=4.92, source="ffmpeg")),
    ("frame=   12 fps=0.0 q=-1.0 size=       0KiB time=-00:00:00.04 bitrate=N/A speed=N/A",
     P(None, 0, source="ffmpeg")),
    ("Lsize=    4096kB time=01:00:00.00 bitrate=   9.3kbits/s speed=1.01e+03x",
     P(None, 4 * MiB, speed=9.3 * 1000 / 8 * 1010, media=3600.0, source="ffmpeg", done=True)),
]


@pytest.mark.parametrize("line,expected", HAND_WRITTEN, ids=[l for l, _ in HAND_WRITTEN])
def test_hand_written_lines(line: str, expected: Progress) -> None:
    got = parse_line(line)
    assert got is not None
    if got.speed_bps is not None and expected.speed_bps is not None:
        assert got.speed_bps == pytest.approx(expected.speed_bps)
        got = Progress(**{**got.__dict__, "speed_bps": expected.speed_bps})
    assert got == expected


@pytest.mark.parametrize("line", [
    "", "[download] Destination: out.mp4", "[generic] Extracting URL: http://x/index.m3u8",
    "[hlsnative] Total fragments: 6", "ERROR: [generic] nope: Unable to download webpage",
    '[FixupM3u8] Fixing MPEG-TS in MP4 container of "out.mp4"', "[download] Got error: HTTP Error 404",
    "frame=  123 fps= 30 q=-1.0", "Duration: 00:24:00.00, start: 0.000000, bitrate: 1000 kb/s",
])
def test_not_progress(line: str) -> None:
    assert parse_line(line) is None


def test_parse_line_strips_colour() -> None:
    line = "[download] \x1b[0;94m 42.3%\x1b[0m of ~ 1.20GiB at \x1b[0;32m 3.10MiB/s\x1b[0m ETA \x1b[0;33m04:12\x1b[0m"
    assert parse_line(line) == parse_line("[download]  42.3% of ~ 1.20GiB at  3.10MiB/s ETA 04:12")


def test_percent_clamped() -> None:
    p = parse_line("[download] 101.3% of ~ 1.00MiB at 1.00MiB/s ETA 00:00")
    assert p is not None and p.percent == 100.0 and not p.done


# --------------------------------------------------------------------------- chunk boundaries

def test_partial_line_waits_for_terminator_or_flush() -> None:
    parser = ProgressParser()
    assert parser.feed(b"[download]  42") == [] and parser.latest is None
    assert parser.feed(b".3% of 10.00MiB at 1.00MiB/s ETA 00:18") == []
    (p,) = parser.feed(b"\r[download]  50.0% of 10.00MiB")  # the \r ends the first line
    assert p.percent == 42.3 and parser.latest == p
    (q,) = parser.flush()
    assert q.percent == 50.0 and q.total_bytes == 10 * MiB and parser.latest == q
    assert parser.flush() == []


def test_crlf_split_across_chunks_and_escape_split() -> None:
    parser = ProgressParser()
    out = parser.feed(b"\r\x1b[K[download] \x1b[0;9")
    out += parser.feed(b"4m  7.5%\x1b[0m of 1.00KiB at 1.00KiB/s ETA 00:01\r")
    out += parser.feed(b"\n")
    assert [p.percent for p in out] == [7.5]


def test_utf8_split_across_chunks() -> None:
    line = "[download] Destination: Сэйлор Мун 日本.mp4\n".encode()
    tail = tail_of(line, 1)
    assert tail.lines() == ["[download] Destination: Сэйлор Мун 日本.mp4"]


# --------------------------------------------------------------------------- OutputTail

HLS_HEADER = [
    "[generic] index: Downloading webpage",
    "[generic] index: Downloading m3u8 information",
    "[generic] index: Checking m3u8 live status",
    "[info] index: Downloading 1 format(s): 0",
    "[hlsnative] Downloading m3u8 manifest",
    "[hlsnative] Total fragments: 6",
    "[download] Destination: out.mp4",
]


@pytest.mark.parametrize("name", sorted(YTDLP_HLS))
def test_tail_collapses_progress(name: str) -> None:
    lines = tail_of(fixture(name), 7).lines()
    assert lines[1:8] == HLS_HEADER
    assert re.fullmatch(r"\[download\] 100% of  120\.25KiB in 00:00:00 at [\d.]+[KM]iB/s", lines[8])
    assert lines[9:] == ['[FixupM3u8] Fixing MPEG-TS in MP4 container of "out.mp4"']
    assert "\x1b" not in "".join(lines)


def test_tail_of_interrupted_download_shows_last_state_once() -> None:
    data = fixture("ytdlp_hls.out")
    cut = data.index(b"\r[download] 100%")
    lines = tail_of(data[:cut], 1).lines()
    assert lines[-2] == "[download] Destination: out.mp4"
    assert lines[-1] == "[download]  85.5% of ~ 140.63KiB at  139.85KiB/s ETA Unknown (frag 6/6)"


def test_tail_of_ffmpeg_keeps_final_report_only() -> None:
    assert tail_of(fixture("ffmpeg_stats.err"), 5).lines() == [
        "frame=  150 fps= 55 q=-1.0 Lsize=     100KiB time=00:00:06.03 bitrate= 135.5kbits/s"
        " speed=2.23x elapsed=0:00:02.71"]


def test_tail_keeps_errors_of_failed_run() -> None:
    lines = tail_of(fixture("ytdlp_hls_missing_frag.merged"), 7).lines()
    assert lines[-2:] == [
        "[download] Got error: HTTP Error 404: File not found. Giving up after 3 retries",
        "ERROR: write to closed file",
    ]
    retries = [l for l in lines if "Retrying fragment 4" in l]
    assert [l[-8:] for l in retries] == ["(1/3)...", "(2/3)...", "(3/3)..."]
    assert len(lines) == len(set(lines)) == 8 + 3 + 2


def test_tail_of_404() -> None:
    tail = tail_of(fixture("ytdlp_404.merged"), None)
    assert tail.lines()[-1].startswith("ERROR: [generic] nope: Unable to download webpage: HTTP Error 404")
    assert tail.text().endswith("(caused by <HTTPError 404: File not found>)")


def test_tail_bounds_lines_and_chars() -> None:
    tail = OutputTail(max_lines=5, max_chars=30)
    tail.feed(b"".join(b"line %d\n" % i for i in range(100)))
    assert tail.lines() == [f"line {i}" for i in range(95, 100)]
    assert tail.text() == "\n".join(f"line {i}" for i in range(95, 100))[-30:]
    assert len(tail.text()) == 30 and tail.text().endswith("line 99")


def test_tail_partial_and_redrawn_current_line() -> None:
    tail = OutputTail()
    tail.feed(b"start\n\r[download]  10.0% of 1.00MiB at 1.00MiB/s ETA 00:01")
    assert tail.lines() == ["start", "[download]  10.0% of 1.00MiB at 1.00MiB/s ETA 00:01"]
    tail.feed(b"\r[download]  20.0% of 1.00MiB at 1.00MiB/s ETA 00:01\r")
    assert tail.lines() == ["start", "[download]  20.0% of 1.00MiB at 1.00MiB/s ETA 00:01"]
    tail.feed(b"\x1b[0;31mERROR:\x1b[0m boom\n")
    assert tail.lines() == ["start", "ERROR: boom"]


def test_rejects_empty_bounds() -> None:
    with pytest.raises(ValueError):
        OutputTail(max_lines=0)


# --------------------------------------------------------------------------- memory cap

def test_huge_line_without_newline_is_bounded() -> None:
    block = b"x" * (64 * KiB)
    parser, tail = ProgressParser(), OutputTail(max_chars=4000)
    tracemalloc.start()
    try:
        for _ in range(160):  # 10 MiB, never a newline
            parser.feed(block)
            tail.feed(block)
        parser.feed(b"END")
        tail.feed(b"END")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 * MiB
    assert len(progress_mod._clean(bytes(parser._split._buf))) == MAX_LINE_BYTES
    assert tail.lines()[-1] == ("x" * 4000 + "END")[-4000:]
    # The stream recovers at the next line.
    (p,) = parser.feed(b"\n[download]  12.5% of 10.00MiB at 500.00KiB/s ETA 00:18\n")
    assert p.percent == 12.5
    tail.feed(b"\nERROR: boom\n")
    assert tail.lines()[-1] == "ERROR: boom" and tail.lines()[-2].endswith("xEND")
    assert len(tail.lines()[-2]) == 4000


def test_huge_complete_line_in_one_chunk_is_truncated() -> None:
    tail = OutputTail(max_chars=100)
    tail.feed(b"y" * (10 * MiB) + b"TAIL\n")
    assert tail.lines() == ["y" * 96 + "TAIL"]


def test_pathological_key_value_line_is_fast() -> None:
    line = b"time=00:00:01.00 size=1kB " + b"a=a" * 20000 + b" !\n"
    start = time.monotonic()
    tail = tail_of(line, None)
    assert time.monotonic() - start < 1.0
    assert tail.lines()[-1].endswith("!")


def test_glued_message_does_not_lend_its_fields() -> None:
    """A message glued onto a progress line is not read as that line's fields."""
    p = parse_line("[download]  10.0% at  Unknown B/s ETA Unknown[download] 100% of 1.00MiB in 00:00:01")
    assert p == P(10.0)


def test_stray_control_characters_are_dropped() -> None:
    tail = OutputTail()
    tail.feed(b"\x1b]0;yt-dlp 5%\x07be\x07ll\x08 \x1bZdone\t!\n")
    assert tail.lines() == ["bell done\t!"]
