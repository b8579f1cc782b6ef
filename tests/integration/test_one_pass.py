"""Every byte written once (issue 16): after ani-cli, the episode is read once and written once.

The real pipeline under the real supervisord (tests/system.py): the simulated ani-cli runs
the real yt-dlp against the local HLS provider (tests/fakes/provider.py), the worker
verifies and remuxes what it downloaded. An ``ffmpeg`` first on every service's PATH runs
the real one as its child and logs, per run, its arguments and the bytes that child read
and wrote (``/proc/self/io`` of the wrapper once it has reaped its child: ``rchar`` and
``wchar``, the bytes of its read and write calls, whether the page cache served them or
not), less what the same ffmpeg reads to start at all (``ffmpeg -version``: a dynamically
linked build, as Debian's, reads the headers of its ~150 libraries, ~185 KB, whatever the
episode). The post step's own runs are told apart from yt-dlp's by ``-protocol_whitelist file``,
which only the worker passes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.worker import video
from tests.fakes.media import garbled_sample_sizes
from tests.fakes.provider import Provider
from tests.system import BIN, System

FFMPEG = video.find_ffmpeg()
YTDLP = str(BIN / "yt-dlp") if (BIN / "yt-dlp").is_file() else shutil.which("yt-dlp")
pytestmark = [
    pytest.mark.skipif(YTDLP is None, reason="needs yt-dlp (pip install -e '.[test]')"),
    pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg (on PATH, or imageio-ffmpeg)"),
]
EBML_MAGIC = b"\x1a\x45\xdf\xa3"

# Runs the real ffmpeg as its child, then logs what that child read and wrote: a process's
# /proc/<pid>/io counts the I/O of the children it has reaped.
WRAPPER = """#!{python}
import json, os, subprocess, sys
def io():
    with open("/proc/self/io") as fh:
        return {{k: int(v) for k, v in (line.split(": ") for line in fh.read().splitlines())}}
args = sys.argv[1:]
src = args[args.index("-i") + 1] if "-i" in args else ""
size = os.stat(src[5:]).st_size if src.startswith("file:") and os.path.isfile(src[5:]) else None
def child_io(argv, **kw):
    before = io()
    rc = subprocess.call([os.environ["ONE_PASS_REAL_FFMPEG"], *argv], **kw)
    after = io()
    return rc, {{k: after[k] - before[k] for k in after}}
_, start = child_io(["-hide_banner", "-version"], stdout=subprocess.DEVNULL)
rc, used = child_io(args)
with open(os.environ["ONE_PASS_FFMPEG_RUNS"], "a") as fh:
    fh.write(json.dumps({{"argv": args, "rc": rc, "input_size": size, **used,
                         "rchar": used["rchar"] - start["rchar"]}}) + "\\n")
sys.exit(rc if rc >= 0 else 128 - rc)
"""


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("provider-cache")
    with Provider(cache) as p:
        yield p


@pytest.fixture
def ffmpeg_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The logging ``ffmpeg`` first on PATH (after the venv's bin, which has none), and a clean
    environment for yt-dlp; returns the file of its runs."""
    bin_dir = tmp_path / "ffmpeg-bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ffmpeg"
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    runs = tmp_path / "ffmpeg-runs.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("ONE_PASS_REAL_FFMPEG", FFMPEG)
    monkeypatch.setenv("ONE_PASS_FFMPEG_RUNS", str(runs))
    for name in [n for n in os.environ if "proxy" in n.lower()]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert shutil.which("ffmpeg") == str(wrapper)
    return runs


def post_step_runs(runs: Path) -> list[dict]:
    """The worker's ffmpeg runs (verify, remux, or both at once), in order."""
    if not runs.exists():
        return []
    every = [json.loads(line) for line in runs.read_text().splitlines()]
    return [r for r in every if "-protocol_whitelist" in r["argv"]]


def make(make_system, url: str, title: str, episodes: int, downloader: dict) -> System:
    system = make_system({"downloader": {"verify": True, **downloader}})
    system.write_catalog({"defaults": {"size": 2048, "duration": 0.0}, "anime": [{
        "query": title, "results": [{"title": f"{title} (site)", "episodes": episodes,
                                     "behaviour": {"hls_url": url}}]}]})
    return system


def landed(system: System) -> list[str]:
    return sorted(str(p.relative_to(system.storage)) for p in system.storage_files()
                  if "/videos/" in str(p))


@pytest.mark.parametrize("container, ext", [("mkv", ".mkv"), ("keep", ".mp4")])
def test_an_episode_is_read_once_and_written_at_most_once_after_ani_cli(
        make_system, provider, ffmpeg_runs: Path, container: str, ext: str) -> None:
    """verify with container = "mkv": one ffmpeg pass reads the download once and writes the
    .mkv once; with "keep": one pass reads it and nothing is written. Either way it lands."""
    slug = f"once-{container}"
    for ep in (1, 2):
        provider.set_duration(slug, ep, seconds=6)
        provider.prepare(slug, ep)
    system = make(make_system, f"{provider.base_url}/{slug}/{{episode}}/index.m3u8", "Once Show", 2,
                  {"container": container})
    system.enqueue(41, "Once Show", [1, 2], selected_index=1, selected_title="Once Show (site)")

    result = system.run("anime-downloader", "-c", str(system.config_path), "-w", "1",
                        "--exit-when-done", timeout=90)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "summary: downloaded=2, failed=0" in result.stdout, result.stdout
    assert landed(system) == [f"videos/41/episodes/ep001{ext}", f"videos/41/episodes/ep002{ext}",
                              "videos/41/metadata.json"]
    runs = post_step_runs(ffmpeg_runs)
    assert len(runs) == 2, [r["argv"] for r in runs]  # one per episode, not a verify and a remux
    for row, run in zip(sorted(system.jobs(), key=lambda r: r["episode"]), runs):
        path = Path(row["video_path"])
        assert row["stage"] == "downloaded" and path.suffix == ext, row
        assert row["video_duration_seconds"] == pytest.approx(6, abs=0.5), row
        size = run["input_size"]
        assert run["rc"] == 0 and size > 100_000, run
        # the download read once (the MP4 index at its end read again: a few kB)
        assert size <= run["rchar"] < 1.1 * size + 65536, run
        if container == "mkv":
            assert path.read_bytes()[:4] == EBML_MAGIC
            assert run["argv"][run["argv"].index("-f") + 1] == "matroska", run["argv"]
            assert path.stat().st_size <= run["wchar"] < path.stat().st_size + 65536, run
        else:
            assert path.stat().st_size == size  # the download itself, renamed into place
            assert run["wchar"] < 65536, run  # its stdout and stderr only


# --------------------------------------------------------------------------- a corrupt download



@pytest.fixture
def file_server(tmp_path: Path):
    """A plain HTTP server on 127.0.0.1 for a file yt-dlp downloads as it is (no HLS)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_corrupt_download_is_refused_and_nothing_of_it_lands(make_system, provider, ffmpeg_runs: Path,
                                                               file_server, tmp_path: Path) -> None:
    """A real episode (yt-dlp's MP4 of the provider's HLS) with a garbled sample table, served as
    a file: the one pass finds it wanting, the verify pass says why, the job fails as the spec
    says and nothing reaches videos/."""
    root, base = file_server
    slug = "corrupt-source"
    provider.set_duration(slug, 1, seconds=6)
    good = make(make_system, f"{provider.base_url}/{slug}/{{episode}}/index.m3u8", "Source Show", 1,
                {"container": "keep"})
    good.enqueue(42, "Source Show", [1], selected_index=1, selected_title="Source Show (site)")
    result = good.run("anime-downloader", "-c", str(good.config_path), "-w", "1", "--exit-when-done",
                      timeout=90)
    assert "summary: downloaded=1" in result.stdout, result.stdout + result.stderr
    source = Path(good.jobs()[0]["video_path"])
    (root / "episode-1.mp4").write_bytes(garbled_sample_sizes(source.read_bytes()))
    ffmpeg_runs.unlink()

    system = make(make_system, f"{base}/episode-{{episode}}.mp4", "Corrupt Show", 1, {"container": "mkv"})
    system.enqueue(43, "Corrupt Show", [1], selected_index=1, selected_title="Corrupt Show (site)",
                   max_retries=0)
    result = system.run("anime-downloader", "-c", str(system.config_path), "-w", "1",
                        "--exit-when-done", timeout=90)

    assert "summary: downloaded=0, failed=1" in result.stdout, result.stdout + result.stderr
    job = system.jobs()[0]
    assert job["stage"] == "failed" and job["video_path"] is None, job
    assert job["error_message"].startswith("Downloaded file is not a playable video: truncated: "), job
    assert landed(system) == [] and system.private_dirs() == []
    runs = post_step_runs(ffmpeg_runs)
    # the one pass, then (on a failure only) the verify pass for the verdict
    assert [r["argv"][r["argv"].index("-f") + 1] for r in runs] == ["matroska", "null"], runs
