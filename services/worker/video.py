"""What the worker does with a downloaded file, under one name for those outside the
worker that use it (the tests, the local provider); each lives in the module of its
concern, which the post step (post_step.py) imports directly:

- verify.py: ``verify_video`` (is it a whole, playable video?), ``VideoInfo``,
  ``NotAVideo``, ``VerifyTimeout``;
- remux.py: ``remux_to_mkv``, ``RemuxError``;
- one_pass.py: ``verify_and_remux`` (both in one ffmpeg pass: one read, one write);
- media_tools.py: ``find_ffmpeg``, ``find_ffprobe``, ``Stopper``, ``Stopped``,
  ``timeout_for`` (finding and running the tools);
- containers.py: the tool-free checks of the first bytes.
"""

from __future__ import annotations

from services.worker.media_tools import Stopped, Stopper, find_ffmpeg, find_ffprobe, timeout_for
from services.worker.one_pass import verify_and_remux
from services.worker.remux import RemuxError, remux_to_mkv
from services.worker.verify import NotAVideo, VerifyTimeout, VideoInfo, verify_video

__all__ = ["NotAVideo", "RemuxError", "Stopped", "Stopper", "VerifyTimeout", "VideoInfo",
           "find_ffmpeg", "find_ffprobe", "remux_to_mkv", "timeout_for", "verify_and_remux",
           "verify_video"]
