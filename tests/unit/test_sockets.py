"""The socket rules: local by default, CURVE for anything reachable from another host.

In-process, real ZeroMQ sockets. The CURVE cases bind ``tcp://0.0.0.0`` (not a
loopback address, so our rule applies) on a port the OS picks, and the clients
connect to ``tcp://0.0.0.0:PORT``, which Linux routes to this host.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import zmq

from services import keys as anime_keys
from shared.config import IPC_PATH_MAX, ConfigError, parse_config
from shared.logfmt import kv
from shared.sockets import Sockets, is_local_endpoint
from tests.system import BASE_CONFIG, BIN, wait_for


def make_config(tmp: Path, zmq_table: dict | None = None, curve: dict | None = None,
                root: str = "data"):
    raw = {table: dict(values) for table, values in BASE_CONFIG.items()}
    raw["data"] = {"root_dir": root, "storage_dir": "storage"}
    if zmq_table or curve:
        raw["zmq"] = dict(zmq_table or {})
        if curve:
            raw["zmq"]["curve"] = {k: str(v) for k, v in curve.items()}
    return parse_config(tmp / "config.toml", raw)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keys(tmp_path):
    """A server key dir with one authorised client 'w1', and a stranger's pair."""
    kdir = tmp_path / "keys"
    anime_keys.init(kdir, "SERVER_ADDRESS")
    anime_keys.client(kdir, "w1", "SERVER_ADDRESS", "keys")
    other = tmp_path / "other-keys"  # another installation: its client is unknown to us
    anime_keys.init(other, "SERVER_ADDRESS")
    anime_keys.client(other, "stranger", "SERVER_ADDRESS", "keys")
    return kdir, other


@pytest.fixture
def opened():
    """Sockets objects closed at the end whatever happens."""
    made: list[Sockets] = []

    def make(config) -> Sockets:
        sockets = Sockets(config)
        made.append(sockets)
        return sockets

    yield make
    for sockets in made:
        sockets.close()


# --- the loopback rule ------------------------------------------------------------


@pytest.mark.parametrize("endpoint, local", [
    ("ipc:///tmp/x.sock", True),
    ("tcp://127.0.0.1:5555", True),
    ("tcp://127.0.0.2:5555", True),
    ("tcp://localhost:5555", True),
    ("tcp://[::1]:5555", True),
    ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False),
    ("tcp://10.0.0.1:5555", False),
    ("tcp://[::]:5555", False),
    ("tcp://eth0:5555", False),
    ("tcp://server.lan:5555", False),
])
def test_only_ipc_and_loopback_count_as_local(endpoint, local):
    assert is_local_endpoint(endpoint) is local


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("host", ["0.0.0.0", "*"])
def test_non_loopback_bind_without_keys_is_refused_before_binding(tmp_path, opened, host):
    port = free_port()
    endpoint = f"tcp://{host}:{port}"
    config = make_config(tmp_path, {"dispatcher": endpoint})
    with pytest.raises(ConfigError) as err:
        opened(config).bind(zmq.ROUTER, config.zmq.dispatcher, "dispatcher")
    assert str(err.value) == (
        f"{tmp_path / 'config.toml'}: [zmq] dispatcher: {endpoint} is reachable from other "
        "hosts; set [zmq.curve] server_secret_key and authorized_keys_dir (anime-keys creates "
        "them) or bind to 127.0.0.1 / ipc://")
    with socket.socket() as s:  # nothing listens there
        s.bind(("0.0.0.0", port))


def test_server_key_without_authorized_dir_is_refused(tmp_path, keys, opened):
    kdir, _ = keys
    config = make_config(tmp_path, {"dispatcher": "tcp://0.0.0.0:*"},
                         {"server_secret_key": kdir / "server.key_secret"})
    with pytest.raises(ConfigError, match=r"set \[zmq.curve\] server_secret_key and "
                                          "authorized_keys_dir"):
        opened(config).bind(zmq.ROUTER, config.zmq.dispatcher, "dispatcher")
    config = make_config(tmp_path, {"dispatcher": "tcp://0.0.0.0:*"},
                         {"server_secret_key": kdir / "server.key_secret",
                          "authorized_keys_dir": kdir / "missing"})
    with pytest.raises(ConfigError, match=r"\[zmq.curve\] authorized_keys_dir: .*missing is not "
                                          "a directory of client public keys"):
        opened(config).bind(zmq.ROUTER, config.zmq.dispatcher, "dispatcher")


@pytest.mark.parametrize("secret_file, problem", [
    ("server.key", "holds only a public key; give the .key_secret file"),
    ("nothing.key_secret", "cannot read a CURVE key from"),
    ("authorized", "cannot read a CURVE key from"),
])
def test_unusable_server_key_file_is_named(tmp_path, keys, opened, secret_file, problem):
    kdir, _ = keys
    config = make_config(tmp_path, {"dispatcher": "tcp://0.0.0.0:*"},
                         {"server_secret_key": kdir / secret_file,
                          "authorized_keys_dir": kdir / "authorized"})
    with pytest.raises(ConfigError) as err:
        opened(config).bind(zmq.ROUTER, config.zmq.dispatcher, "dispatcher")
    assert "[zmq.curve] server_secret_key: " in str(err.value)
    assert problem in str(err.value)


def test_non_loopback_connect_without_keys_is_refused(tmp_path, opened):
    config = make_config(tmp_path, {"dispatcher": "tcp://10.1.2.3:5555"})
    with pytest.raises(ConfigError) as err:
        opened(config).connect(zmq.DEALER, config.zmq.dispatcher)
    assert str(err.value) == (
        f"{tmp_path / 'config.toml'}: [zmq] dispatcher: tcp://10.1.2.3:5555 is not a loopback "
        "address, so it needs CURVE; set [zmq.curve] client_secret_key and server_public_key "
        "(anime-keys client prints them)")
    config = make_config(tmp_path, {"dispatcher": "tcp://10.1.2.3:5555"},
                         {"client_secret_key": tmp_path / "keys-nowhere"})
    with pytest.raises(ConfigError, match=r"\[zmq.curve\] client_secret_key: cannot read a "
                                          "CURVE key from .*keys-nowhere"):
        opened(config).connect(zmq.DEALER, config.zmq.dispatcher)


# --- ipc paths and the run directory ----------------------------------------------


def test_ipc_path_longer_than_the_system_allows_is_refused_naming_it(tmp_path):
    # <tmp>/<root>/run/disk-control.sock (the longest default): exactly IPC_PATH_MAX
    # bytes, then one more.
    fixed = len(str(tmp_path).encode()) + len("/") + len("/run/disk-control.sock")
    fits = "r" * (IPC_PATH_MAX - fixed)
    config = make_config(tmp_path, root=fits)
    assert len(config.zmq.disk_control[len("ipc://"):].encode()) == IPC_PATH_MAX
    too_long = fits + "r"
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, root=too_long)
    path = tmp_path / too_long / "run" / "disk-control.sock"
    assert str(err.value) == (
        f"{tmp_path / 'config.toml'}: [zmq] disk_control: ipc path {path} is {IPC_PATH_MAX + 1} "
        f"bytes, longer than the {IPC_PATH_MAX} the system allows; use a shorter root_dir or a "
        "tcp://127.0.0.1:PORT endpoint")


def test_explicit_long_ipc_endpoint_is_refused_too(tmp_path):
    endpoint = "ipc:///tmp/" + "x" * IPC_PATH_MAX + ".sock"
    with pytest.raises(ConfigError, match=r"\[zmq\] status: ipc path /tmp/x+\.sock is \d+ bytes"):
        make_config(tmp_path, {"status": endpoint})


def test_default_endpoints_are_ipc_in_a_0700_run_dir(tmp_path, opened):
    config = make_config(tmp_path)
    run = tmp_path / "data" / "run"
    assert config.zmq.dispatcher == f"ipc://{run}/dispatcher.sock"
    assert all(getattr(config.zmq, k).startswith(f"ipc://{run}/")
               for k in ("dispatcher", "status", "disk_state", "disk_control"))
    run.mkdir(parents=True, mode=0o755)
    os.chmod(run, 0o755)  # made by someone else with a loose mode: tightened at bind
    sockets = opened(config)
    sockets.bind(zmq.ROUTER, config.zmq.dispatcher, "dispatcher")
    assert mode(run) == 0o700
    assert stat.S_ISSOCK((run / "dispatcher.sock").stat().st_mode)


def test_a_new_ipc_directory_is_0700_and_a_users_own_directory_is_left_alone(tmp_path, opened):
    shared_dir = tmp_path / "shared"
    shared_dir.mkdir()
    os.chmod(shared_dir, 0o755)
    new_dir = tmp_path / "fresh" / "sockets"
    config = make_config(tmp_path, {"status": f"ipc://{shared_dir}/status.sock",
                                    "disk_state": f"ipc://{new_dir}/disk.sock"})
    sockets = opened(config)
    sockets.bind(zmq.ROUTER, config.zmq.status, "status")
    sockets.bind(zmq.XPUB, config.zmq.disk_state, "disk_state")
    assert mode(shared_dir) == 0o755
    assert mode(new_dir) == 0o700


def test_loopback_and_ipc_stay_plain_even_with_server_keys(tmp_path, keys, opened):
    """So local tools such as anime-status need no keys on the server."""
    kdir, _ = keys
    config = make_config(tmp_path, {"status": "tcp://127.0.0.1:*"},
                         {"server_secret_key": kdir / "server.key_secret",
                          "authorized_keys_dir": kdir / "authorized"})
    sockets = opened(config)
    server = sockets.bind(zmq.ROUTER, config.zmq.status, "status")
    assert server.curve_server == 0
    client = opened(make_config(tmp_path)).connect(zmq.DEALER, server.last_endpoint.decode())
    client.send(b"ping")
    assert server.poll(5000) and server.recv_multipart()[1] == b"ping"


# --- CURVE: who gets in -----------------------------------------------------------


def curve_configs(tmp_path: Path, kdir: Path, other: Path):
    server = make_config(tmp_path, {"dispatcher": "tcp://0.0.0.0:*"},
                         {"server_secret_key": kdir / "server.key_secret",
                          "authorized_keys_dir": kdir / "authorized"})

    def client(secret: Path, server_public: Path = kdir / "server.key"):
        return make_config(tmp_path, None, {"client_secret_key": secret,
                                            "server_public_key": server_public})

    return server, client


def records(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def test_authorised_client_talks_unknown_and_plain_clients_are_refused_and_logged(
        tmp_path, keys, opened, caplog):
    kdir, other = keys
    server_config, client = curve_configs(tmp_path, kdir, other)
    server_sockets = opened(server_config)
    router = server_sockets.bind(zmq.ROUTER, "tcp://0.0.0.0:*", "dispatcher")
    endpoint = router.last_endpoint.decode()
    assert endpoint.startswith("tcp://0.0.0.0:")

    # An authorised key: both ways.
    good = opened(client(kdir / "clients" / "w1.key_secret")).connect(
        zmq.DEALER, endpoint, identity=b"w1/s")
    good.send(b"hello")
    assert router.poll(5000), "the authorised client's message never arrived"
    assert router.recv_multipart() == [b"w1/s", b"hello"]
    router.send_multipart([b"w1/s", b"job"])
    assert good.poll(5000) and good.recv() == b"job"

    # A key the server does not know: refused at the handshake, logged with the address.
    stranger_public = (other / "clients" / "stranger.key").read_text().split('public-key = "')[1][:40]
    bad = opened(client(other / "clients" / "stranger.key_secret")).connect(
        zmq.DEALER, endpoint, identity=b"x/s")
    bad.send(b"let me in")
    line = wait_for(lambda: records(caplog, 'reason="unknown key'), 5, "the unknown key refusal")
    assert line[0] == kv("refused client", endpoint="dispatcher", address="127.0.0.1",
                         reason="unknown key (not in authorized_keys_dir)",
                         client_key=stranger_public)  # z85 may need quoting
    wait_for(lambda: records(caplog, "the server refused this connection endpoint="), 5,
             "the refused client to log it on its side")

    # No key at all (a plain ZeroMQ peer): refused, logged; libzmq gives no address.
    plain = server_sockets.context.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(endpoint)
    plain.send(b"plain text")
    # Which side sees the mechanism mismatch first is a race: the server reports it, or
    # sees the client hang up during the handshake.
    line = wait_for(lambda: records(caplog, "address=unknown"), 5, "the plain client refusal")
    assert line[0] in ("refused client endpoint=dispatcher address=unknown "
                       'reason="no CURVE key (plain-text client)"',
                       "refused client endpoint=dispatcher address=unknown "
                       'reason="handshake failed (Connection reset by peer): not a CURVE '
                       'client, or it hung up"',
                       "refused client endpoint=dispatcher address=unknown "
                       'reason="handshake failed (Broken pipe): not a CURVE client, or it hung '
                       'up"'), line

    # Not ZeroMQ at all.
    with socket.create_connection(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
        try:  # the server's greeting may come first; then it hangs up (a timeout fails)
            while raw.recv(4096):
                pass
        except ConnectionResetError:
            pass

    # A client that trusts another server key: its handshake fails.
    wrong = opened(client(kdir / "clients" / "w1.key_secret", other / "server.key")).connect(
        zmq.DEALER, endpoint)
    wrong.send(b"hi")
    wait_for(lambda: records(caplog, "CURVE handshake failed"), 5, "the wrong server key refusal")

    # None of them got anything through; the good client still works.
    assert router.poll(200) == 0
    good.send(b"still here")
    assert router.poll(5000) and router.recv_multipart() == [b"w1/s", b"still here"]
    plain.close()


def test_a_client_retrying_is_logged_once_with_a_count(tmp_path, keys, opened, caplog):
    kdir, other = keys
    server_config, client = curve_configs(tmp_path, kdir, other)
    server_sockets = opened(server_config)
    router = server_sockets.bind(zmq.ROUTER, "tcp://0.0.0.0:*", "dispatcher")
    # A client that trusts another server key retries every 100 ms (libzmq stops
    # retrying after a ZAP refusal, not after a failed CURVE handshake).
    wrong = opened(client(kdir / "clients" / "w1.key_secret", other / "server.key")).connect(
        zmq.DEALER, router.last_endpoint.decode())
    wrong.send(b"x")

    def retried() -> bool:
        return any(count >= 2 for _, count in server_sockets.refusals._seen.values())

    wait_for(retried, 10, "the refused client to retry twice")
    assert len(records(caplog, "CURVE handshake failed")) == 1


def test_a_key_authorised_after_start_is_accepted_without_restart(tmp_path, keys, opened):
    kdir, other = keys
    server_config, client = curve_configs(tmp_path, kdir, other)
    router = opened(server_config).bind(zmq.ROUTER, "tcp://0.0.0.0:*", "dispatcher")
    anime_keys.client(kdir, "late", "SERVER_ADDRESS", "keys")
    late = opened(client(kdir / "clients" / "late.key_secret")).connect(
        zmq.DEALER, router.last_endpoint.decode(), identity=b"late")
    late.send(b"hi")
    assert router.poll(5000) and router.recv_multipart() == [b"late", b"hi"]


def test_the_server_host_reaches_its_own_curve_endpoint_with_the_server_pair(
        tmp_path, keys, opened):
    """The dispatcher subscribes to the disk-watcher's non-loopback disk_state."""
    kdir, other = keys
    server_config, _ = curve_configs(tmp_path, kdir, other)
    pub = opened(server_config).bind(zmq.XPUB, "tcp://0.0.0.0:*", "disk_state")
    sub = opened(server_config).connect(zmq.SUB, pub.last_endpoint.decode())
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert pub.poll(5000) and pub.recv() == b"\x01"  # the subscription crossed CURVE


# --- anime-keys ----------------------------------------------------------------------


def test_anime_keys_makes_private_key_files_and_authorises_the_client(tmp_path, capsys):
    kdir = tmp_path / "keys"
    assert anime_keys.main(["init", "--dir", str(kdir), "--address", "10.9.8.7"]) == 0
    out = capsys.readouterr().out
    assert mode(kdir) == 0o700 and mode(kdir / "authorized") == 0o700
    assert mode(kdir / "server.key_secret") == 0o600
    assert 'dispatcher = "tcp://10.9.8.7:5555"' in out
    assert 'disk_state = "tcp://10.9.8.7:5556"' in out
    assert f'server_secret_key = "{kdir}/server.key_secret"' in out
    assert f'authorized_keys_dir = "{kdir}/authorized"' in out

    assert anime_keys.main(["client", "--dir", str(kdir), "--name", "box2"]) == 0
    out = capsys.readouterr().out
    assert mode(kdir / "clients" / "box2.key_secret") == 0o600
    assert (kdir / "authorized" / "box2.key").read_text() == (kdir / "clients" / "box2.key").read_text()
    assert list((kdir / "authorized").iterdir()) == [kdir / "authorized" / "box2.key"]
    assert f"{kdir}/clients/box2.key_secret  ->  keys/box2.key_secret" in out
    assert f"{kdir}/server.key  ->  keys/server.key" in out
    assert 'client_secret_key = "keys/box2.key_secret"' in out
    assert 'server_public_key = "keys/server.key"' in out


@pytest.mark.parametrize("argv, message", [
    (["client", "--dir", "{k}", "--name", "w"], "{k} has no server key pair; run first: "
                                                "anime-keys init --dir {k}"),
    (["init", "--dir", "{k}"], None),
])
def test_anime_keys_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    kdir = tmp_path / "keys"
    args = [a.format(k=kdir) for a in argv]
    if message:
        assert anime_keys.main(args) == 1
        assert capsys.readouterr().err == f"anime-keys: {message.format(k=kdir)}\n"
        return
    assert anime_keys.main(args) == 0
    assert anime_keys.main(args) == 1
    assert "server.key_secret already exists: this directory is initialised" in capsys.readouterr().err
    assert anime_keys.main(["client", "--dir", str(kdir), "--name", "a"]) == 0
    assert anime_keys.main(["client", "--dir", str(kdir), "--name", "a"]) == 1
    assert "a client named 'a' is authorised" in capsys.readouterr().err
    for bad in ("server", "../x", "a b", ""):
        assert anime_keys.main(["client", "--dir", str(kdir), "--name", bad]) == 1
        assert "--name" in capsys.readouterr().err


def test_anime_keys_help_is_the_console_script():
    result = subprocess.run([str(BIN / "anime-keys"), "--help"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0
    assert "init" in result.stdout and "client" in result.stdout
    result = subprocess.run([str(BIN / "anime-keys"), "client", "--help"], capture_output=True,
                            text=True, timeout=30)
    assert "--name NAME" in result.stdout and "--dir KEYS_DIR" in result.stdout
    result = subprocess.run([str(BIN / "anime-keys")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "required: COMMAND" in result.stderr
