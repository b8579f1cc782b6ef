"""``anime-downloader``: run the whole system in the foreground under supervisord.

It refuses to start while anything of an earlier run still lives for the same
config (another launcher, its supervisord, a service holding its lock in
``<root_dir>/run/``), then renders the repo's ``supervisord.conf`` for the given
config (paths under its root_dir, ``-w`` workers, the options passed to the
services) into ``<root_dir>/run/supervisord.conf``, starts ``supervisord -n`` and
follows the services' log files to the terminal, in time order. With
``--exit-when-done`` it stops everything once the dispatcher reports that no
runnable job is left. ``--supervisorctl ARGS`` starts nothing: it runs supervisorctl
against the supervisord already running for the config (its socket in ``run/``).

Nothing it starts outlives it. supervisord runs in its own session, so the
terminal's Ctrl-C and hang-up reach only the launcher (supervisord takes SIGHUP
for "reload"); the launcher takes SIGINT, SIGTERM and SIGHUP alike as "stop
everything gracefully" and stops supervisord with one SIGTERM. If the launcher
itself is killed (-9), the kernel sends supervisord that SIGTERM
(``PR_SET_PDEATHSIG``). supervisord's output goes to a file, not to the
launcher's stdout: a pipe whose reader went away (``| grep`` and Ctrl-C) made
supervisord's own logging raise while it handled SIGTERM, and it died leaving
its programs running. The launcher's own writes to a terminal or pipe that is
gone are dropped, so it lives long enough to stop everything.
"""

from __future__ import annotations

import argparse
import configparser
import io
import json
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import TextIO

from shared.config import Config
from shared.lifecycle import StopRequest, die_with_parent, load_prctl
from shared.config import config_or_exit
from shared.singleton import AlreadyRunning, hold_lock, lock_holder
from shared.storage import identify_or_exit

REPO_DIR = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_DIR / "supervisord.conf"
PROGRAMS = ("disk-watcher", "dispatcher", "worker", "web")
POKE_SECONDS = 0.05  # between requests to supervisord while something happens at once
SUMMARY_POLL_SECONDS = 0.1  # --exit-when-done: how often to look for summary.json
RESULT_POLL_SECONDS = 2.0  # how often to ask supervisord whether the dispatcher failed
SUPERVISORD_POLL_SECONDS = 0.5  # how often to look whether supervisord still runs
FOLLOW_SECONDS = 0.5  # how often to relay new log lines while they come (1 s when quiet)
START_WAIT_SECONDS = 10.0
STOP_WAIT_SECONDS = 60.0  # beyond the sum of the programs' stopwaitsecs (they stop in turn)
STOP_POKE_SECONDS = 0.2  # while supervisord stops: wake it to move on to the next group
LIVE_STATES = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}
LOCK_NAME = "anime-downloader.lock"
SUPERVISORD_OUT = "supervisord.out"  # supervisord's stdout/stderr (not a *.log: not relayed)
EXIT_ALREADY_RUNNING = 3  # as the services' own refusal
# Locks the services hold in <root_dir>/run/ (shared.singleton), and what holds them.
SERVICE_LOCKS = (("disk-watcher.lock", "a disk-watcher"), ("dispatcher.lock", "a dispatcher"),
                 ("worker-*.lock", "worker {}"))
_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")


def say(stream: TextIO, text: str) -> None:
    """Write to the launcher's terminal, which may be gone: a closed terminal (EIO) or a
    pipe whose reader exited (EPIPE). From the first failed write on, the stream goes to
    /dev/null: the launcher must outlive its output to stop what it started."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass


def _supervisord_pid(run_dir: Path) -> str | None:
    """supervisord's pid when one listens on this installation's socket, else None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(run_dir / "supervisor.sock"))
        except OSError:
            return None
    try:
        return (run_dir / "supervisord.pid").read_text().strip() or "?"
    except OSError:
        return "?"


def already_running(config: Config) -> str | None:
    """What still runs for this installation, as the one line to print; None if nothing.

    Reads only: nothing may be rewritten (run/supervisord.conf above all) while an
    earlier run lives."""
    run = config.run_dir
    launcher = lock_holder(run / LOCK_NAME)
    if launcher is not None:
        return (f"already running (pid {launcher}) with {run / 'supervisord.conf'}; "
                f"stop it with Ctrl-C in its terminal or: kill {launcher}")
    supervisord = _supervisord_pid(run)
    if supervisord is not None:
        return (f"already running (pid {supervisord}): the supervisord of an earlier "
                f"anime-downloader, still stopping or left behind; stop it with: kill {supervisord}")
    held = []
    for pattern, what in SERVICE_LOCKS:
        for path in sorted(run.glob(pattern)):
            pid = lock_holder(path)
            if pid is not None:
                held.append((pid, what.format(path.stem.removeprefix("worker-"))))
    if not held:
        return None
    pids = " ".join(pid for pid, _ in held)
    label = "pid" if len(held) == 1 else "pids"
    whats = ", ".join(f"{what} (pid {pid})" for pid, what in held)
    return (f"already running ({label} {pids}): {whats} left over from an earlier run, "
            f"holding its lock in {run}; stop {'it' if len(held) == 1 else 'them'} with: kill {pids}")


def db_summary(db_path: Path, anime_id: int | None) -> dict[str, int] | None:
    """The counts ``--exit-when-done`` prints, read from the database after a stop
    (read-only; None if it cannot be read)."""
    where, params = ("WHERE j.anime_id = ?", (anime_id,)) if anime_id is not None else ("", ())
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return None
    try:
        stages = dict(conn.execute(f"SELECT stage, COUNT(*) FROM jobs j {where} GROUP BY stage", params))
        (waiting,) = conn.execute(
            "SELECT COUNT(*) FROM jobs j LEFT JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
            f"WHERE j.stage = 'queued' AND s.mal_id IS NULL {where.replace('WHERE', 'AND')}",
            params).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    summary = {"downloaded": stages.get("downloaded", 0), "failed": stages.get("failed", 0),
               "still_queued": stages.get("queued", 0), "waiting_for_selection": waiting}
    if stages.get("downloading"):  # only after a stop that could not hand every job back
        summary["still_downloading"] = stages["downloading"]
    return summary


def summary_line(summary: dict) -> str:
    return "summary: " + ", ".join(f"{k}={v}" for k, v in summary.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anime-downloader",
        description="Download every queued episode with ani-cli: a dispatcher, a disk-watcher, "
                    "N workers and the web page under supervisord, in the foreground. Ctrl-C stops all.")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("-w", "--workers", type=int, metavar="N",
                        help="number of concurrent download workers (default: "
                             "[disk_management] max_concurrent_downloads)")
    parser.add_argument("--dry-run", action="store_true",
                        help="log the ani-cli command of each queued job; change nothing")
    parser.add_argument("--anime-id", type=int, metavar="ID", help="download only this MAL ID's episodes")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging in every service")
    parser.add_argument("--exit-when-done", action="store_true",
                        help="when no runnable job is queued or running, print a summary and exit 0")
    parser.add_argument("--supervisorctl", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="run supervisorctl ARGS... against the supervisord of the instance "
                             "running for this config (e.g. --supervisorctl status); starts nothing. "
                             "Must come last: every word after it goes to supervisorctl")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"-w/--workers: must be at least 1, got {args.workers}")
    return args


def _service_args(args: argparse.Namespace, program: str) -> str:
    extra = []
    if program == "dispatcher":
        if args.dry_run:
            extra.append("--dry-run")
        if args.anime_id is not None:
            extra += ["--anime-id", str(args.anime_id)]
        if args.exit_when_done:
            extra.append("--exit-when-done")
    if args.verbose:
        extra.append("-v")
    return "".join(f" {word}" for word in extra)


def render(template: str, config: Config, args: argparse.Namespace) -> str:
    """The repo's supervisord.conf, pointed at ``config`` and carrying the options."""
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # keep key case
    parser.read_string(template)
    bin_dir = Path(sys.executable).parent
    replacements = [("%(here)s/data", str(config.root_dir)),
                    ("%(here)s/config.toml", str(config.path.resolve())),
                    ("%(here)s/.venv/bin", str(bin_dir)),
                    ("%(here)s", str(REPO_DIR))]
    for section in parser.sections():
        for key, value in parser.items(section):
            for old, new in replacements:
                value = value.replace(old, new)
            parser.set(section, key, value)
    workers = args.workers or config.disk.max_concurrent_downloads
    parser.set("program:worker", "numprocs", str(workers))
    # total_bandwidth_mbps is shared among at least these: the workers connect one by one.
    dispatcher = re.sub(r" --workers \d+", "", parser.get("program:dispatcher", "command"))
    parser.set("program:dispatcher", "command", f"{dispatcher} --workers {workers}")
    for program in PROGRAMS:
        section = f"program:{program}"
        parser.set(section, "command", parser.get(section, "command") + _service_args(args, program))
    if args.exit_when_done:
        parser.set("program:dispatcher", "autorestart", "unexpected")
        parser.set("program:dispatcher", "exitcodes", "0")
        parser.set("program:dispatcher", "startsecs", "0")  # "done" may come at once
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


class LogFollower(threading.Thread):
    """Prints new lines of the services' log files to the terminal, in time order.

    Each poll gathers the new complete lines of every file and prints them sorted
    by their UTC timestamp (a line without one, such as a traceback's, keeps the
    time of the line before it in its file), so lines of different programs
    interleave as they happened, not grouped file by file."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(daemon=True)
        self.log_dir = log_dir
        self.offsets: dict[Path, int] = {p: p.stat().st_size for p in log_dir.glob("*.log")}
        self.stamps: dict[str, str] = {}  # per program: the time of its last line
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = FOLLOW_SECONDS
        while not self.stopped.wait(interval):
            before = dict(self.offsets)
            self.poll()
            # Quiet logs: back off to 1 s, so an idle system wakes the launcher less often.
            interval = FOLLOW_SECONDS if self.offsets != before else min(1.0, interval * 2)

    def poll(self) -> None:
        lines: list[tuple[str, str]] = []
        for path in sorted(self.log_dir.glob("*.log")):
            if path.name == "supervisord.log":
                continue
            offset = self.offsets.get(path, 0)
            try:
                if path.stat().st_size < offset:  # rotated: the old file is now <name>.1
                    try:
                        lines += self._read(path.stem, path.with_name(path.name + ".1"), offset)[1]
                    except OSError:
                        pass
                    offset = 0
                used, new = self._read(path.stem, path, offset)
                self.offsets[path] = offset + used
                lines += new
            except OSError:
                continue
        if lines:  # one write for all of them (stderr may be unbuffered)
            lines.sort(key=lambda item: item[0])  # stable: a file's lines keep their order
            say(sys.stderr, "".join(text for _, text in lines))

    def _read(self, name: str, path: Path, offset: int) -> tuple[int, list[tuple[str, str]]]:
        """The complete lines of ``path`` after ``offset`` as (time, text), and their bytes."""
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        complete = data.rfind(b"\n") + 1
        prefix = f"{name:<14} | "
        stamp = self.stamps.get(name, "")
        out = []
        for line in data[:complete].decode("utf-8", "replace").splitlines():
            match = _STAMP.match(line)
            if match:
                stamp = match.group(0)
            out.append((stamp, f"{prefix}{line}\n"))
        self.stamps[name] = stamp
        return complete, out


class Launcher:
    """Runs supervisord in the foreground and talks to it over its unix socket.

    supervisord acts (starts its programs, reaps a child that exited, handles a
    signal) only when its poll wakes: on a request, on output from a program, or
    when the poll's 1 s timeout ends. A child's exit and a signal do not wake it
    (Python retries the poll). Each step below that waits on supervisord wakes it
    with a request, so start-up and shutdown take milliseconds, not seconds.
    """

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.conf_path = config.run_dir / "supervisord.conf"
        self.socket_path = config.run_dir / "supervisor.sock"
        self.summary_path = config.run_dir / "summary.json"
        self.out_path = config.log_dir / SUPERVISORD_OUT

    def rpc(self) -> xmlrpc.client.ServerProxy:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def poke(self) -> bool:
        """Wake supervisord's loop (a connection on its socket); False if nothing listens."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(str(self.socket_path))
                return True
            except OSError:
                return False

    def start(self) -> subprocess.Popen:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.summary_path.unlink(missing_ok=True)
        self.conf_path.write_text(render(TEMPLATE.read_text(), self.config, self.args))
        load_prctl()  # looked up here: the child only calls it between fork and exec
        launcher = os.getpid()

        def stop_with_launcher() -> None:
            # However the launcher dies (kill -9 too), supervisord gets the SIGTERM that
            # stops its programs gracefully. Already dead by now: do not start at all.
            if not die_with_parent(launcher):
                os._exit(1)

        # -s: supervisord's log goes to supervisord.log only, not to an inherited stdout
        # (a pipe that can break under it, a terminal that can close).
        with open(self.out_path, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-s",
                                     "-c", str(self.conf_path)], start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=stop_with_launcher)

    def wake_when_listening(self, proc: subprocess.Popen) -> None:
        """supervisord starts its programs on the first turn of its loop: wake it as soon as
        it listens (else up to 1 s passes before anything starts)."""
        deadline = time.monotonic() + START_WAIT_SECONDS
        while proc.poll() is None and time.monotonic() < deadline and not self.poke():
            time.sleep(POKE_SECONDS)

    def dispatcher_result(self) -> str | None:
        """"done" when the dispatcher exited 0 (exit-when-done), "fatal" if it cannot run."""
        try:
            info = self.rpc().supervisor.getProcessInfo("dispatcher")
        except (OSError, xmlrpc.client.Fault):
            return None
        if info["statename"] == "EXITED" and info["exitstatus"] == 0:
            return "done"
        if info["statename"] == "FATAL":
            return "fatal"
        return None

    def wait_result(self, proc: subprocess.Popen, stop: StopRequest) -> str | None:
        """With --exit-when-done: "done" or "fatal" once the dispatcher says so; None on a
        stop request or when supervisord ends. The dispatcher writes summary.json just
        before it exits 0: seen within 0.1 s, then confirmed by supervisord."""
        rpc_at = 0.0
        while proc.poll() is None and not stop.requested:
            summary = self.summary_path.exists()
            if summary or time.monotonic() >= rpc_at:
                rpc_at = time.monotonic() + RESULT_POLL_SECONDS
                result = self.dispatcher_result()
                if result is not None:
                    return result
            wait = POKE_SECONDS if summary else SUMMARY_POLL_SECONDS
            if select.select([stop.wakeup_fd], [], [], wait)[0]:
                stop.drain()
        return None

    def wait_stopped(self, proc: subprocess.Popen, stop: StopRequest) -> None:
        """Without --exit-when-done: until supervisord ends or a stop is requested."""
        while proc.poll() is None and not stop.requested:
            # Not proc.wait(timeout=...): it polls every few ms (30 wake-ups/s while idle).
            if select.select([stop.wakeup_fd], [], [], SUPERVISORD_POLL_SECONDS)[0]:
                stop.drain()

    def run(self) -> int:
        busy = self.claim()
        if busy is not None:
            say(sys.stderr, f"anime-downloader: {busy}\n")
            return EXIT_ALREADY_RUNNING
        stop = StopRequest()  # from here on, any stop signal stops what is started
        follower = LogFollower(self.config.log_dir)  # relays what is written from now on
        proc = self.start()
        follower.start()
        say(sys.stderr, f"anime-downloader: supervisord started (config {self.conf_path}); "
                        "Ctrl-C stops\n")
        self.wake_when_listening(proc)
        result = None
        if self.args.exit_when_done:
            result = self.wait_result(proc, stop)
        else:
            self.wait_stopped(proc, stop)
        ended = proc.poll()  # supervisord ended by itself (not by our stop)
        if result == "done":
            self.stop_all()
        self.shutdown(proc)
        follower.stopped.set()
        follower.join(timeout=5)
        follower.poll()  # the last lines, once the thread no longer reads
        return self.report(result, ended)

    def claim(self) -> str | None:
        """Take this installation for this launcher, or say what still runs for it."""
        busy = already_running(self.config)
        if busy is None:
            try:  # held for the launcher's life; released by the kernel however it ends
                hold_lock(self.config.run_dir / LOCK_NAME, f"anime-downloader for {self.config.path}")
            except AlreadyRunning as exc:  # another launcher won the race
                busy = str(exc)
        return busy

    def report(self, result: str | None, ended: int | None) -> int:
        """The last words once everything has stopped, and the exit code."""
        if result == "fatal":
            say(sys.stderr, "anime-downloader: the dispatcher could not start; see "
                            f"{self.config.log_dir / 'dispatcher.log'}\n")
            return 1
        if result == "done":
            say(sys.stdout, summary_line(json.loads(self.summary_path.read_text())) + "\n")
            return 0
        if ended:  # supervisord ended without being asked to: say so, with its last words
            how = f"was killed by signal {-ended}" if ended < 0 else f"exited with code {ended}"
            say(sys.stderr, f"anime-downloader: supervisord {how}; see "
                            f"{self.config.log_dir / 'supervisord.log'}\n{self.last_words()}")
            return ended if ended > 0 else 1
        summary = db_summary(self.config.db_path, self.args.anime_id)
        if summary is not None:
            say(sys.stdout, summary_line(summary) + "\n")
        return 0

    def last_words(self) -> str:
        """The end of supervisord's own output (tracebacks, start-up errors), indented."""
        try:
            tail = self.out_path.read_text(errors="replace").splitlines()[-20:]
        except OSError:
            return ""
        return f"  {self.out_path}:\n" + "".join(f"    {line}\n" for line in tail) if tail else ""

    def stop_all(self) -> None:
        """Stop every program at once and wait until supervisord has seen them all exit.
        (On SIGTERM supervisord stops one priority group per turn of its loop, and
        stopAllProcesses(wait=True) answers on a turn of the loop too: a second each.)"""
        try:
            self.rpc().supervisor.stopAllProcesses(False)
        except (OSError, xmlrpc.client.Fault):
            return  # shutdown() below stops what is left
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while time.monotonic() < deadline:
            try:  # each request also wakes supervisord, which then reaps what exited
                infos = self.rpc().supervisor.getAllProcessInfo()
            except (OSError, xmlrpc.client.Fault):
                return
            if not any(i["statename"] in LIVE_STATES for i in infos):
                return
            time.sleep(POKE_SECONDS)

    def shutdown(self, proc: subprocess.Popen) -> int:
        """One SIGTERM: supervisord stops its programs one priority group at a time (the
        workers hand their jobs back while the dispatcher still listens). It moves to the
        next group when its loop wakes: poke it instead of waiting for its 1 s timeout."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            while time.monotonic() < deadline:
                self.poke()
                try:
                    return proc.wait(timeout=STOP_POKE_SECONDS)
                except subprocess.TimeoutExpired:
                    continue
            proc.kill()  # its programs get their SIGTERM from the kernel (parent death)
        return proc.wait()


def supervisorctl(config: Config, words: list[str]) -> int:
    """``--supervisorctl ARGS``: supervisorctl on this installation's supervisord socket,
    ``<root_dir>/run/supervisor.sock``, which both ways of running it use: the launcher's
    rendered ``<root_dir>/run/supervisord.conf`` and the repo's ``supervisord.conf`` run
    directly (its ``data/`` is the repo config's root_dir). supervisorctl's exit code."""
    sock = config.run_dir / "supervisor.sock"
    if _supervisord_pid(config.run_dir) is None:
        say(sys.stderr, f"anime-downloader: no supervisord is running for {config.path} "
                        f"(nothing listens on {sock}); start it with: anime-downloader -c {config.path}\n")
        return 1
    argv = [sys.executable, "-m", "supervisor.supervisorctl", "-s", f"unix://{sock}", *words]
    return subprocess.call(argv, stdin=None if words else subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_or_exit("anime-downloader", args.config)
    if args.supervisorctl is not None:
        return supervisorctl(config, args.supervisorctl)
    if not args.dry_run:  # a dry run writes nothing, not even the storage's marker
        identify_or_exit("anime-downloader", config.root_dir, config.storage_dir,
                         config.create_storage_dir)
    return Launcher(config, args).run()


if __name__ == "__main__":
    sys.exit(main())
