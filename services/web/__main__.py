"""``anime-web``: the page to watch the running system in a browser (README, "The web page")."""

from __future__ import annotations

import argparse
import sys

from shared.config import load_config
from shared.lifecycle import run_service, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anime-web",
        description="Serve a page (and a JSON API under /api/) showing the running "
                    "anime-downloader: the queue, each worker's download, the disk. "
                    "Listens on [web] listen (default 127.0.0.1:8766).")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging (and every request)")
    args = parser.parse_args(argv)
    setup_logging("web", args.verbose)

    def build():
        from services.web.server import WebServer

        return WebServer(load_config(args.config))

    return run_service("anime-web", build)


if __name__ == "__main__":
    sys.exit(main())
