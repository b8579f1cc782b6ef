"""Damaged media for the tests of what the worker refuses."""

from __future__ import annotations

import struct


def garbled_sample_sizes(mp4: bytes) -> bytes:
    """The second half of the first track's sample sizes larger than the file: every box
    whole (the tool-free check passes), the packets running past the end."""
    b = bytearray(mp4)
    i = b.find(b"stsz")
    count = struct.unpack(">I", b[i + 12:i + 16])[0]
    for k in range(count // 2, count):
        b[i + 16 + 4 * k:i + 20 + 4 * k] = struct.pack(">I", 10**7)
    return bytes(b)
