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
import subprocess
import sys
import threading
import xmlrpc.client
from pathlib import Path

from shared.config import Config
from shared.lifecycle import StopRequest, config_or_exit

REPO_DIR = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_DIR / "supervisord.conf"
PROGRAMS = ("disk-watcher", "dispatcher", "worker")


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
        interval = 0.2
        while not self.stopped.wait(interval):
            before = dict(self.offsets)
            self.poll()
            # Quiet logs: back off to 1 s, so an idle system wakes the launcher less often.
            interval = 0.2 if self.offsets != before else min(1.0, interval * 2)

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
        for line in data[:complete].decode("utf-8", "replace").splitlines():
            sys.stderr.write(f"{name:<14} | {line}\n")
        return complete


class Launcher:
    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.conf_path = config.run_dir / "supervisord.conf"
        self.socket_path = config.run_dir / "supervisor.sock"

    def rpc(self) -> xmlrpc.client.ServerProxy:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def start(self) -> subprocess.Popen:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        (self.config.run_dir / "summary.json").unlink(missing_ok=True)
        self.conf_path.write_text(render(TEMPLATE.read_text(), self.config, self.args))
        return subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n",
                                 "-c", str(self.conf_path)], start_new_session=True,
                                stdin=subprocess.DEVNULL)

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

    def run(self) -> int:
        follower = LogFollower(self.config.log_dir)
        stop = StopRequest()
        proc = self.start()
        follower.start()
        print(f"anime-downloader: supervisord started (config {self.conf_path}); Ctrl-C stops",
              file=sys.stderr)
        result = None
        while proc.poll() is None and not stop.requested:
            # Not proc.wait(timeout=...): it polls every few ms (30 wake-ups/s while idle).
            if select.select([stop.wakeup_fd], [], [], 0.5)[0]:
                stop.drain()
            if self.args.exit_when_done and result is None:
                result = self.dispatcher_result()
                if result is not None:
                    break
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
            summary = json.loads((self.config.run_dir / "summary.json").read_text())
            print("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
            return 0
        return 0 if stop.requested else code

    def stop_all(self) -> None:
        """Stop every program at once: on SIGTERM supervisord stops one priority group per
        turn of its 1 s loop (2 s more after the workers are gone)."""
        try:
            self.rpc().supervisor.stopAllProcesses(True)
        except (OSError, xmlrpc.client.Fault):
            pass  # shutdown() below stops what is left

    @staticmethod
    def shutdown(proc: subprocess.Popen) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # supervisord stops every program gracefully
            try:
                return proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_or_exit("anime-downloader", args.config)
    return Launcher(config, args).run()


if __name__ == "__main__":
    sys.exit(main())
