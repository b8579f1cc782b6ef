"""``anime-worker``: download the jobs the dispatcher hands out, one at a time."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from shared.config import load_config
from shared.lifecycle import run_service, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="anime-worker",
        description="Ask the dispatcher for jobs and download each with ani-cli.")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("--worker-id", default=None,
                        help="stable name of this worker (default: <host>-<pid>); supervisord "
                             "passes w<process_num>")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG logging")
    args = parser.parse_args(argv)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    if "/" in worker_id:
        print(f"anime-worker: --worker-id {worker_id!r}: must not contain '/'", file=sys.stderr)
        return 2
    setup_logging(f"worker {worker_id}", args.verbose)

    def build():
        from services.worker.agent import Worker
        from shared.singleton import hold_lock

        config = load_config(args.config)
        # Two live workers with one id would take each other's leases as restarts.
        hold_lock(config.run_dir / f"worker-{worker_id}.lock", f"worker {worker_id} for {config.root_dir}")
        return Worker(config, worker_id)

    return run_service("anime-worker", build)


if __name__ == "__main__":
    sys.exit(main())
