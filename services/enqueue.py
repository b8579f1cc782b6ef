"""``anime-enqueue``: add episodes (and optionally the anime's selection) to the queue.

Like the upstream anime-selector, it writes the two contract tables in one short
transaction (the dispatcher tolerates that: WAL, busy timeout). Idempotent per
anime and episode: an episode already in the queue, at any stage, is left alone,
also when several copies of it (or the selector) run at once: the check and the
insert are one BEGIN IMMEDIATE transaction, so nobody inserts in between. While
another program holds the database locked it waits, saying so once on stderr.
"""

from __future__ import annotations

import argparse
import shlex
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable

from shared.config import config_or_exit
from shared.models import CONTRACT_DDL

CONFIDENCES = ("high", "medium", "low")
BUSY_SLICE_SECONDS = 1.0  # SQLite's busy timeout per try; after the first, it says it waits
WAIT_SECONDS = 300.0  # then it gives up, writing nothing


class DatabaseLocked(Exception):
    pass


def parse_episodes(text: str) -> list[int]:
    """``"1-64"``, ``"3"``, ``"1,3,5-7"`` -> sorted episode numbers; ValueError names the bad part."""
    episodes: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(f"{part!r} is not a number or a range like 1-64") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"{part!r}: episodes start at 1 and a range goes upwards")
        if hi - lo >= 100_000:
            raise ValueError(f"{part!r}: too many episodes")
        episodes.update(range(lo, hi + 1))
    return sorted(episodes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="anime-enqueue",
        description="Queue episodes of one anime for download (idempotent per episode).")
    parser.add_argument("-c", "--config", default="config.toml", help="config file (default: %(default)s)")
    parser.add_argument("--mal-id", type=int, required=True, help="MyAnimeList ID of the anime")
    parser.add_argument("--title", required=True, help="title to search for with ani-cli")
    parser.add_argument("--episodes", required=True, help="e.g. 1-64, 5, or 1,3,5-7")
    parser.add_argument("--max-retries", type=int, default=3, help="retries per episode (default: 3)")
    parser.add_argument("--selected-index", type=int,
                        help="which of ani-cli's search results for --title is the right show, "
                             "1 for the first (stores the selection; without one the episodes "
                             "wait until anime-selector or this option adds it)")
    parser.add_argument("--selected-title", help="title of that search result (default: --title)")
    parser.add_argument("--confidence", choices=CONFIDENCES, help="default: high")
    args = parser.parse_args(argv)
    try:
        args.episode_list = parse_episodes(args.episodes)
    except ValueError as exc:
        parser.error(f"--episodes: {exc}")
    if args.selected_index is None and (args.selected_title or args.confidence):
        parser.error("--selected-title and --confidence need --selected-index")
    if args.selected_index is not None and args.selected_index < 1:
        parser.error(f"--selected-index: must be 1 or more (1-based), got {args.selected_index}")
    if args.mal_id < 1:
        parser.error(f"--mal-id: must be a positive MAL ID, got {args.mal_id}")
    return args


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _begin(conn: sqlite3.Connection, wait: float, on_wait: Callable[[], None]) -> None:
    """BEGIN IMMEDIATE: the write lock, taken before anything is read."""
    deadline = time.monotonic() + wait
    waited = False
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise
            if time.monotonic() >= deadline:
                raise DatabaseLocked(str(exc)) from None
            if not waited:
                waited = True
                on_wait()


def _use_wal(conn: sqlite3.Connection) -> None:
    """WAL, as the dispatcher wants it. On a rollback-journal database another program's
    lock makes SQLite refuse the switch at once: then it stays as it is (the dispatcher
    switches it when it can), and the insert waits for the lock like any other."""
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:
        if not _locked(exc):
            raise


def enqueue(db_path: Path, mal_id: int, title: str, episodes: list[int], max_retries: int = 3,
            selection: tuple[int, str, str] | None = None, wait: float = WAIT_SECONDS,
            on_wait: Callable[[], None] = lambda: None) -> int:
    """Insert the missing episodes (and the selection); returns how many were added.

    Waits up to ``wait`` seconds for a database another program holds locked (calling
    ``on_wait`` once, when it starts waiting); raises DatabaseLocked after that."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=BUSY_SLICE_SECONDS, isolation_level=None)
    try:
        _use_wal(conn)
        _begin(conn, wait, on_wait)
        try:
            for ddl in CONTRACT_DDL:
                conn.execute(ddl)
            have = {row[0] for row in conn.execute(
                "SELECT episode FROM jobs WHERE anime_id = ?", (mal_id,))}
            new = [(mal_id, title, ep, max_retries) for ep in episodes if ep not in have]
            conn.executemany("INSERT INTO jobs (anime_id, anime_title, episode, stage, retry_count, "
                             "max_retries) VALUES (?, ?, ?, 'queued', 0, ?)", new)
            if selection is not None:
                conn.execute("INSERT INTO anime_selection_cache (mal_id, selected_index, "
                             "selected_title, confidence) VALUES (?, ?, ?, ?) ON CONFLICT(mal_id) "
                             "DO UPDATE SET selected_index = excluded.selected_index, "
                             "selected_title = excluded.selected_title, "
                             "confidence = excluded.confidence", (mal_id, *selection))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(new)
    finally:
        conn.close()


def has_selection(db_path: Path, mal_id: int) -> bool:
    """Whether ``anime_selection_cache`` has a row for ``mal_id`` (read-only; a database
    that cannot be read counts as having one: no warning on a guess)."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=BUSY_SLICE_SECONDS)
        try:
            return conn.execute("SELECT 1 FROM anime_selection_cache WHERE mal_id = ?",
                                (mal_id,)).fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return True


def no_selection_warning(args: argparse.Namespace) -> str:
    """What a user reads when the episodes just queued will wait for a selection."""
    again = shlex.join(["anime-enqueue", "-c", args.config, "--mal-id", str(args.mal_id),
                        "--title", args.title, "--episodes", args.episodes])
    return (f"anime-enqueue: warning: MAL ID {args.mal_id} has no cached selection, so its "
            "episodes wait in the queue and are not downloaded until one is added. Add it "
            "(anime-selector does, or this command) with --selected-index N, N being the "
            f"position of the right show among ani-cli's search results for {args.title!r} "
            f"(1 = the first):\n  {again} --selected-index N")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_or_exit("anime-enqueue", args.config)
    selection = None
    if args.selected_index is not None:
        selection = (args.selected_index, args.selected_title or args.title, args.confidence or "high")
    def say_waiting() -> None:
        print(f"anime-enqueue: {config.db_path} is locked by another program; waiting for it "
              f"(up to {WAIT_SECONDS:g}s)", file=sys.stderr, flush=True)

    try:
        added = enqueue(config.db_path, args.mal_id, args.title, args.episode_list,
                        args.max_retries, selection, on_wait=say_waiting)
    except DatabaseLocked:
        print(f"anime-enqueue: {config.db_path} stayed locked for {WAIT_SECONDS:g}s; nothing "
              "was queued (is another program stuck holding it?)", file=sys.stderr)
        return 1
    skipped = len(args.episode_list) - added
    print(f"queued {added} episode(s) of MAL ID {args.mal_id} ({skipped} already present)"
          + (f"; selection: index {selection[0]}" if selection else ""))
    if selection is None and not has_selection(config.db_path, args.mal_id):
        print(no_selection_warning(args), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
