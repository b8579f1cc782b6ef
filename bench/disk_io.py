"""Disk I/O of the post-download step on a ~200 MB episode, this tree against another revision.

    python bench/disk_io.py [--baseline-rev main] [--rounds 3] [--mbytes 200] [--minutes 24]
                            [--slow-disk-mbps 100]

The episode: H.264/AAC at a constant bit rate (``--mbytes`` over ``--minutes``, so an
episode's real number of packets), cut into 6 s HLS segments, served by the local
provider (tests/fakes/provider.py) and downloaded by the real yt-dlp with ani-cli v5's
arguments: yt-dlp's own MP4 (the segments fixed up by ffmpeg, moov at the end), cached
under ``--cache-dir`` for the next run.

Then, interleaved round by round so the machine's noise falls on every side alike, each
in a fresh process that copies the episode into place, fsyncs it and evicts it from the
page cache (``posix_fadvise``: that file only) before it starts measuring:

* ``cp``: ``cp`` of the episode on the same filesystem, then an fsync of the copy (the
  worker fsyncs what it stages: the same guarantee); plain ``cp`` is shown too;
* this tree's and the baseline's post step (``git archive`` of ``--baseline-rev``,
  first on ``sys.path``), run as the worker runs it (an ``Attempt``, ``start_post``,
  its wake-up pipe), with ``verify = true`` and ``container = "mkv"``, then ``"keep"``.

Where: beside the cache (this machine's disk), ``--work-dir``, or with
``--slow-disk-mbps`` a filesystem made for the run on a loop device throttled to a USB
disk's speed (bench/slow_disk.py: root and cgroup v1), the storage the project is for:
on a disk faster than ffmpeg's per-packet work the post step waits on the CPU.

Measured per run: the wall time to the post step's result (with its fsync), and the
bytes the process and the children it reaped read and wrote (``/proc/self/io``):
``rchar``/``wchar`` (what read and write calls moved, cached or not) and
``read_bytes``/``write_bytes`` (what came from the block device, or was dirtied for it:
the episode is not cached at the start, so its first read is real; a second read may
be served by the cache, as it would be on a machine with RAM to spare). Goals (issue 16): with mkv at most one
read and one write of the file (``rchar`` and ``wchar`` at most 1.1 times its size),
with keep one read and no write, and the mkv post step within 1.5x of ``cp`` + fsync.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL_BYTES = 1.1  # "one read" / "one write": the file's size, plus an MP4 index read again
GOAL_TIME = 1.5  # the mkv post step against cp + fsync


# --------------------------------------------------------------------------- the child


def io_now() -> dict[str, float]:
    """/proc/self/io (which counts the children reaped) and the CPU seconds of this process
    and of its reaped children."""
    with open("/proc/self/io") as fh:
        io: dict[str, float] = {k: int(v) for k, v in (line.split(": ") for line in fh.read().splitlines())}
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        use = resource.getrusage(who)
        io["cpu"] = io.get("cpu", 0.0) + use.ru_utime + use.ru_stime
    return io


def evict(path: Path) -> None:
    """``path`` out of the page cache (it is fsynced: its pages are clean), so that reading it
    goes to the disk; nothing else is evicted (the ffmpeg binary stays cached, as on a worker
    that has run it before, and the other programs of the machine keep their cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def place(episode: Path, dst: Path) -> None:
    """The episode at ``dst``, on disk (fsynced), as ani-cli's download leaves it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(episode, dst)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def child(args: argparse.Namespace) -> None:
    """One measured run, in a process of its own; prints one JSON line."""
    work, episode = Path(args.work), Path(args.episode)
    if args.child == "cp":
        src, dst = work / "src" / episode.name, work / "dst" / episode.name
        place(episode, src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        evict(src)
        before, t0 = io_now(), time.monotonic()
        subprocess.run(["cp", str(src), str(dst)], check=True)
        t_cp = time.monotonic() - t0
        with open(dst, "rb") as fh:
            os.fsync(fh.fileno())
        seconds, after = time.monotonic() - t0, io_now()
        print(json.dumps({"seconds": seconds, "cp_seconds": t_cp,
                          "size": src.stat().st_size, "out_size": dst.stat().st_size,
                          **{k: after[k] - before[k] for k in after}}))
        return
    sys.path.insert(0, args.tree)  # the tree under test, before anything of it is imported
    import select

    from services.worker.attempt import Attempt
    from shared.config import load_config
    from shared.protocol import JobAssign
    from tests.system import render_toml

    config = work / "config.toml"
    (work / "disk").mkdir(parents=True, exist_ok=True)
    config.write_text(render_toml({
        "data": {"root_dir": str(work / "data"), "storage_dir": str(work / "disk")},
        "disk_management": {"hard_limit_gb": 100, "pause_threshold_gb": 90, "resume_threshold_gb": 80},
        "downloader": {"verify": True, "container": args.container},
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }))
    job = JobAssign(job_id=1, attempt=1, anime_id=1, anime_title="Bench Show", episode=1,
                    selected_index=1, selected_title="Bench Show (site)", confidence="high",
                    lease_seconds=30.0, rate_limit_bps=0)
    attempt = Attempt(job, load_config(config), worker_id="w01")
    attempt.prepare()
    name = "Bench Show (site) Episode 1.mp4"
    place(episode, attempt.download_dir / name)
    size = (attempt.download_dir / name).stat().st_size
    from services.worker import media_tools

    media_tools.find_ffmpeg()  # imageio-ffmpeg imported before the clock runs, as a worker's 2nd episode
    evict(attempt.download_dir / name)
    before, t0 = io_now(), time.monotonic()
    attempt.start_post(name)
    ready, _, _ = select.select([attempt.post.wakeup[0]], [], [], 3600)
    seconds, after = time.monotonic() - t0, io_now()
    result = attempt.post.result
    print(json.dumps({"seconds": seconds, "size": size,
                      "out_size": result.size if result else None,
                      "ext": result.ext if result else None,
                      "error": None if result is None else result.error,
                      **{k: after[k] - before[k] for k in after}}))
    attempt.release()


# --------------------------------------------------------------------------- the episode


def make_episode(cache: Path, mbytes: float, minutes: float) -> Path:
    """yt-dlp's MP4 of a ~``mbytes`` MB, ``minutes`` long HLS episode from the provider."""
    sys.path.insert(0, str(REPO))
    from services.worker.media_tools import find_ffmpeg
    from tests.fakes.provider import PLAYLIST_NAME, Provider, media_key

    seconds = round(minutes * 60)
    out = cache / f"episode-{mbytes:g}MB-{seconds}s.mp4"
    if out.is_file():
        return out
    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        raise SystemExit("no ffmpeg (PATH or imageio-ffmpeg): pip install -e '.[test]'")
    ytdlp = shutil.which("yt-dlp", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if ytdlp is None:
        raise SystemExit("no yt-dlp: pip install -e '.[test]'")
    audio_kbps = 128
    video_kbps = int(mbytes * 1e6 * 8 / seconds / 1000) - audio_kbps
    media = cache / "provider" / media_key(float(seconds))  # where the provider looks for it
    if not (media / PLAYLIST_NAME).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".media-", dir=cache))
        print(f"encoding {seconds} s of H.264 at {video_kbps} kb/s + AAC {audio_kbps} kb/s ...", flush=True)
        subprocess.run([
            ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc=size=320x240:rate=25:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "50",
            "-keyint_min", "50", "-sc_threshold", "0", "-b:v", f"{video_kbps}k",
            "-minrate", f"{video_kbps}k", "-maxrate", f"{video_kbps}k", "-bufsize", f"{2 * video_kbps}k",
            "-x264-params", "nal-hrd=cbr:filler=1", "-c:a", "aac", "-b:a", f"{audio_kbps}k",
            "-f", "hls", "-hls_time", "6", "-hls_playlist_type", "vod",
            "-hls_segment_filename", str(tmp / "seg%03d.ts"), str(tmp / PLAYLIST_NAME)], check=True)
        media.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, media)
    bin_dir = cache / "bin"  # yt-dlp finds ffmpeg on PATH for its fix-up, as a user's does
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "ffmpeg").exists():
        (bin_dir / "ffmpeg").symlink_to(ffmpeg)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "NO_PROXY": "127.0.0.1"}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower() or k == "NO_PROXY"}
    part = out.with_name(out.stem + ".dl.mp4")
    with Provider(cache / "provider") as provider:
        provider.set_duration("bench", 1, seconds=float(seconds))
        print(f"downloading it with yt-dlp from {provider.base_url} ...", flush=True)
        subprocess.run([ytdlp, provider.episode_url("bench", 1), "--no-skip-unavailable-fragments",
                        "--fragment-retries", "infinite", "-N", "16", "--no-progress", "-q",
                        "-o", str(part)], check=True, env=env, timeout=3600)
    os.rename(part, out)
    return out


# --------------------------------------------------------------------------- the parent


def run_child(variant: str, tree: Path, container: str, episode: Path, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", variant,
                           "--tree", str(tree), "--container", container, "--episode", str(episode),
                           "--work", str(work)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(work)
    if result.get("error"):
        raise SystemExit(f"{variant}: the post step failed: {result['error']}")
    return result


def ffmpeg_in_use() -> str:
    """The ffmpeg the worker runs (PATH first, then imageio-ffmpeg's) and its version."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from services.worker.media_tools import find_ffmpeg

    exe = find_ffmpeg()
    if exe is None:
        return "none"
    first = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True).stdout
    return f"{exe}: {first.splitlines()[0] if first else '?'}"


def unpack(rev: str, into: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from status_cli import unpack as unpack_rev  # git archive of a revision

    return unpack_rev(rev, into)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-rev", default="main", help="the revision to compare with (default: main)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, interleaved (default: 3)")
    parser.add_argument("--mbytes", type=float, default=200, help="size of the episode in MB (default: 200)")
    parser.add_argument("--minutes", type=float, default=24, help="its length (default: 24)")
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "adb-disk-io-cache"),
                        help="where the episode is kept between runs (default: /tmp/adb-disk-io-cache)")
    parser.add_argument("--work-dir", default=None, help="where the runs copy it (default: a temp dir "
                                                         "beside the cache: the same filesystem)")
    parser.add_argument("--slow-disk-mbps", type=float, default=None, metavar="MB_PER_S",
                        help="run on a filesystem made for the run on a loop device throttled to this "
                             "many MB/s read and write, as a USB disk is (root, cgroup v1: bench/slow_disk.py)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--container", help=argparse.SUPPRESS)
    parser.add_argument("--episode", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    sys.path.insert(0, str(HERE))
    from common import machine, table, verdict
    from slow_disk import SlowDiskUnavailable, slow_disk

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    episode = make_episode(cache, args.mbytes, args.minutes)
    size = episode.stat().st_size
    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or cache
        if args.slow_disk_mbps:
            try:
                work_dir = stack.enter_context(slow_disk(args.slow_disk_mbps, 3 * size / 1e9 + 0.5, cache))
            except SlowDiskUnavailable as exc:
                print(f"disk_io.py: --slow-disk-mbps: {exc}", file=sys.stderr)
                return 2
            print(f"on a loop device throttled to {args.slow_disk_mbps:g} MB/s read and write", flush=True)
        tmp_path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adb-disk-io-", dir=work_dir)))
        baseline = unpack(args.baseline_rev, tmp_path)
        sides = [("cp", "cp", REPO, ""),
                 (f"{args.baseline_rev} mkv", "post", baseline, "mkv"), ("this mkv", "post", REPO, "mkv"),
                 (f"{args.baseline_rev} keep", "post", baseline, "keep"), ("this keep", "post", REPO, "keep")]
        runs: dict[str, list[dict]] = {label: [] for label, *_ in sides}
        print(f"{machine()}; episode {episode.name}: {size / 1e6:.1f} MB; load {os.getloadavg()[0]:.2f}",
              flush=True)
        print(f"post step's ffmpeg: {ffmpeg_in_use()}", flush=True)
        for r in range(args.rounds):
            for label, variant, tree, container in sides:
                runs[label].append(run_child(variant, tree, container, episode, tmp_path / "run"))
            print(f"round {r + 1}: " + ", ".join(f"{label} {runs[label][-1]['seconds']:.2f} s"
                                                 for label, *_ in sides), flush=True)

    def med(label: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[label])

    cp_time = med("cp", "seconds")
    rows = []
    for label, *_ in sides:
        rows.append([label, f"{med(label, 'seconds'):.2f}", f"{med(label, 'seconds') / cp_time:.2f}",
                     f"{med(label, 'rchar') / size:.3f}", f"{med(label, 'wchar') / size:.3f}",
                     f"{med(label, 'read_bytes') / size:.3f}", f"{med(label, 'write_bytes') / size:.3f}",
                     f"{med(label, 'syscr'):.0f}", f"{med(label, 'cpu'):.2f}"])
    print(f"\nmedians of {args.rounds} round(s); bytes as multiples of the episode's {size:,} B; "
          f"time as a ratio to cp + fsync (plain cp: {med('cp', 'cp_seconds'):.2f} s)")
    print(table(["side", "seconds", "x cp", "rchar", "wchar", "read_bytes", "write_bytes", "read calls", "CPU s"], rows))

    this_mkv, this_keep = "this mkv", "this keep"
    checks = [
        ("mkv: read once", med(this_mkv, "rchar") / size, GOAL_BYTES),
        ("mkv: written once", med(this_mkv, "wchar") / size, GOAL_BYTES),
        ("keep: read once", med(this_keep, "rchar") / size, GOAL_BYTES),
        ("keep: not written", med(this_keep, "wchar") / size, 0.01),
        ("mkv: time vs cp + fsync", med(this_mkv, "seconds") / cp_time, GOAL_TIME),
    ]
    print()
    ok = True
    for what, value, goal in checks:
        ok &= value <= goal
        print(f"{what}: {value:.3f} (goal <= {goal}) {verdict(value <= goal)}")
    print(f"throughput on this machine: cp + fsync {size / 1e6 / cp_time:.0f} MB/s; this mkv "
          f"{size / 1e6 / med(this_mkv, 'seconds'):.0f} MB/s, using {med(this_mkv, 'cpu'):.2f} CPU s "
          f"(ffmpeg's work is per packet, the episode's ~98,000: on a disk slower than that the "
          f"post step waits on the disk, on a faster one on the CPU)")
    base_mkv = f"{args.baseline_rev} mkv"
    print(f"mkv against {args.baseline_rev}: time {med(this_mkv, 'seconds') / med(base_mkv, 'seconds'):.2f}x, "
          f"bytes read {med(this_mkv, 'rchar') / med(base_mkv, 'rchar'):.2f}x, "
          f"written {med(this_mkv, 'wchar') / med(base_mkv, 'wchar'):.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
