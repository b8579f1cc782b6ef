"""The programs the worker puts in front of ani-cli's downloader, and the menu it forbids.

ani-cli v5 runs ``yt-dlp URL ... -N 16 -o FILE $3`` (and ``ffmpeg ... FILE $3`` when
that fails), where ``$3`` is only the FIRST word of ``$ANI_CLI_PLAYER_FLAGS``: options
cannot reach the downloader through ani-cli. So the worker unsets that variable and puts
directories of its own first on ani-cli's ``PATH``:

- ``yt-dlp/yt-dlp`` execs the real yt-dlp with the project's options appended (the last
  ``-N`` wins): ``-N 1 --limit-rate <bytes/s>`` under a bandwidth cap (yt-dlp's limit
  applies to each concurrent fragment, so only one fragment at a time makes it the
  worker's total), and ``--newline --progress-template`` with one JSON object per line,
  exact figures instead of human text. It marks its environment, so the ``ffmpeg`` that
  yt-dlp runs for its HLS fix-up goes through untouched.
- ``ffmpeg/ffmpeg`` execs the real ffmpeg (``ffmpeg`` on PATH, else imageio-ffmpeg's
  binary). Called by ani-cli itself (its fallback) under a bandwidth cap, it refuses:
  ffmpeg cannot cap bytes per second, and a silent uncapped download would break the
  promise of ``total_bandwidth_mbps``.
- ``anime-downloader-no-menu`` is ``ANI_CLI_MENU``: ani-cli checks that its menu program
  exists even when it never opens one (so fzf would be required), and with ``-S`` and
  ``-e`` it never should. If it ever is called it fails loudly.

Each directory goes on the PATH only when its real tool exists, so ani-cli's own choice
between yt-dlp and ffmpeg is unchanged. The options travel per attempt in the
environment (``ENV_*``). The wrappers are small stdlib-only Python files, written
atomically at worker start under ``<root_dir>/run/downloader/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ENV_REAL_YTDLP = "ANIME_DL_REAL_YTDLP"
ENV_REAL_FFMPEG = "ANIME_DL_REAL_FFMPEG"
ENV_RATE = "ANIME_DL_RATE_LIMIT_BPS"
ENV_UNDER_YTDLP = "ANIME_DL_UNDER_YTDLP"  # set by the yt-dlp wrapper for its children
#: The first word of every progress line the yt-dlp wrapper asks for.
PROGRESS_TAG = "[anime-downloader]"
#: One JSON object per line (yt-dlp prints ``null`` for a missing figure, via ``|null``).
PROGRESS_TEMPLATE = (
    "download:" + PROGRESS_TAG + ' {"status":"%(progress.status)s",'
    '"bytes":%(progress.downloaded_bytes|null)s,"total":%(progress.total_bytes|null)s,'
    '"estimate":%(progress.total_bytes_estimate|null)s,"speed":%(progress.speed|null)s,'
    '"eta":%(progress.eta|null)s,"frag":%(progress.fragment_index|null)s,'
    '"frags":%(progress.fragment_count|null)s}')
NO_MENU = "anime-downloader-no-menu"
FFMPEG_REFUSAL = "anime-downloader: refusing ani-cli's ffmpeg fallback under a bandwidth cap"

_YTDLP = '''\
"""anime-downloader's yt-dlp wrapper (services/worker/shims.py): the real yt-dlp, our options last."""
import os
import sys

real = os.environ.get("{real}", "")
if not real:
    sys.stderr.write("anime-downloader: yt-dlp wrapper started without {real}\\n")
    sys.exit(127)
args = [real] + sys.argv[1:]
rate = os.environ.get("{rate}", "")
if rate.isdigit() and int(rate) > 0:
    args += ["-N", "1", "--limit-rate", rate]
args += ["--newline", "--progress-template", {template!r}]
os.environ["{under}"] = "1"
try:
    os.execv(real, args)
except OSError as exc:
    sys.stderr.write("anime-downloader: cannot run yt-dlp %s: %s\\n" % (real, exc.strerror))
    sys.exit(127)
'''

_FFMPEG = '''\
"""anime-downloader's ffmpeg wrapper (services/worker/shims.py): the real ffmpeg, unchanged."""
import os
import sys

real = os.environ.get("{real}", "")
if not real:
    sys.stderr.write("anime-downloader: ffmpeg wrapper started without {real}\\n")
    sys.exit(127)
rate = os.environ.get("{rate}", "")
if not os.environ.get("{under}") and rate.isdigit() and int(rate) > 0:
    sys.stderr.write("{refusal}: ffmpeg cannot limit its download rate, so it would "
                     "break [downloader] total_bandwidth_mbps; install yt-dlp (it failed or "
                     "is missing) or set total_bandwidth_mbps = 0\\n")
    sys.exit(1)
try:
    os.execv(real, [real] + sys.argv[1:])
except OSError as exc:
    sys.stderr.write("anime-downloader: cannot run ffmpeg %s: %s\\n" % (real, exc.strerror))
    sys.exit(127)
'''

_NO_MENU = '''\
"""ANI_CLI_MENU of anime-downloader's workers (services/worker/shims.py): never a menu."""
import sys

sys.stderr.write("anime-downloader: ani-cli tried to open a menu (%s); with -S and -e it "
                 "never should: report this with the ani-cli version\\n" % " ".join(sys.argv[1:]))
sys.exit(1)
'''


#: How long a lookup of the real tools is reused (a tool installed meanwhile is seen then).
RESOLVE_SECONDS = 10.0


@dataclass
class Shims:
    """Where the wrappers are; the real tools are looked up for ani-cli's runs (``tools``)."""
    ytdlp_dir: Path
    ffmpeg_dir: Path
    menu: Path
    _cache: tuple[str, float, dict[str, str]] | None = None

    def tools(self, path: str) -> dict[str, str]:
        """The environment entries of one ani-cli run: PATH with the wrapper directories
        of the tools that exist first, and the real tools' paths. (A lookup walks PATH
        twice, ~0.1 ms: it is reused for RESOLVE_SECONDS.)"""
        now = time.monotonic()
        if self._cache and self._cache[0] == path and now - self._cache[1] < RESOLVE_SECONDS:
            return dict(self._cache[2])
        env = self._resolve(path)
        self._cache = (path, now, env)
        return dict(env)

    def _resolve(self, path: str) -> dict[str, str]:
        env: dict[str, str] = {}
        dirs: list[str] = []
        ytdlp = find_tool("yt-dlp", path, exclude=self.ytdlp_dir)
        ffmpeg = find_tool("ffmpeg", path, exclude=self.ffmpeg_dir) or bundled_ffmpeg()
        if ytdlp:
            env[ENV_REAL_YTDLP] = ytdlp
            dirs.append(str(self.ytdlp_dir))
        if ffmpeg:
            env[ENV_REAL_FFMPEG] = ffmpeg
            dirs.append(str(self.ffmpeg_dir))
        env["PATH"] = os.pathsep.join(dirs + ([path] if path else []))
        return env


def install(run_dir: Path) -> Shims:
    """Write the wrappers under ``run_dir/downloader`` (atomically: workers starting at
    once write the same bytes) and return where they are."""
    base = run_dir / "downloader"
    shims = Shims(base / "yt-dlp", base / "ffmpeg", base / "menu" / NO_MENU)
    fields = dict(real=ENV_REAL_YTDLP, rate=ENV_RATE, under=ENV_UNDER_YTDLP,
                  template=PROGRESS_TEMPLATE, refusal=FFMPEG_REFUSAL)
    _write(shims.ytdlp_dir / "yt-dlp", _YTDLP.format(**fields))
    _write(shims.ffmpeg_dir / "ffmpeg", _FFMPEG.format(**{**fields, "real": ENV_REAL_FFMPEG}))
    _write(shims.menu, _NO_MENU)
    return shims


def _shebang() -> str:
    """The worker's own interpreter, isolated (-I: no PYTHON* variables, no user site;
    -S: no site import: the wrappers need only the standard library and start in ~10 ms)."""
    exe = sys.executable
    if exe and len(exe) < 100 and not any(c.isspace() for c in exe):
        return f"#!{exe} -IS\n"
    return "#!/usr/bin/env python3\n"


def _write(path: Path, body: str) -> None:
    text = _shebang() + body
    try:
        if path.read_text(encoding="utf-8") == text and os.access(path, os.X_OK):
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def find_tool(name: str, path: str, exclude: Path) -> str | None:
    """``name`` on ``path``, skipping our own wrapper directory."""
    skip = os.path.normpath(exclude)
    rest = os.pathsep.join(p for p in path.split(os.pathsep) if p and os.path.normpath(p) != skip)
    return shutil.which(name, path=rest) if rest else None


@lru_cache(maxsize=1)
def bundled_ffmpeg() -> str | None:
    """imageio-ffmpeg's binary, found without importing the package (the idle worker
    stays small): ``$IMAGEIO_FFMPEG_EXE``, else ``imageio_ffmpeg/binaries/ffmpeg-*``."""
    configured = os.environ.get("IMAGEIO_FFMPEG_EXE")
    if configured and os.access(configured, os.X_OK):
        return configured
    try:
        spec = importlib.util.find_spec("imageio_ffmpeg")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        binaries = Path(location) / "binaries"
        for candidate in sorted(binaries.glob("ffmpeg-*")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None
