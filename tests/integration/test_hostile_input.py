"""Garbage on every socket: each process logs it, drops it and keeps serving.

For each socket a process binds (the dispatcher's worker ROUTER and status
ROUTER, the disk-watcher's PULL and XPUB) and each socket a process connects
(the dispatcher's and the worker's disk-state SUB, the worker's DEALER), the
test sends garbage bytes, a valid frame of an unknown kind, known kinds with
missing or wrong-typed fields, and oversized messages, then proves the process
still does its job.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from shared.config import load_config
from shared.protocol import (MAX_MESSAGE_BYTES, DiskStateMsg, JobAck, JobAssign, JobCommit,
                             JobFinished, JobHeartbeat, JobLanded, StatusReply, StatusRequest,
                             WorkerReady, decode, encode)
from tests.system import System, running_state, wait_for

pytestmark = pytest.mark.slow
TIMEOUT_MS = 10_000


def pack(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def hostile(valid_kind: str) -> list[list[bytes]]:
    """Every kind of bad message, aimed at a socket that serves ``valid_kind``."""
    return [
        [b"\x00\xff\xfegarbage"],
        [b"garbage", b"\xc1\xc1\xc1"],
        [b"", b""],
        [b"a", b"b", b"c", b"d"],
        [b"no.such.kind", pack({"v": 1})],
        [b"\xff\xfe", pack({"v": 1})],
        [valid_kind.encode(), pack({"v": 1, "unexpected": 1})],
        [valid_kind.encode(), pack({"v": 99})],
        [valid_kind.encode(), pack([1, 2, 3])],
        [b"worker.ready", pack({"v": 1, "worker_id": "w"})],  # missing fields
        [b"worker.ready", pack({"v": 1, "worker_id": 5, "session": [], "seq": "x"})],
        [b"job.heartbeat", pack({"v": 1, "worker_id": "w", "session": "s", "job_id": "1",
                                 "attempt": 1.5, "bytes": None})],
        [b"disk.measure", pack({"v": 1, "reason": 7})],
        [b"disk.state", pack({"v": 1, "seq": "one", "state": 3})],
        [b"status.request", b"x" * (MAX_MESSAGE_BYTES + 100)],  # parsed and refused
        [valid_kind.encode(), b"x" * (MAX_MESSAGE_BYTES + 64_000)],  # libzmq drops the peer
    ]


class Net:
    """Test-side sockets, all closed with linger 0."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int, endpoint: str, bind: bool = False, **options: object) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
        sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        if bind and endpoint.startswith("ipc://"):
            Path(endpoint[len("ipc://"):]).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        (sock.bind if bind else sock.connect)(endpoint)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def net():
    n = Net()
    yield n
    n.close()


def spawn(system: System, program: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    proc = system.spawn(program, "-c", str(system.config_path), *args)
    return proc, system.lines(proc)


def logged(out: list[str], text: str) -> int:
    return sum(text in line for line in list(out))


def status(net: Net, endpoint: str) -> dict:
    req = net.socket(zmq.REQ, endpoint)
    req.send_multipart(encode(StatusRequest()))
    reply = decode(req.recv_multipart())
    assert isinstance(reply, StatusReply)
    return reply.status


def next_disk_state(net: Net, endpoint: str) -> DiskStateMsg:
    sub = net.socket(zmq.SUB, endpoint, SUBSCRIBE=b"disk.state")
    msg = decode(sub.recv_multipart())
    assert isinstance(msg, DiskStateMsg)
    return msg


HUGE_SUBSCRIBER = """
import sys, zmq
ctx = zmq.Context()
xsub = ctx.socket(zmq.XSUB)
xsub.connect(sys.argv[1])
xsub.send(b"\\x01" + b"s" * int(sys.argv[2]))  # a subscription just under the size limit
xsub.send(b"\\x01" + b"t" * 10)
xsub.setsockopt(zmq.RCVTIMEO, 10000)
xsub.send(b"\\x01")
print(xsub.recv_multipart()[0].decode())  # the XPUB took our subscriptions: it publishes to us
"""


def huge_subscription_then_leave(endpoint: str) -> None:
    """Subscribe with a topic as large as MAXMSGSIZE lets through, then disconnect:
    the XPUB drops the subscription (libzmq's trie removal recurses per byte). In a
    child process, as libzmq may crash the subscriber's side too."""
    child = subprocess.run([sys.executable, "-c", HUGE_SUBSCRIBER, endpoint,
                            str(MAX_MESSAGE_BYTES + 1000)], timeout=30, capture_output=True,
                           text=True)
    assert child.stdout.startswith("disk.state"), child.stderr[-2000:]


def one_job_system(make_system) -> System:
    system = make_system()
    catalog = {"defaults": {"size": 3000, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Show", [{"title": "Show (site)", "episodes": 3}])
    system.write_catalog(catalog)
    system.enqueue(1, "Show", [1, 2, 3], selected_index=1)
    return system


def test_the_dispatcher_and_the_disk_watcher_survive_garbage(make_system, net: Net) -> None:
    system = one_job_system(make_system)
    zc = load_config(system.config_path).zmq
    watcher, watcher_out = spawn(system, "anime-disk-watcher")
    first_state = next_disk_state(net, zc.disk_state)
    dispatcher, dispatcher_out = spawn(system, "anime-dispatcher")
    # the first pass over the queue runs on its own thread: counted_at says it is in
    queue = wait_for(lambda: (q := status(net, zc.status)["queue"])["counted_at"] and q, 10,
                     "the dispatcher's first count of the queue")
    assert queue["queued"] == 3

    # the dispatcher's worker ROUTER, from a DEALER; then a valid message with an
    # identity that is not text (a ROUTER makes up such identities itself)
    for n, frames in enumerate(hostile("worker.ready")):
        dealer = net.socket(zmq.DEALER, zc.dispatcher, ROUTING_ID=f"evil{n}/x".encode())
        dealer.send_multipart(frames)
    binary = net.socket(zmq.DEALER, zc.dispatcher, ROUTING_ID=b"\xff\xfe\x00/\x80")
    for seq in range(3):
        binary.send_multipart(encode(WorkerReady(worker_id="evil", session="x", seq=seq)))
    wrong_side = net.socket(zmq.DEALER, zc.dispatcher, ROUTING_ID=b"evil-assign/x")
    wrong_side.send_multipart(encode(JobAssign(
        job_id=1, attempt=1, anime_id=1, anime_title="t", episode=1, selected_index=1,
        selected_title="t", confidence="high", lease_seconds=5.0, rate_limit_bps=0)))
    stray = net.socket(zmq.DEALER, zc.dispatcher, ROUTING_ID=b"evil-stray/x")
    stray.send_multipart(encode(JobHeartbeat(worker_id="evil-stray", session="x", job_id=999,
                                             attempt=1, bytes=1)))
    stray.send_multipart(encode(JobFinished(worker_id="evil-stray", session="x", job_id=2,
                                            attempt=7, ext=".mp4", size_bytes=1)))
    cancels = [decode(stray.recv_multipart()) for _ in range(2)]
    assert [m.KIND for m in cancels] == ["job.cancel", "job.cancel"]

    # the status ROUTER, from DEALERs (no REQ envelope) and a REQ
    for frames in hostile("status.request"):
        net.socket(zmq.DEALER, zc.status).send_multipart(frames)
    # the disk-watcher's PULL
    for frames in hostile("disk.measure"):
        net.socket(zmq.PUSH, zc.disk_control).send_multipart(frames)
    # the disk-watcher's XPUB takes subscriptions; an XSUB can send it anything
    xsub = net.socket(zmq.XSUB, zc.disk_state)
    for frames in hostile("disk.state") + [[b"\x02junk"], [b"\x00"], [b"\x01"]]:
        xsub.send_multipart(frames)
    huge_subscription_then_leave(zc.disk_state)

    wait_for(lambda: logged(dispatcher_out, "dropped malformed message") >= 20, 15,
             "the dispatcher to log the malformed messages")
    wait_for(lambda: logged(watcher_out, "dropped malformed message") >= 10, 15,
             "the disk-watcher to log the malformed messages")
    # still serving: status answered, a fresh disk state, workers get and finish jobs
    assert dispatcher.poll() is None and watcher.poll() is None
    assert status(net, zc.status)["queue"]["queued"] == 3
    later = next_disk_state(net, zc.disk_state)
    assert later.seq > first_state.seq
    worker, _ = spawn(system, "anime-worker", "--worker-id", "w01")
    try:
        wait_for(lambda: system.stages() == {"downloaded": 3}, 30, "the jobs to be downloaded")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {system.stages()}\n{''.join(dispatcher_out)[-4000:]}") from None
    assert dispatcher.poll() is None and watcher.poll() is None and worker.poll() is None
    wait_for(lambda: status(net, zc.status)["queue"]["downloaded"] == 3, 10, "status to count 3")
    assert "Traceback" not in "".join(dispatcher_out) + "".join(watcher_out)


def publish_garbage_then_state(pub: zmq.Socket, seq: int) -> None:
    for frames in hostile("disk.state"):
        pub.send_multipart(frames)
    pub.send_multipart([b"disk.state", b"\xc1"])
    pub.send_multipart([b"disk.state", pack({"v": 1, "seq": 1})])
    pub.send_multipart(encode(running_state(seq)))


def test_the_disk_state_subscribers_survive_garbage(make_system, net: Net) -> None:
    """A fake disk-watcher publishes garbage between valid states: the dispatcher's and
    the worker's SUB sockets drop it and the jobs are downloaded."""
    system = one_job_system(make_system)
    zc = load_config(system.config_path).zmq
    pub = net.socket(zmq.XPUB, zc.disk_state, bind=True)
    dispatcher, dispatcher_out = spawn(system, "anime-dispatcher")
    worker, worker_out = spawn(system, "anime-worker", "--worker-id", "w01")
    seq = 0
    deadline = time.monotonic() + 30
    while system.stages() != {"downloaded": 3}:
        assert time.monotonic() < deadline, f"jobs not done: {system.stages()}"
        seq += 1
        publish_garbage_then_state(pub, seq)
        pub.poll(200)  # sync-ok: the publisher's own pace (a disk-watcher publishes every second)
        try:
            while True:
                pub.recv(zmq.NOBLOCK)  # subscriptions
        except zmq.Again:
            pass
    assert dispatcher.poll() is None and worker.poll() is None
    assert logged(dispatcher_out, "dropped malformed message") >= 10
    assert logged(worker_out, "dropped malformed message") >= 10


def test_the_worker_survives_garbage_from_its_dispatcher(make_system, net: Net) -> None:
    """A fake dispatcher sends the worker garbage, then a real job: it is downloaded,
    committed and landed."""
    system = one_job_system(make_system)
    zc = load_config(system.config_path).zmq
    router = net.socket(zmq.ROUTER, zc.dispatcher, bind=True, ROUTER_HANDOVER=1)
    pub = net.socket(zmq.PUB, zc.disk_state, bind=True)
    worker, worker_out = spawn(system, "anime-worker", "--worker-id", "w01")
    received: list = []

    def serve(until) -> object:
        """Publish a running state and collect the worker's messages until one matches."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pub.send_multipart(encode(running_state(1)))
            if router.poll(200):  # sync-ok: bounded wait for the worker's next message
                identity, *frames = router.recv_multipart()
                msg = decode(frames)
                received.append(msg)
                if until(msg):
                    return identity, msg
        raise AssertionError(f"no matching message; got {[m.KIND for m in received]}; "
                             f"worker: {''.join(worker_out)[-3000:]}")

    identity, _ = serve(lambda m: isinstance(m, WorkerReady))
    for frames in hostile("job.assign"):
        router.send_multipart([identity] + frames)
    router.send_multipart([identity] + encode(JobCommit(job_id=5, attempt=1, video_path="/etc/x")))
    router.send_multipart([identity] + encode(JobAck(job_id=5, attempt=1)))
    wait_for(lambda: logged(worker_out, "dropped malformed message") >= 10, 15,
             "the worker to log the malformed messages")
    identity, ready = serve(lambda m: isinstance(m, WorkerReady))
    router.send_multipart([identity] + encode(JobAssign(
        job_id=1, attempt=1, anime_id=1, anime_title="Show", episode=2, selected_index=1,
        selected_title="Show (site)", confidence="high", lease_seconds=6.0, rate_limit_bps=0)))
    identity, finished = serve(lambda m: isinstance(m, JobFinished))
    target = system.storage / "videos" / "1" / "episodes" / f"ep002{finished.ext}"
    router.send_multipart([identity] + encode(JobCommit(job_id=1, attempt=1,
                                                        video_path=str(target))))
    identity, landed = serve(lambda m: isinstance(m, JobLanded))
    assert landed.video_path == str(target) and target.stat().st_size == 3000
    router.send_multipart([identity] + encode(JobAck(job_id=1, attempt=1)))
    serve(lambda m: isinstance(m, WorkerReady) and m.seq > ready.seq)
    assert worker.poll() is None
    assert not (system.storage / ".in_progress" / "job-1").exists()
