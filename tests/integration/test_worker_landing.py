"""A worker asks for its next job right behind a landing, without waiting for the ack,
and re-sends the landing until it is acked, while the next job runs: one exchange
fewer per job, and still no landing the dispatcher could miss.

The dispatcher here is scripted by the test (a real ROUTER and PUB on the worker's
configured endpoints); the worker and the simulated ani-cli are the real programs.
"""

from __future__ import annotations

import time
from typing import Callable

import zmq

from shared.config import load_config
from shared.protocol import (JobAck, JobAssign, JobCommit, JobFinished, JobLanded, Message,
                             WorkerReady, decode, encode)
from tests.system import running_state


class ScriptedDispatcher:
    def __init__(self, ctx: zmq.Context, config_path) -> None:
        config = load_config(config_path)
        zc = config.zmq
        config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.router = ctx.socket(zmq.ROUTER)
        self.pub = ctx.socket(zmq.PUB)
        for sock, endpoint in ((self.router, zc.dispatcher), (self.pub, zc.disk_state)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(endpoint)
        self.identity = b""
        self.received: list[Message] = []

    def next(self, until: Callable[[Message], bool], timeout: float = 20) -> Message:
        """Publish a running disk state now and then; return the first message from the
        worker that matches (all are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pub.send_multipart(encode(running_state()))
            if self.router.poll(200):  # sync-ok: bounded wait for the worker's next message
                self.identity, *frames = self.router.recv_multipart()
                msg = decode(frames)
                self.received.append(msg)
                if until(msg):
                    return msg
        raise AssertionError(f"no matching message; got {[m.KIND for m in self.received]}")

    def send(self, msg: Message) -> None:
        self.router.send_multipart([self.identity] + encode(msg))

    def assign(self, job_id: int, episode: int) -> None:
        self.send(JobAssign(job_id=job_id, attempt=1, anime_id=1, anime_title="Show",
                            episode=episode, selected_index=1, selected_title="Show (site)",
                            confidence="high", lease_seconds=30.0, rate_limit_bps=0))


def landing_of(job_id: int) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, JobLanded) and m.job_id == job_id


def test_the_worker_asks_for_more_behind_a_landing_and_resends_it_until_acked(make_system):
    system = make_system()
    catalog = {"defaults": {"size": 3000, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Show", [{"title": "Show (site)", "episodes": 3,
                                        "episode_behaviour": {"2": {"duration": 3.0}}}])
    system.write_catalog(catalog)
    ctx = zmq.Context()
    try:
        d = ScriptedDispatcher(ctx, system.config_path)
        system.spawn("anime-worker", "-c", str(system.config_path), "--worker-id", "w01")
        first_ready = d.next(lambda m: isinstance(m, WorkerReady))
        d.assign(1, episode=1)
        finished = d.next(lambda m: isinstance(m, JobFinished))
        target = system.storage / "videos" / "1" / "episodes" / f"ep001{finished.ext}"
        d.send(JobCommit(job_id=1, attempt=1, video_path=str(target)))
        d.next(landing_of(1))
        # No ack yet: the worker is already idle and asks for the next job.
        d.next(lambda m: isinstance(m, WorkerReady) and m.seq > first_ready.seq)
        assert target.stat().st_size == 3000
        assert not (system.storage / ".in_progress" / "job-1").exists()
        d.assign(2, episode=2)  # a 3 s download
        d.next(landing_of(1))  # re-sent while job 2 runs
        d.send(JobAck(job_id=1, attempt=1))
        acked_at = len(d.received)
        finished = d.next(lambda m: isinstance(m, JobFinished) and m.job_id == 2)
        after_ack = d.received[acked_at:]
        assert not any(landing_of(1)(m) for m in after_ack), \
            f"landing of job 1 re-sent after its ack: {[m.KIND for m in after_ack]}"
        assert len([m for m in d.received if landing_of(1)(m)]) >= 2
        # Settle job 2 too, so the worker stops at once (it waits for answers, not lost).
        d.send(JobCommit(job_id=2, attempt=1, video_path=str(target.with_name(
            f"ep002{finished.ext}"))))
        d.next(landing_of(2))
        d.send(JobAck(job_id=2, attempt=1))
        d.next(lambda m: isinstance(m, WorkerReady) and m.seq > first_ready.seq + 1)
    finally:
        ctx.destroy(linger=0)
