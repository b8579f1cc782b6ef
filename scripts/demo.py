"""The demo: a few anime downloaded by the whole system under the real supervisord.

Uses the real ani-cli when it is installed and its site is reachable; otherwise
the simulated ani-cli (tests/fakes/ani-cli), which downloads real HLS video from
a local provider with the real yt-dlp when yt-dlp and ffmpeg are present, and
writes placeholder bytes when they are not. Everything lives under --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.enqueue import enqueue  # noqa: E402

DEMO_ANIME = [  # mal_id, title searched, selection index, site title, episodes
    (1, "Cowboy Bebop", 1, "Cowboy Bebop", 3),
    (5114, "Fullmetal Alchemist: Brotherhood", 2, "Fullmetal Alchemist: Brotherhood (Sub)", 3),
    (31240, "Re:Zero kara Hajimeru Isekai Seikatsu", 1, "Re:ZERO -Starting Life in Another World-", 2),
]


def real_ani_cli_usable() -> bool:
    if shutil.which("ani-cli") is None:
        return False
    try:
        socket.create_connection(("anidb.app", 443), timeout=3).close()
        return True
    except OSError:
        return False


def media_tools(path: str) -> bool:
    if shutil.which("yt-dlp", path=path) is None:
        return False
    try:
        import imageio_ffmpeg  # noqa: F401  (only whether it is there)
    except ImportError:
        return shutil.which("ffmpeg", path=path) is not None
    return True


def write_config(directory: Path, command: str, real_video: bool) -> Path:
    config = directory / "config.toml"
    config.write_text(f"""# demo configuration (written by scripts/demo.py)
[data]
root_dir = "data"
storage_dir = "storage"
create_storage_dir = true   # the demo has no external disk: make storage/ on this one

[disk_management]
hard_limit_gb = 2
pause_threshold_gb = 1.5
resume_threshold_gb = 1
min_free_gb = 0.5
max_concurrent_downloads = 3
expected_episode_size_mb = 5

[downloader]
command = {json.dumps(command)}
timeout_seconds = 300
retry_backoff_seconds = 2
container = "{'mkv' if real_video else 'keep'}"
verify = {'true' if real_video else 'false'}
""")
    return config


def simulated_catalog(directory: Path, hls_base: str | None) -> Path:
    anime = []
    for mal_id, query, index, site_title, episodes in DEMO_ANIME:
        results = [{"title": f"{query} (Movie)", "episodes": 1} for _ in range(1, index)]
        behaviour = {"size": 3_000_000, "duration": 2.0}
        if hls_base:
            behaviour = {"hls_url": f"{hls_base}/{mal_id}/{{episode}}/index.m3u8"}
        results.append({"title": site_title, "episodes": episodes, "behaviour": behaviour})
        anime.append({"query": query, "results": results})
    path = directory / "catalog.json"
    path.write_text(json.dumps({"defaults": {"size": 1_000_000, "duration": 1.0}, "anime": anime},
                               indent=2))
    return path


def start_provider(directory: Path):
    """The local HLS provider (tests/fakes/provider.py), or None if unavailable."""
    try:
        from tests.fakes.provider import Provider
    except ImportError:
        return None
    provider = Provider(cache_dir=directory / "provider-cache")
    provider.start()
    return provider


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(REPO / "demo-run"), help="demo folder (default: demo-run/)")
    parser.add_argument("-w", "--workers", type=int, default=3)
    args = parser.parse_args()
    directory = Path(args.dir).resolve()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    provider = None
    if real_ani_cli_usable():
        command, mode = "ani-cli", "the real ani-cli"
    else:
        command = str(REPO / "tests" / "fakes" / "ani-cli")
        provider = start_provider(directory) if media_tools(env["PATH"]) else None
        hls = provider.base_url if provider else None
        env["ANI_CLI_SIM_CATALOG"] = str(simulated_catalog(directory, hls))
        mode = ("the simulated ani-cli + real yt-dlp from a local HLS provider" if hls
                else "the simulated ani-cli writing placeholder bytes")
    config = write_config(directory, command, real_video=provider is not None or command == "ani-cli")
    db = directory / "data" / "jobs.db"
    for mal_id, query, index, site_title, episodes in DEMO_ANIME:
        enqueue(db, mal_id, query, list(range(1, episodes + 1)), 3, (index, site_title, "high"))
    print(f"demo: {sum(a[4] for a in DEMO_ANIME)} episodes of {len(DEMO_ANIME)} anime with {mode}, "
          f"{args.workers} workers, in {directory}", flush=True)
    try:
        code = subprocess.call([str(Path(sys.executable).parent / "anime-downloader"), "-c", str(config),
                                "-w", str(args.workers), "--exit-when-done"], env=env)
    finally:
        if provider is not None:
            provider.stop()
    print("\nepisodes on disk:")
    for path in sorted((directory / "storage" / "videos").glob("*/episodes/ep*")):
        print(f"  {path.relative_to(directory)}  {path.stat().st_size:,} bytes")
    print(f"\ninspect: sqlite3 {db} \"SELECT stage, COUNT(*) FROM jobs GROUP BY stage\"")
    return code


if __name__ == "__main__":
    sys.exit(main())
