"""Workers on another machine, and nobody else on the sockets (issue 9).

Two network namespaces joined by a veth pair stand for two machines: the
"server" (dispatcher + disk-watcher, 10.213.0.1) and the "worker machine"
(10.213.0.2). The addresses are not loopback, so our rule applies for real:
CURVE or no bind. The namespaces are the test's own, so the fixed ports cannot
collide with anything else on this host (no free-port race). Both machines see
the same /tmp, as a worker would see the storage over NFS. Creating namespaces
needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); without it the test is skipped with
the reason (tests/unit/test_sockets.py covers the same rules in-process on
tcp://0.0.0.0). The keys and the config lines are the ones anime-keys prints.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shared import layout
from tests.system import BASE_CONFIG, REPO, System, render_toml, wait_for

SERVER_IP = "10.213.0.1"
REMOTE_IP = "10.213.0.2"
_names = itertools.count()

# A stranger on the worker machine: a plain ZeroMQ DEALER sending a well-formed
# worker.ready, and a raw TCP client sending text. Prints whatever comes back.
PROBE = r"""
import socket, sys, zmq
from shared.protocol import WorkerReady, encode
host, port = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.ROUTING_ID, b"plain/0")
dealer.connect(f"tcp://{host}:{port}")
dealer.send_multipart(encode(WorkerReady(worker_id="plain", session="0", seq=1)))
raw = socket.create_connection((host, port), timeout=20)
raw.sendall(b"".join(encode(WorkerReady(worker_id="raw", session="0", seq=1))) + b"\r\n" * 4)
try:
    while raw.recv(4096):
        pass
except ConnectionResetError:
    pass
print("raw: closed by the server", flush=True)
while True:
    if dealer.poll(100):
        print("plain: RECEIVED", dealer.recv_multipart(), flush=True)
"""

# The worker machine reaches the server: a refused connection is an answer.
REACH = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=5).close()
except ConnectionRefusedError:
    pass
"""


class Machines:
    """Two namespaces; ``server`` and ``remote`` are command prefixes."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}x{next(_names)}"
        self.server_ns, self.remote_ns = f"ad-s{tag}", f"ad-r{tag}"
        self.server = ["ip", "netns", "exec", self.server_ns]
        self.remote = ["ip", "netns", "exec", self.remote_ns]
        s_if, r_if = f"ads{tag}"[:15], f"adr{tag}"[:15]
        self.steps = [
            ["ip", "netns", "add", self.server_ns],
            ["ip", "netns", "add", self.remote_ns],
            ["ip", "link", "add", s_if, "type", "veth", "peer", "name", r_if],
            ["ip", "link", "set", s_if, "netns", self.server_ns],
            ["ip", "link", "set", r_if, "netns", self.remote_ns],
            ["ip", "-n", self.server_ns, "addr", "add", f"{SERVER_IP}/30", "dev", s_if],
            ["ip", "-n", self.remote_ns, "addr", "add", f"{REMOTE_IP}/30", "dev", r_if],
            ["ip", "-n", self.server_ns, "link", "set", s_if, "up"],
            ["ip", "-n", self.remote_ns, "link", "set", r_if, "up"],
            ["ip", "-n", self.server_ns, "link", "set", "lo", "up"],
            ["ip", "-n", self.remote_ns, "link", "set", "lo", "up"],
            [*self.remote, sys.executable, "-c", REACH, SERVER_IP],
        ]

    def create(self) -> str | None:
        """None when ready, else why not."""
        if shutil.which("ip") is None:
            return "iproute2's `ip` is not installed"
        for step in self.steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=20)
            if result.returncode != 0:
                return f"`{' '.join(step)}` failed: {result.stderr.strip()}"
        return None

    def delete(self) -> None:
        for ns in (self.server_ns, self.remote_ns):  # deleting a namespace drops its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture
def machines():
    m = Machines()
    why = m.create()
    if why:
        m.delete()
        pytest.skip(f"network namespaces are not permitted here, so no second machine: {why}")
    yield m
    m.delete()


def spawn_in(system: System, prefix: list[str], name: str, *args: str) -> subprocess.Popen:
    """Like System.spawn, inside a namespace, output to <root>/<name>.out."""
    with open(system.root / f"{name}.out", "wb") as out:
        proc = subprocess.Popen([*prefix, *system.command(*args)], cwd=system.root,
                                env=system.env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    system.processes.append(proc)
    return proc


def output(system: System, name: str) -> str:
    path = system.root / f"{name}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def printed_config(text: str) -> dict[str, dict]:
    """The [zmq] / [zmq.curve] lines anime-keys printed, as tables."""
    lines = [line for line in text.splitlines()
             if re.fullmatch(r"\[zmq(\.curve)?\]|\w+ = \".*\"", line)]
    parsed = tomllib.loads("\n".join(lines))
    return {"zmq": {k: v for k, v in parsed["zmq"].items() if k != "curve"},
            "zmq.curve": parsed["zmq"]["curve"]}


def keys(system: System, *args: str) -> str:
    result = system.run("anime-keys", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def worker_config(system: System, name: str, client_text: str, keys_dir: Path,
                  client: str) -> Path:
    """The worker machine's own installation: its own root_dir, the shared storage, the
    lines anime-keys printed, the two key files copied as it says."""
    home = system.root / name
    (home / "keys").mkdir(parents=True)
    shutil.copy(keys_dir / "clients" / f"{client}.key_secret", home / "keys")
    shutil.copy(keys_dir / "server.key", home / "keys")
    tables = {t: dict(v) for t, v in BASE_CONFIG.items()}
    tables["data"] = {"root_dir": "data", "storage_dir": str(system.storage)}
    tables.update(printed_config(client_text))
    path = home / "config.toml"
    path.write_text(render_toml(tables))
    return path


def test_a_worker_on_another_machine_downloads_and_strangers_get_nothing(make_system, machines):
    system = make_system()
    catalog = {"defaults": {"size": 4096, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Remote Show", [{"title": "Remote Show", "episodes": 4}])
    system.write_catalog(catalog)
    system.enqueue(4242, "Remote Show", [1, 2, 3], selected_index=1)

    # The server: keys and config lines from anime-keys.
    kdir = system.root / "keys"
    server_text = keys(system, "init", "--dir", str(kdir), "--address", SERVER_IP)
    tables = {t: dict(v) for t, v in BASE_CONFIG.items()}
    tables.update(printed_config(server_text))
    assert tables["zmq"] == {"dispatcher": f"tcp://{SERVER_IP}:5555",
                             "disk_state": f"tcp://{SERVER_IP}:5556"}
    system.config_path.write_text(render_toml(tables))
    r1_cfg = worker_config(system, "r1", keys(system, "client", "--dir", str(kdir), "--name", "r1",
                                              "--address", SERVER_IP), kdir, "r1")
    # A stranger with a well-formed key pair the server never authorised.
    other = system.root / "other-keys"
    keys(system, "init", "--dir", str(other))
    x1_text = keys(system, "client", "--dir", str(other), "--name", "x1", "--address", SERVER_IP)
    x1_cfg = worker_config(system, "x1", x1_text, other, "x1")
    shutil.copy(kdir / "server.key", system.root / "x1" / "keys")  # it knows our server key
    # A worker with no keys at all.
    nokey_cfg = system.root / "nokey.toml"
    nokey_cfg.write_text(render_toml({**BASE_CONFIG,
                                      "data": {"root_dir": "nokey", "storage_dir": "storage"},
                                      "zmq": printed_config(x1_text)["zmq"]}))

    cfg = str(system.config_path)
    spawn_in(system, machines.server, "disk-watcher", "anime-disk-watcher", "-c", cfg)
    spawn_in(system, machines.server, "dispatcher", "anime-dispatcher", "-c", cfg)
    wait_for(lambda: "disk-watcher started" in output(system, "disk-watcher"), 15,
             "the disk-watcher to start")
    wait_for(lambda: "dispatcher started" in output(system, "dispatcher"), 15,
             "the dispatcher to start")

    # Strangers first: none of them may take a job.
    nokey = subprocess.run(
        [*machines.remote, *system.command("anime-worker", "-c", str(nokey_cfg),
                                           "--worker-id", "n1")],
        cwd=system.root, env=system.env(), capture_output=True, text=True, timeout=30)
    assert nokey.returncode == 2, nokey.stderr
    assert "Traceback" not in nokey.stderr
    assert nokey.stderr.splitlines()[-1] == (
        f"anime-worker: {nokey_cfg}: [zmq] dispatcher: tcp://{SERVER_IP}:5555 is not a loopback "
        "address, so it needs CURVE; set [zmq.curve] client_secret_key and server_public_key "
        "(anime-keys client prints them)")
    spawn_in(system, machines.remote, "x1", "anime-worker", "-c", str(x1_cfg), "--worker-id", "x1")
    with open(system.root / "probe.out", "wb") as out:
        system.processes.append(subprocess.Popen(
            [*machines.remote, sys.executable, "-c", PROBE, SERVER_IP, "5555"], cwd=REPO,
            env=system.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def refused(program: str, *parts: str) -> bool:
        return any(all(p in line for p in parts) and "WARNING" in line
                   for line in output(system, program).splitlines())

    unknown = ("refused client endpoint=dispatcher", f"address={REMOTE_IP}", "unknown key")
    wait_for(lambda: refused("dispatcher", *unknown), 15, "the dispatcher to log x1's refusal")
    wait_for(lambda: refused("disk-watcher", "refused client endpoint=disk_state",
                             f"address={REMOTE_IP}", "unknown key"), 15,
             "the disk-watcher to log x1's refusal")
    # libzmq gives no address for a client without CURVE; which side sees the mechanism
    # mismatch first is a race, so the reason is "no CURVE key" or "handshake failed".
    wait_for(lambda: refused("dispatcher", "refused client endpoint=dispatcher address=unknown"),
             15, "the dispatcher to log the plain-text client's refusal")
    wait_for(lambda: "raw: closed by the server" in output(system, "probe"), 15,
             "the server to hang up on the raw text client")
    wait_for(lambda: refused("x1", "the server refused this connection", "authentication refused"),
             15, "x1 to log that the server refused it")
    assert system.stages() == {"queued": 3}
    assert system.sim_runs() == []

    # The authorised worker on the other machine does the work.
    spawn_in(system, machines.remote, "r1", "anime-worker", "-c", str(r1_cfg), "--worker-id", "r1")
    wait_for(lambda: system.stages() == {"downloaded": 3}, 30, "r1 to download all three episodes")
    for job in system.jobs():
        expected = layout.episode_path(system.storage, 4242, job["episode"], ".mp4")
        assert job["video_path"] == str(expected), job
        assert expected.stat().st_size == job["video_size_bytes"] == 4096
        assert job["lease_owner"] is None and job["retry_count"] == 0
    assert len(system.sim_runs()) == 3  # ani-cli ran only for r1, once per episode
    wait_for(lambda: system.private_dirs() == [], 10, "the private directories to go")
    dispatcher_log = output(system, "dispatcher")
    assert "worker connected worker_id=r1" in dispatcher_log
    assert "worker_id=x1" not in dispatcher_log and "worker_id=plain" not in dispatcher_log
    assert "worker_id=raw" not in dispatcher_log
    assert "RECEIVED" not in output(system, "probe")
    assert "Traceback" not in dispatcher_log + output(system, "disk-watcher")


@pytest.mark.parametrize("program, key", [("anime-dispatcher", "dispatcher"),
                                          ("anime-disk-watcher", "disk_state")])
def test_a_non_loopback_bind_without_keys_is_refused_at_start(make_system, program, key):
    """No namespace needed: the bind is refused before anything listens."""
    endpoint = "tcp://192.0.2.10:5555"  # TEST-NET-1: never ours, never bound
    system = make_system({"zmq": {key: endpoint}})
    system.enqueue(1, "Show", [1])
    result = system.run(program, "-c", str(system.config_path), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"{program}: {system.config_path}: [zmq] {key}: {endpoint} is reachable from other "
        "hosts; set [zmq.curve] server_secret_key and authorized_keys_dir (anime-keys creates "
        "them) or bind to 127.0.0.1 / ipc://")
    assert "Traceback" not in result.stderr
    assert system.stages() == {"queued": 1}
