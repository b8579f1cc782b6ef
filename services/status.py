"""``anime-status``: ask the running dispatcher how things stand (ZeroMQ, never the DB).

Exit 0 with the status, or 1 with one line when nothing answers within
``--timeout`` seconds, so it doubles as a health check; then it also prints the
queue as jobs.db has it, read-only (services/status_offline.py), marked as such.
``--watch`` redraws until Ctrl-C (exit 0) and keeps asking while the dispatcher
is silent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import zmq


def _import_msgspec_lean() -> None:
    """Import msgspec without typing_extensions. msgspec imports it when it is installed
    (aiohttp brings it) for what ``typing`` has itself since Python 3.11, and it imports
    ``inspect``: 10 ms of a probe whose floor (``python -c "import zmq"``) is ~60 ms
    (bench/status_cli.py). Later imports of typing_extensions (anime-web's aiohttp) are
    untouched."""
    if "msgspec" in sys.modules or "typing_extensions" in sys.modules:
        return
    sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # ImportError
    try:
        import msgspec  # noqa: F401
    finally:
        del sys.modules["typing_extensions"]


_import_msgspec_lean()

from shared.config import Config, ConfigError  # noqa: E402
from shared.config import config_or_exit  # noqa: E402
from shared.protocol import (Message, ProtocolError, StatusReply, StatusRequest, decode,  # noqa: E402
                             encode)
from shared.sockets import Sockets  # noqa: E402
from services.status_text import render_text  # noqa: E402


class NoAnswer(Exception):
    pass


def fetch_status(sockets: Sockets, endpoint: str, timeout: float) -> dict:
    return ask(sockets, endpoint, StatusRequest(), StatusReply, timeout).status


def ask(sockets: Sockets, endpoint: str, request: Message, reply_type: type[Message],
        timeout: float) -> Message:
    """Send ``request`` from a fresh DEALER and wait up to ``timeout`` for a ``reply_type``
    (anime-status, anime-ctl); NoAnswer, in the words a user reads, when none comes."""
    sock = sockets.connect(zmq.DEALER, endpoint)
    try:
        sock.send_multipart(encode(request))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(left * 1000):
                break
            try:
                reply = decode(sock.recv_multipart())
            except ProtocolError:
                continue
            if isinstance(reply, reply_type):
                return reply
        raise NoAnswer(f"no answer from the dispatcher at {endpoint} within {timeout:g}s "
                       "(is anime-downloader running?)")
    finally:
        sock.close(linger=0)


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's default formatter imports shutil only to read the terminal width: 4 ms
    of a probe that should answer in well under 100 ms. Same width, read directly."""
    try:
        width = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (ValueError, OSError, AttributeError):
        width = 0
    return argparse.HelpFormatter(prog, width=max((width or 80) - 2, 20))  # some ptys say 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anime-status", formatter_class=_help_formatter,
        description="Show the queue, the workers' progress and the disk of a running "
                    "anime-downloader. Exits 1 if nothing answers (usable as a health check).")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (keys: docs/status-json.md); with --watch, one per line")
    parser.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    parser.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                        help="how long to wait for an answer (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout: must be greater than 0, got {args.timeout}")
    if args.watch is not None and args.watch <= 0:
        parser.error(f"--watch: must be greater than 0, got {args.watch}")
    return args


def show(status: dict, as_json: bool) -> str:
    return json.dumps(status, sort_keys=True) if as_json else render_text(status)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_or_exit("anime-status", args.config)
    sockets = Sockets(config)
    try:
        if args.watch is None:
            print(show(fetch_status(sockets, config.zmq.status, args.timeout), args.json), flush=True)
            return 0
        return watch(sockets, config, args)
    except NoAnswer as exc:
        print(f"anime-status: {exc}", file=sys.stderr, flush=True)
        print(from_database(config, args.json), flush=True)
        return 1
    except ConfigError as exc:  # e.g. a remote endpoint without CURVE keys
        print(f"anime-status: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        sockets.close()


def from_database(config: Config, as_json: bool) -> str:
    """The queue read from jobs.db (read-only) when the dispatcher does not answer."""
    from services.status_offline import report  # only on this path: the probe stays cheap

    return report(config.db_path, as_json)


def watch(sockets: Sockets, config: Config, args: argparse.Namespace) -> int:
    """Redraw every ``args.watch`` seconds until Ctrl-C; a silent dispatcher (restarting
    under supervisord) shows as one line and the next round asks again."""
    while True:
        started = time.monotonic()
        try:
            text = show(fetch_status(sockets, config.zmq.status, args.timeout), args.json)
        except NoAnswer as exc:
            text = f"anime-status: {exc}\n{from_database(config, args.json)}"
        if not args.json and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")  # clear the screen, then redraw
        print(text, flush=True)
        time.sleep(max(0.0, args.watch - (time.monotonic() - started)))


if __name__ == "__main__":
    sys.exit(main())
