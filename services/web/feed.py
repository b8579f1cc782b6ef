"""One status poll shared by every open page.

``FeedState`` (pure, the clock passed in) turns the dispatcher's answers and silences
into what a page is told: the latest document, or the last one known plus since when
nothing answers. ``StatusFeed`` is its asyncio shell: while at least one page listens
it asks the dispatcher once per heartbeat, however many pages are open, and hands each
subscriber the newest update (a slow page skips updates instead of queueing them).
With no page open it asks nothing; ``/api/status`` asks on demand and shares the answer
with a poll already under way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

import msgspec

from services.status import NoAnswer
from services.web.overview import overview
from shared.logfmt import kv

log = logging.getLogger(__name__)


class Update(msgspec.Struct, frozen=True):
    ok: bool  # the dispatcher answered the last request
    status: dict | None  # its document; while silent, the last one known (or None)
    error: str | None  # why there is no fresh document
    since: float | None  # silent since (this process's clock), None while answering
    at: float  # when this was judged
    overview: dict

    def event(self) -> dict:
        return {"ok": self.ok, "status": self.status, "error": self.error, "since": self.since,
                "at": self.at, "overview": self.overview}


class FeedState:
    """The latest update, and whether the dispatcher just fell silent or came back."""

    def __init__(self) -> None:
        self.latest: Update | None = None
        self._status: dict | None = None
        self._silent_since: float | None = None

    def answered(self, status: dict, now: float) -> tuple[Update, str | None]:
        came_back = self._silent_since is not None
        note = (kv("dispatcher answering again", silent_seconds=f"{now - self._silent_since:.1f}")
                if came_back else None)
        self._status, self._silent_since = status, None
        self.latest = Update(ok=True, status=status, error=None, since=None, at=now,
                             overview=overview(status))
        return self.latest, note

    def silent(self, error: str, now: float) -> tuple[Update, str | None]:
        note = None
        if self._silent_since is None:
            self._silent_since = now
            note = kv("dispatcher not answering", error=error)
        self.latest = Update(ok=False, status=self._status, error=error, since=self._silent_since,
                             at=now, overview=overview(None, error, self._silent_since))
        return self.latest, note


class Subscription:
    """One page's stream of updates; ``next()`` returns None once the feed is closed."""

    _CLOSED = object()

    def __init__(self, feed: "StatusFeed") -> None:
        self._feed = feed
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=1)

    def offer(self, item: object) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # the page has not read the previous one: drop it
        self._queue.put_nowait(item)

    async def next(self) -> Update | None:
        item = await self._queue.get()
        return None if item is self._CLOSED else item  # type: ignore[return-value]

    def close(self) -> None:
        self._feed._subscribers.discard(self)


class StatusFeed:
    def __init__(self, fetch: Callable[[], Awaitable[dict]], interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.fetch = fetch
        self.interval = interval
        self.clock = clock
        self.state = FeedState()
        self.requests = 0  # fetches made: what "one poll for all pages" is measured by
        self._subscribers: set[Subscription] = set()
        self._inflight: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._closed = asyncio.Event()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.add(sub)
        if self.state.latest is not None:
            sub.offer(self.state.latest)  # the page shows something at once
        if self._task is None and not self._closed.is_set():
            self._task = asyncio.create_task(self._poll(), name="status-poll")
        return sub

    async def latest(self, max_age: float) -> Update:
        """An update no older than ``max_age`` seconds, fetched now if need be."""
        latest = self.state.latest
        if latest is not None and latest.ok and self.clock() - latest.at < max_age:
            return latest
        return await self.refresh()

    async def refresh(self) -> Update:
        """Ask the dispatcher, or join the request already under way."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._ask())
        future = self._inflight
        try:
            return await asyncio.shield(future)
        finally:
            if future.done() and self._inflight is future:
                self._inflight = None

    async def _ask(self) -> Update:
        self.requests += 1
        try:
            status = await self.fetch()
        except NoAnswer as exc:
            update, note = self.state.silent(str(exc), self.clock())
        except Exception as exc:  # a bug or a broken socket must not end the page's feed
            log.exception(kv("status request failed", error=exc))
            update, note = self.state.silent(f"status request failed: {exc}", self.clock())
        else:
            update, note = self.state.answered(status, self.clock())
        if note:
            (log.info if update.ok else log.warning)(note)
        return update

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._subscribers and not self._closed.is_set():
                started = loop.time()
                update = await self.refresh()
                for sub in list(self._subscribers):
                    sub.offer(update)
                left = self.interval - (loop.time() - started)
                if left > 0:
                    try:
                        await asyncio.wait_for(self._closed.wait(), left)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self._task = None

    async def close(self) -> None:
        """End every subscription (their pages' streams end) and the poll."""
        self._closed.set()
        for sub in list(self._subscribers):
            sub.offer(Subscription._CLOSED)
        self._subscribers.clear()
        task = self._task
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
