"""The shared status poll: one request per heartbeat for all pages, silences said once."""

from __future__ import annotations

import asyncio

from services.status import NoAnswer
from services.web.feed import FeedState, StatusFeed

INTERVAL = 0.05


class Dispatcher:
    """A fetch function that counts its calls and answers, or is silent, on request."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.silent = False
        self.delay = delay

    async def fetch(self) -> dict:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # sync-ok: stands for the dispatcher's answer time
        if self.silent:
            raise NoAnswer("no answer from the dispatcher at ipc:///x within 2s")
        return {"generated_at": float(self.calls), "queue": {"queued": self.calls}}


async def bounded(coro, seconds: float = 5.0):
    return await asyncio.wait_for(coro, seconds)


def test_many_pages_share_one_request_per_heartbeat():
    async def scenario():
        dispatcher = Dispatcher()
        feed = StatusFeed(dispatcher.fetch, INTERVAL)
        pages = [feed.subscribe() for _ in range(20)]
        seen = [[] for _ in pages]
        for _ in range(4):
            for page, got in zip(pages, seen):
                update = await bounded(page.next())
                got.append(update.status["generated_at"])
        await feed.close()
        return dispatcher.calls, seen

    calls, seen = asyncio.run(scenario())
    assert 4 <= calls <= 6, calls  # 20 pages, 4 rounds: one request per round, not 80
    assert all(got == sorted(got) and len(set(got)) == 4 for got in seen), seen


def test_no_page_no_request_and_a_new_page_gets_the_latest_at_once():
    async def scenario():
        dispatcher = Dispatcher()
        feed = StatusFeed(dispatcher.fetch, INTERVAL)
        await asyncio.sleep(INTERVAL * 4)  # sync-ok: time in which nothing may be asked
        idle_calls = dispatcher.calls
        page = feed.subscribe()
        first = await bounded(page.next())
        page.close()
        await asyncio.sleep(INTERVAL * 4)  # sync-ok: the poll stops once nobody listens
        after_close = dispatcher.calls
        await asyncio.sleep(INTERVAL * 4)  # sync-ok
        stopped = dispatcher.calls == after_close
        late = feed.subscribe()
        immediate = late._queue.get_nowait()  # offered before any new request
        await feed.close()
        return idle_calls, first, stopped, immediate

    idle_calls, first, stopped, immediate = asyncio.run(scenario())
    assert idle_calls == 0
    assert first.ok and first.status["generated_at"] == 1.0
    assert stopped
    assert immediate.ok and immediate.status is not None


def test_a_slow_page_skips_to_the_newest_update_instead_of_queueing():
    async def scenario():
        dispatcher = Dispatcher()
        feed = StatusFeed(dispatcher.fetch, INTERVAL)
        slow, fast = feed.subscribe(), feed.subscribe()
        for _ in range(5):
            await bounded(fast.next())
        newest = await bounded(slow.next())
        await feed.close()
        return newest, dispatcher.calls

    newest, calls = asyncio.run(scenario())
    assert newest.status["generated_at"] >= calls - 1


def test_status_requests_join_the_one_under_way():
    async def scenario():
        dispatcher = Dispatcher(delay=0.1)
        feed = StatusFeed(dispatcher.fetch, 10.0)
        updates = await bounded(asyncio.gather(*(feed.latest(max_age=1.0) for _ in range(10))))
        again = await feed.latest(max_age=1.0)  # fresh enough: no new request
        await feed.close()
        return dispatcher.calls, updates, again

    calls, updates, again = asyncio.run(scenario())
    assert calls == 1
    assert all(u is updates[0] for u in updates) and again is updates[0]


def test_silence_is_said_once_with_since_and_the_last_document_kept(caplog):
    async def scenario():
        dispatcher = Dispatcher()
        feed = StatusFeed(dispatcher.fetch, INTERVAL)
        page = feed.subscribe()
        answered = await bounded(page.next())
        dispatcher.silent = True
        silences = [await bounded(page.next()) for _ in range(3)]
        dispatcher.silent = False
        back = await bounded(page.next())
        await feed.close()
        return answered, silences, back

    caplog.set_level("INFO")
    answered, silences, back = asyncio.run(scenario())
    assert answered.ok
    assert [s.ok for s in silences] == [False] * 3
    assert len({s.since for s in silences}) == 1 and silences[0].since == silences[0].at
    assert all(s.status == answered.status for s in silences)  # the last one known
    assert silences[-1].overview["state"] == "not_answering"
    assert back.ok and back.since is None and back.overview["state"] != "not_answering"
    lines = [r.getMessage() for r in caplog.records]
    assert sum(line.startswith("dispatcher not answering") for line in lines) == 1
    assert sum(line.startswith("dispatcher answering again silent_seconds=") for line in lines) == 1


def test_a_broken_fetch_is_a_silence_not_the_end_of_the_feed():
    async def scenario():
        calls = 0

        async def fetch() -> dict:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("socket exploded")
            return {"generated_at": 1.0}
        feed = StatusFeed(fetch, INTERVAL)
        page = feed.subscribe()
        broken, fine = await bounded(page.next()), await bounded(page.next())
        await feed.close()
        closed = await bounded(page.next())
        return broken, fine, closed

    broken, fine, closed = asyncio.run(scenario())
    assert not broken.ok and "socket exploded" in broken.error
    assert fine.ok and closed is None


def test_feed_state_transitions_with_an_injected_clock():
    state = FeedState()
    update, note = state.silent("no answer", 10.0)
    assert (update.ok, update.since, update.status) == (False, 10.0, None) and note
    update, note = state.silent("no answer", 12.0)
    assert update.since == 10.0 and note is None
    update, note = state.answered({"generated_at": 13.0}, 13.0)
    assert update.ok and note == "dispatcher answering again silent_seconds=3.0"
    update, note = state.answered({"generated_at": 14.0}, 14.0)
    assert note is None and state.latest is update
