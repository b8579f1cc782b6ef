"""``anime-ctl``: the operator's controls of a running anime-downloader (docs/anime-ctl.md).

Sends one ``control.<command>`` request to the dispatcher's control endpoint
(``[zmq] control``) and prints its answer in one line (``--json``: one JSON object).
Exit 0 when done, 1 when nothing answers or the database is busy (nothing changed: try
again), 2 for a bad argument (the message names it), a job that does not exist or one
the command does not apply to. The arguments are checked by services/controls.py, as
the web's buttons are.
"""

from __future__ import annotations

import argparse
import json
import sys

from services.controls import PRIORITY_NAMES, BadArgument, parse, request
from services.status import NoAnswer, ask
from shared.config import ConfigError
from shared.config import config_or_exit
from shared.protocol import ControlReply
from shared.sockets import Sockets

PROG = "anime-ctl"
SOURCE = "anime-ctl"
EXIT_OK, EXIT_NO_ANSWER, EXIT_BAD = 0, 1, 2
# The request fields (services/controls.py) by the names of anime-ctl's arguments
OPTION_OF = {"for": "--for", "job_ids": "--job", "job_id": "--job", "anime_id": "--anime-id",
             "mbps": "MBPS", "priority": "PRIORITY"}
EXAMPLES = """\
examples:
  anime-ctl pause --for 2h          no new download starts for two hours
  anime-ctl pause --now             and stop the running ones (they resume later)
  anime-ctl resume
  anime-ctl retry --failed          every failed job back in the queue
  anime-ctl retry --job 12 13       or some jobs, or: --anime-id 5114
  anime-ctl cancel --job 12
  anime-ctl priority --anime-id 5114 high      (high, normal, low or a number)
  anime-ctl bandwidth 40            40 Mbps in all until a restart (0 = unlimited)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit 2, in our one-line style
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD, f"{PROG}: {message}\n")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The options every command takes, before or after its name."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("-c", "--config", default=default("config.toml"),
                        help="config file (default: config.toml)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the answer as one JSON object {ok, message, result}")
    parser.add_argument("--timeout", type=float, default=default(5.0), metavar="SECONDS",
                        help="how long to wait for the dispatcher's answer (default: 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Steer a running anime-downloader: pause, resume, retry, "
                                 "cancel, priorities, bandwidth. Prints what was done in one "
                                 "line; exit 0 done, 1 nothing answers (or the database is "
                                 "busy: try again), 2 bad argument.", epilog=EXAMPLES)
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub, suppress=True)
        return sub

    pause = command("pause", "no new download starts (running ones finish); kept across "
                             "a restart of the dispatcher")
    pause.add_argument("--for", dest="duration", metavar="DURATION",
                       help="resume by itself after DURATION: 30s, 90m, 2h, 1d (or seconds)")
    pause.add_argument("--now", action="store_true",
                       help="also interrupt the running downloads: back to the queue without "
                            "counting a retry, resumed from their partial files later")
    command("resume", "end the operator's pause (the disk budget still applies)")
    retry = command("retry", "failed jobs back to the queue with retry_count reset (their "
                             "error_message goes to the log); jobs backing off are retried now")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--failed", action="store_true", help="every failed job")
    which.add_argument("--job", dest="job_ids", type=_job_id, nargs="+", metavar="ID",
                       help="these jobs")
    which.add_argument("--anime-id", type=_job_id, metavar="ID", help="the jobs of one anime (MAL ID)")
    cancel = command("cancel", "stop a download (its process group) and mark the job "
                               "cancelled, deleting its partial files; a queued job at once")
    cancel.add_argument("--job", dest="job_id", type=_job_id, required=True, metavar="ID")
    priority = command("priority", "hand out higher priorities first (then an anime's "
                                   "episodes in order, then older jobs)")
    target = priority.add_mutually_exclusive_group(required=True)
    target.add_argument("--anime-id", type=_job_id, metavar="ID", help="every job of one anime (MAL ID)")
    target.add_argument("--job", dest="job_id", type=_job_id, metavar="ID", help="one job")
    priority.add_argument("priority", metavar="PRIORITY", type=_priority,
                          help="high (10), normal (0), low (-10) or a whole number")
    bandwidth = command("bandwidth", "change total_bandwidth_mbps for new and running "
                                     "downloads until the next restart")
    bandwidth.add_argument("mbps", metavar="MBPS", type=_mbps,
                           help="megabits per second for all downloads together; 0 = unlimited")
    return parser


def _job_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def _priority(text: str) -> int | str:
    if text in PRIORITY_NAMES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be high, normal, low or a whole number, got {text!r}") from None


def _mbps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a number of megabits per second, 0 for unlimited, got {text!r}")
    return value


def body_of(args: argparse.Namespace) -> dict:
    """The request body of the command, as the web's JSON would carry it."""
    if args.command == "pause":
        return {"for": args.duration, "now": args.now}
    if args.command == "retry":
        return {"failed": args.failed, "job_ids": args.job_ids or [], "anime_id": args.anime_id}
    if args.command == "cancel":
        return {"job_id": args.job_id}
    if args.command == "priority":
        return {"anime_id": args.anime_id, "job_id": args.job_id, "priority": args.priority}
    if args.command == "bandwidth":
        return {"mbps": args.mbps}
    return {}


def exit_code(reply: ControlReply) -> int:
    if reply.ok:
        return EXIT_OK
    return EXIT_NO_ANSWER if (reply.result or {}).get("error") == "unavailable" else EXIT_BAD


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout: must be greater than 0, got {args.timeout}")
    try:
        fields = parse(args.command, body_of(args))
    except BadArgument as exc:
        field, sep, rest = str(exc).partition(": ")
        parser.error(f"{OPTION_OF.get(field, field)}{sep}{rest}")
    config = config_or_exit(PROG, args.config)
    sockets = Sockets(config)
    try:
        reply = ask(sockets, config.zmq.control, request(args.command, fields, SOURCE),
                    ControlReply, args.timeout)
    except NoAnswer as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except ConfigError as exc:  # e.g. a remote endpoint without CURVE keys
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_BAD
    except KeyboardInterrupt:
        return EXIT_NO_ANSWER
    finally:
        sockets.close()
    assert isinstance(reply, ControlReply)
    if args.json:
        print(json.dumps({"ok": reply.ok, "message": reply.message, "result": reply.result},
                         sort_keys=True, default=str), flush=True)
    elif reply.ok:
        print(reply.message, flush=True)
    else:
        print(f"{PROG}: {reply.message}", file=sys.stderr)
    return exit_code(reply)


if __name__ == "__main__":
    sys.exit(main())
