"""Creating the ZeroMQ sockets: limits, ipc directories, loopback rule, CURVE keys.

Endpoints come from config.toml. An endpoint that another host could reach
(tcp on anything but a loopback address) is bound only with CURVE enabled, and
only such an endpoint uses CURVE: ipc:// and loopback endpoints stay plain on
both sides, so local tools (anime-status) need no keys. Who may connect to a
CURVE endpoint, and how refusals are logged: shared/curve.py.
"""

from __future__ import annotations

import ipaddress
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import zmq

from shared.config import Config, ConfigError, CurveConfig
from shared.curve import AuthorizedKeys, HandshakeWatch, Refusals, authenticator_class
from shared.logfmt import kv, lazy_logger
from shared.protocol import MAX_MESSAGE_BYTES

log = lazy_logger(__name__)  # no logging import until it logs: shared/logfmt.py
Z85_KEY_LENGTH = 40
# Local endpoints (ipc://, loopback): a refused connect is retried after this (plus up to
# as much again of jitter), doubling up to RECONNECT_MAX_MS while the peer stays away.
# Remote ones keep libzmq's 100 ms: there each retry may be a CURVE handshake, and a
# connection the server drops (a wrong key) starts again from the first interval.
RECONNECT_FIRST_MS = 10
RECONNECT_MAX_MS = 500


def is_local_endpoint(endpoint: str) -> bool:
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from outside


def _prepare_ipc(endpoint: str, run_dir: Path) -> None:
    """Create the socket's directory 0700; tighten the run dir, never a user's own dir."""
    if endpoint.startswith("ipc://"):
        directory = Path(endpoint[len("ipc://"):]).parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask
        elif directory == run_dir:
            os.chmod(directory, 0o700)


def _limits(sock: zmq.Socket, client: bool = False) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # A peer sending more than this is disconnected by libzmq before we parse it.
    # Not on a connecting socket: libzmq never reconnects a connection it cut for a
    # message too large, so the client would be cut off from its server for good;
    # there decode() refuses (and the caller logs) anything over MAX_MESSAGE_BYTES.
    if not client:
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)


def waiting(sock: zmq.Socket, limit: int = 1000, copy: bool = True) -> Iterator[list]:
    """The messages waiting on ``sock`` (at most ``limit``), without blocking. ZMQ_EVENTS
    is asked before each read: ending every batch on zmq.Again costs an exception (and
    its error object) per wake-up. ``copy=False`` yields zmq.Frame objects, whose
    properties (e.g. "User-Id", the CURVE key ZAP accepted) can be read."""
    for _ in range(limit):
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
            return
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return


class Sockets:
    """Owns the context (and the CURVE authenticator) of one process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.curve: CurveConfig = config.zmq.curve
        self.context = zmq.Context()
        self._auth = None
        self._watches: list[HandshakeWatch] = []
        self.refusals = Refusals()
        self._client_refusals = Refusals("the server refused this connection")

    # --- keys ---------------------------------------------------------------

    def _fail(self, option: str, text: str) -> ConfigError:
        return ConfigError(f"{self.config.path}: [zmq.curve] {option}: {text}")

    def _key_file(self, option: str, secret: bool) -> tuple[bytes, bytes | None]:
        from zmq.auth import load_certificate

        path = getattr(self.curve, option)
        if path is None:
            raise self._fail(option, "missing")
        try:
            public, secret_key = load_certificate(path)
        except (OSError, ValueError) as exc:
            raise self._fail(option, f"cannot read a CURVE key from {path}: {exc}") from None
        if secret and secret_key is None:
            raise self._fail(option, f"{path} holds only a public key; give the .key_secret file")
        if len(public) != Z85_KEY_LENGTH or (secret and len(secret_key or b"") != Z85_KEY_LENGTH):
            raise self._fail(option, f"{path}: not a CURVE key file (made by anime-keys)")
        return public, secret_key

    def _server_keys(self) -> tuple[bytes, bytes]:
        public, secret = self._key_file("server_secret_key", secret=True)
        assert secret is not None
        return public, secret

    def _endpoint_key(self, endpoint: str) -> str:
        for key in ("dispatcher", "status", "disk_state", "disk_control", "control"):
            if getattr(self.config.zmq, key) == endpoint:
                return key
        return endpoint

    def _start_auth(self) -> None:
        if self._auth is not None:
            return
        keys_dir = self.curve.authorized_keys_dir
        if keys_dir is None or not keys_dir.is_dir():
            raise ConfigError(f"{self.config.path}: [zmq.curve] authorized_keys_dir: "
                              f"{keys_dir} is not a directory of client public keys "
                              "(anime-keys init creates it)")
        own_public, _ = self._server_keys()
        keys = AuthorizedKeys(keys_dir, also=(own_public,))
        self._auth = authenticator_class()(self.context, keys, self.refusals)
        self._auth.start()

    # --- sockets ------------------------------------------------------------

    def bind(self, kind: int, endpoint: str, key: str) -> zmq.Socket:
        """Bind a server socket; a non-loopback endpoint only with CURVE (refused without)."""
        sock = self.context.socket(kind)
        _limits(sock)
        with self._closed_on_error(sock, key, "bind", endpoint):
            if not is_local_endpoint(endpoint):
                if not (self.curve.server_enabled and self.curve.authorized_keys_dir):
                    raise ConfigError(
                        f"{self.config.path}: [zmq] {key}: {endpoint} is reachable from other "
                        "hosts; set [zmq.curve] server_secret_key and authorized_keys_dir "
                        "(anime-keys creates them) or bind to 127.0.0.1 / ipc://")
                if not zmq.has("curve"):
                    raise ConfigError(f"{self.config.path}: [zmq] {key}: this libzmq has no "
                                      "CURVE support; bind to 127.0.0.1 / ipc://")
                public, secret = self._server_keys()
                self._start_auth()
                assert self._auth is not None
                self._auth.configure_curve_callback(domain=key, credentials_provider=self._auth)
                sock.zap_domain = key.encode()
                sock.curve_server = True
                sock.curve_publickey = public
                sock.curve_secretkey = secret
                self._watch(sock, key, server=True)
            _prepare_ipc(endpoint, self.config.run_dir)
            sock.bind(endpoint)
        log.debug(kv("bound", endpoint=endpoint, key=key))
        return sock

    def _watch(self, sock: zmq.Socket, key: str, server: bool) -> None:
        watch = HandshakeWatch(self.context, sock, key, server,
                                self.refusals if server else self._client_refusals)
        watch.start()
        self._watches.append(watch)

    def connect_dealer(self, endpoint: str, identity: bytes) -> zmq.Socket:
        """A DEALER that queues nothing for a peer that is not connected (IMMEDIATE):
        its owner re-sends what matters, so a restarted dispatcher sees no backlog."""
        return self.connect(zmq.DEALER, endpoint, identity=identity, immediate=True)

    def _client_keys(self, key: str, endpoint: str) -> tuple[bytes, bytes, bytes]:
        """(public, secret, server public) for a connection to a non-loopback endpoint:
        the client pair, or on the server's own host its server pair."""
        if self.curve.client_enabled:
            public, secret = self._key_file("client_secret_key", secret=True)
            if self.curve.server_public_key is None:
                raise self._fail("server_public_key", "missing (required with client_secret_key)")
            server_public, _ = self._key_file("server_public_key", secret=False)
            assert secret is not None
            return public, secret, server_public
        if self.curve.server_enabled:
            public, secret = self._server_keys()
            return public, secret, public
        raise ConfigError(
            f"{self.config.path}: [zmq] {key}: {endpoint} is not a loopback address, so it "
            "needs CURVE; set [zmq.curve] client_secret_key and server_public_key "
            "(anime-keys client prints them)")

    def connect(self, kind: int, endpoint: str, identity: bytes | None = None,
                immediate: bool = False) -> zmq.Socket:
        sock = self.context.socket(kind)
        _limits(sock, client=True)
        key = self._endpoint_key(endpoint)
        with self._closed_on_error(sock, key, "connect to", endpoint):
            if identity is not None:
                sock.setsockopt(zmq.ROUTING_ID, identity)
            if immediate:
                sock.setsockopt(zmq.IMMEDIATE, 1)
                sock.setsockopt(zmq.SNDHWM, 100)
            if is_local_endpoint(endpoint):
                # Workers start faster than the dispatcher (no database layer to import),
                # so their first connect is usually refused, and libzmq's 100 ms plus
                # jitter delayed the first job of every start by 100-200 ms.
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_FIRST_MS)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
            else:
                public, secret, server_public = self._client_keys(key, endpoint)
                sock.curve_publickey = public
                sock.curve_secretkey = secret
                sock.curve_serverkey = server_public
                self._watch(sock, key, server=False)
            sock.connect(endpoint)
        return sock

    @contextmanager
    def _closed_on_error(self, sock: zmq.Socket, key: str, action: str,
                         endpoint: str) -> Iterator[None]:
        """Close ``sock`` if setting it up fails; a ZeroMQ error becomes a ConfigError
        naming the config key and the endpoint."""
        try:
            yield
        except ConfigError:
            sock.close(linger=0)
            raise
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(f"{self.config.path}: [zmq] {key}: cannot {action} {endpoint}: "
                              f"{exc}") from None

    def close(self) -> None:
        for watch in self._watches:
            watch.halt.set()
        for watch in self._watches:
            watch.join(timeout=2)
        if self._auth is not None:
            self._auth.stop()
        self.context.destroy(linger=0)
