"""``anime-disk-watcher``: measure the storage directory, publish pause/resume."""

from __future__ import annotations

import argparse
import sys

from shared.config import load_config
from shared.lifecycle import run_service, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anime-disk-watcher",
        description="Measure the storage directory and publish the disk state "
                    "(running / paused / hard_limit) over ZeroMQ.")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging")
    args = parser.parse_args(argv)
    setup_logging("disk-watcher", args.verbose)

    def build():
        from services.disk_watcher.server import DiskWatcherServer

        return DiskWatcherServer(load_config(args.config))

    return run_service("anime-disk-watcher", build)


if __name__ == "__main__":
    sys.exit(main())
