"""A worker that cannot reach its dispatcher waits cheaply (it runs for days)."""

from __future__ import annotations

import time

import psutil
import zmq

from shared.config import load_config
from shared.protocol import DiskStateMsg, DiskUsageMsg, decode
from tests.system import wait_for


def test_a_worker_without_its_dispatcher_does_not_spin(make_system):
    system = make_system()
    system.spawn("anime-disk-watcher", "-c", str(system.config_path))
    worker = system.spawn("anime-worker", "-c", str(system.config_path), "--worker-id", "w01")
    wait_for(lambda: "disk state" in system.output(worker), 20, "the worker to hear the disk state")
    # It now asks for work and nobody answers: measure its CPU over two seconds.
    used = psutil.Process(worker.pid).cpu_times()
    psutil.Process(worker.pid).cpu_percent(interval=2.0)
    after = psutil.Process(worker.pid).cpu_times()
    cpu = (after.user + after.system) - (used.user + used.system)
    assert cpu < 0.2, f"an idle worker used {cpu:.2f} s of CPU in 2 s"



def _receive(sock: zmq.Socket, count: int, timeout: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(left * 1000):
            raise AssertionError(f"only {len(got)} of {count} messages within {timeout:g} s")
        got.append(decode(sock.recv_multipart()))
    return got


def _queued(sock: zmq.Socket) -> list:
    got = []
    while sock.poll(0):
        got.append(decode(sock.recv_multipart()))
    return got


def test_while_downloading_workers_hear_the_disk_once_a_second_the_dispatcher_every_measure(
        make_system):
    """Re-measures run five times a second while files grow in .in_progress near a
    threshold (here 0.5 GB of headroom: 4 s of a gigabit link); only the dispatcher needs
    each one (disk.usage). The workers' topic, disk.state, comes about once a second, so
    five workers do not wake 25 times a second for the disk."""
    system = make_system({"disk_management": {"hard_limit_gb": 1.0, "pause_threshold_gb": 0.5,
                                              "resume_threshold_gb": 0.4, "min_free_gb": 0}})
    (system.storage / ".in_progress" / "job-1" / "dl").mkdir(parents=True)  # a download runs
    endpoint = load_config(system.config_path).zmq.disk_state
    ctx = zmq.Context()
    try:
        state_sub, usage_sub = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
        for sock, kind in ((state_sub, DiskStateMsg.KIND), (usage_sub, DiskUsageMsg.KIND)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, kind.encode())
            sock.connect(endpoint)
        system.spawn("anime-disk-watcher", "-c", str(system.config_path))
        usage = _receive(usage_sub, 12)
        states = _queued(state_sub)
    finally:
        ctx.destroy(linger=0)
    assert states and all(type(m) is DiskStateMsg for m in states)
    assert all(type(m) is DiskUsageMsg for m in usage)
    first, last = usage[0].published_at, usage[-1].published_at
    in_window = [m for m in states if first <= m.published_at <= last]
    assert len(in_window) <= (last - first) / 0.9 + 1, \
        f"{len(in_window)} disk.state publications in {last - first:.2f} s"
    seqs = [m.seq for m in usage + states]
    assert len(set(seqs)) == len(seqs), "a measurement went out on both topics"
