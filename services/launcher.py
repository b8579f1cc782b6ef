"""``anime-downloader``: run the whole system in the foreground under supervisord.

It renders the repo's ``supervisord.conf`` for the given config (paths under its
root_dir, ``-w`` workers, the options passed to the services) into
``<root_dir>/run/supervisord.conf``, starts ``supervisord -n`` in its own
session (so Ctrl-C reaches only us, and we stop it with one SIGTERM), follows
the services' log files to the terminal, and with ``--exit-when-done`` stops
everything once the dispatcher reports that no runnable job is left.
"""

from __future__ import annotations

import argparse
import configparser
import io
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

from shared.config import Config
from shared.lifecycle import StopRequest, config_or_exit
from shared.storage import identify_or_exit

REPO_DIR = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_DIR / "supervisord.conf"
PROGRAMS = ("disk-watcher", "dispatcher", "worker")
POKE_SECONDS = 0.05  # between requests to supervisord while something happens at once
SUMMARY_POLL_SECONDS = 0.1  # --exit-when-done: how often to look for summary.json
RESULT_POLL_SECONDS = 2.0  # how often to ask supervisord whether the dispatcher failed
SUPERVISORD_POLL_SECONDS = 0.5  # how often to look whether supervisord still runs
FOLLOW_SECONDS = 0.5  # how often to relay new log lines while they come (1 s when quiet)
START_WAIT_SECONDS = 10.0
STOP_WAIT_SECONDS = 60.0  # beyond every program's stopwaitsecs
LIVE_STATES = {"STARTING", "RUNNING", "BACKOFF", "STOPPING"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anime-downloader",
        description="Download every queued episode with ani-cli: a dispatcher, a disk-watcher "
                    "and N workers under supervisord, in the foreground. Ctrl-C stops all.")
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
    """Prints new lines of the services' log files to the terminal."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(daemon=True)
        self.log_dir = log_dir
        self.offsets: dict[Path, int] = {p: p.stat().st_size for p in log_dir.glob("*.log")}
        self.stopped = threading.Event()

    def run(self) -> None:
        interval = FOLLOW_SECONDS
        while not self.stopped.wait(interval):
            before = dict(self.offsets)
            self.poll()
            # Quiet logs: back off to 1 s, so an idle system wakes the launcher less often.
            interval = FOLLOW_SECONDS if self.offsets != before else min(1.0, interval * 2)

    def poll(self) -> None:
        for path in sorted(self.log_dir.glob("*.log")):
            if path.name == "supervisord.log":
                continue
            offset = self.offsets.get(path, 0)
            try:
                if path.stat().st_size < offset:  # rotated: the old file is now <name>.1
                    try:
                        self._emit(path.stem, path.with_name(path.name + ".1"), offset)
                    except OSError:
                        pass
                    offset = 0
                self.offsets[path] = offset + self._emit(path.stem, path, offset)
            except OSError:
                continue
        sys.stderr.flush()

    @staticmethod
    def _emit(name: str, path: Path, offset: int) -> int:
        """Print the complete lines of ``path`` after ``offset``; returns how many bytes."""
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
        complete = data.rfind(b"\n") + 1
        if complete:  # one write for all of them (stderr may be unbuffered)
            prefix = f"{name:<14} | "
            lines = data[:complete].decode("utf-8", "replace").splitlines()
            sys.stderr.write("".join(f"{prefix}{line}\n" for line in lines))
        return complete


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
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.summary_path.unlink(missing_ok=True)
        self.conf_path.write_text(render(TEMPLATE.read_text(), self.config, self.args))
        return subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n",
                                 "-c", str(self.conf_path)], start_new_session=True,
                                stdin=subprocess.DEVNULL)

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
        follower = LogFollower(self.config.log_dir)
        stop = StopRequest()
        proc = self.start()
        follower.start()
        print(f"anime-downloader: supervisord started (config {self.conf_path}); Ctrl-C stops",
              file=sys.stderr)
        self.wake_when_listening(proc)
        result = None
        if self.args.exit_when_done:
            result = self.wait_result(proc, stop)
        else:
            self.wait_stopped(proc, stop)
        if result == "done":
            self.stop_all()
        code = self.shutdown(proc)
        follower.stopped.set()
        follower.join(timeout=5)
        follower.poll()  # the last lines, once the thread no longer reads
        if result == "fatal":
            print("anime-downloader: the dispatcher could not start; see "
                  f"{self.config.log_dir / 'dispatcher.log'}", file=sys.stderr)
            return 1
        if result == "done":
            summary = json.loads(self.summary_path.read_text())
            print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
            return 0
        return 0 if stop.requested else code

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
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # supervisord stops every program gracefully
            self.poke()  # ... once its loop wakes
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_or_exit("anime-downloader", args.config)
    if not args.dry_run:  # a dry run writes nothing, not even the storage's marker
        identify_or_exit("anime-downloader", config.root_dir, config.storage_dir,
                         config.create_storage_dir)
    return Launcher(config, args).run()


if __name__ == "__main__":
    sys.exit(main())
