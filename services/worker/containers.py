"""What a video file's first bytes say, without any tool: text, MP4 boxes, EBML, MPEG-TS.

Cheap checks that need no ffmpeg (and the whole verdict when there is none): a file
whose first 4 KiB are text (an HLS playlist, an HTML error page) is no video; an MP4
box running past the end of the file, a Matroska segment longer than the file, or an
MPEG-TS whose size is not a multiple of 188 bytes is a truncated download.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

SNIFF_BYTES = 4096
TS_PACKET = 188
MP4_FORMAT = "mov,mp4,m4a,3gp,3g2,mj2"  # ffmpeg's name of the MP4 demuxer


class NotAVideo(Exception):
    """The file is not a complete, playable video. ``str(exc)`` is the reason."""


def reject_text(head: bytes, size: int) -> None:
    """Raise NotAVideo when the first bytes are a playlist, a web page or other text."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    low = stripped[:1024].lower()
    if stripped.startswith(b"#EXTM3U"):
        raise NotAVideo(f"an HLS playlist (m3u8, {size} bytes), not a video: the playlist was saved "
                        "instead of its segments")
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in low:
        title = re.search(rb"<title>(.*?)</title>", stripped[:SNIFF_BYTES], re.I | re.S)
        what = f" ({title.group(1).decode('utf-8', 'replace').strip()[:80]!r})" if title else ""
        raise NotAVideo(f"an HTML page{what}, {size} bytes, not a video")
    if low.startswith(b"<?xml") or low.startswith(b"<mpd"):
        raise NotAVideo(f"an XML document ({size} bytes), not a video")
    if _looks_like_text(head):
        raise NotAVideo(f"a text file ({size} bytes), not a video")


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sniff window
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.97 * max(len(text), 1)


def _ts_stride(head: bytes) -> bool:
    """MPEG-TS with 188-byte packets: sync byte at 0, 188, 376, ... (as far as ``head`` goes)."""
    if len(head) < TS_PACKET or head[0] != 0x47:
        return False
    return all(head[i] == 0x47 for i in range(0, min(len(head), TS_PACKET * 8), TS_PACKET))


MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"moof", b"styp", b"sidx", b"uuid",
              b"pdin", b"meta", b"mfra", b"emsg", b"prft"}


def _mp4_check(path: Path, size: int) -> None:
    """Walk top-level boxes: raise NotAVideo if one runs past EOF or there is no moov."""
    seen: set[bytes] = set()
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            hdr = f.read(16)
            if len(hdr) < 8:
                break  # a few stray bytes after the last box: players ignore them, so do we
            box_size, box_type = struct.unpack(">I4s", hdr[:8])
            if box_size == 1:
                if len(hdr) < 16:
                    raise NotAVideo("truncated MP4: a box header is cut")
                box_size = struct.unpack(">Q", hdr[8:16])[0]
            elif box_size == 0:
                box_size = size - pos  # to the end of the file
            if box_size < 8:
                raise NotAVideo(f"corrupt MP4: box {box_type!r} at offset {pos} has size {box_size}")
            seen.add(box_type)
            if pos + box_size > size:
                raise NotAVideo(
                    f"truncated MP4: box {box_type.decode('latin-1')!r} at offset {pos} needs "
                    f"{box_size} bytes, the file ends {pos + box_size - size} bytes early")
            pos += box_size
    if b"moov" not in seen:
        raise NotAVideo("incomplete MP4: no moov atom (the download or the remux did not finish)")


def _read_vint(buf: bytes, pos: int) -> tuple[int, int, bool]:
    """EBML variable-length integer at ``pos``: (value, length, all_ones=unknown size)."""
    first = buf[pos]
    length = 1
    mask = 0x80
    while length <= 8 and not first & mask:
        mask >>= 1
        length += 1
    if length > 8 or pos + length > len(buf):
        raise ValueError("bad vint")
    value = first & (mask - 1)
    for b in buf[pos + 1: pos + length]:
        value = (value << 8) | b
    return value, length, value == (1 << (7 * length)) - 1


def _mkv_check(head: bytes, size: int) -> None:
    """EBML header, then the Segment: a known Segment size beyond EOF means truncated."""
    try:
        hdr_size, n, _ = _read_vint(head, 4)
        pos = 4 + n + hdr_size
        if head[pos:pos + 4] != b"\x18\x53\x80\x67":
            return  # not where we expected it: let the tools judge
        seg_size, n, unknown = _read_vint(head, pos + 4)
    except (ValueError, IndexError):
        return
    if not unknown and pos + 4 + n + seg_size > size:
        raise NotAVideo(f"truncated Matroska: the segment needs {pos + 4 + n + seg_size} bytes, "
                        f"the file has {size}")


def structural_check(path: Path, head: bytes, size: int) -> str | None:
    """Tool-free checks; returns the container name (ffmpeg's spelling) if recognised."""
    if len(head) >= 8 and head[4:8] in MP4_BOXES and head[4:8] != b"uuid":
        _mp4_check(path, size)
        return MP4_FORMAT
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        _mkv_check(head, size)
        return "matroska,webm"
    if _ts_stride(head):
        stray = size % TS_PACKET
        if stray:
            raise NotAVideo(f"truncated MPEG-TS: the last packet is cut ({stray} stray bytes; "
                            f"{size} is not a multiple of {TS_PACKET})")
        return "mpegts"
    return None
