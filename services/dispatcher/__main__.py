"""``anime-dispatcher``: the only process that writes the job database."""

from __future__ import annotations

import argparse
import sys

from shared.config import load_config
from shared.lifecycle import run_service, setup_logging
from services.dispatcher.core import Options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anime-dispatcher",
        description="Own the SQLite job queue and hand out jobs to workers over ZeroMQ.")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="hand out queued jobs without changing the database")
    parser.add_argument("--anime-id", type=int, metavar="ID", help="hand out only this MAL ID's jobs")
    parser.add_argument("--exit-when-done", action="store_true",
                        help="exit 0 with a summary when no runnable job is queued or in flight")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="workers started with it: total_bandwidth_mbps is shared among at "
                             "least N (default: among those connected)")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("dispatcher", args.verbose)

    def build():
        from services.dispatcher.server import DispatcherServer

        options = Options(args.dry_run, args.anime_id, args.exit_when_done, max(0, args.workers))
        return DispatcherServer(load_config(args.config), options)

    return run_service("anime-dispatcher", build)


if __name__ == "__main__":
    sys.exit(main())
