"""``anime-disk-watcher``: measure the storage directory, publish pause/resume."""

from __future__ import annotations

import argparse
import sys

from shared.config import ConfigError, load_config
from shared.lifecycle import setup_logging
from shared.singleton import AlreadyRunning


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anime-disk-watcher",
        description="Measure the storage directory and publish the disk state "
                    "(running / paused / hard_limit) over ZeroMQ.")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging")
    args = parser.parse_args(argv)
    setup_logging("disk-watcher", args.verbose)
    try:
        from services.disk_watcher.service import DiskWatcherServer

        server = DiskWatcherServer(load_config(args.config))
    except ConfigError as exc:
        print(f"anime-disk-watcher: {exc}", file=sys.stderr)
        return 2
    except AlreadyRunning as exc:
        print(f"anime-disk-watcher: {exc}", file=sys.stderr)
        return 3
    try:
        return server.run()
    except ConfigError as exc:  # an endpoint refused at bind (e.g. non-loopback without CURVE)
        print(f"anime-disk-watcher: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
