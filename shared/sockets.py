"""Creating the ZeroMQ sockets: limits, ipc directories, loopback rule, CURVE.

Endpoints come from config.toml. An endpoint that another host could reach
(tcp on anything but a loopback address) is bound only with CURVE enabled; the
authenticator accepts only the client public keys found in
``[zmq.curve] authorized_keys_dir`` and logs every refusal.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

import zmq

from shared.config import Config, ConfigError, CurveConfig
from shared.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)


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


def _prepare_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        directory = Path(endpoint[len("ipc://"):]).parent
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)


def _limits(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    # A peer sending more than this is disconnected by libzmq before we parse it.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)


class Sockets:
    """Owns the context (and the CURVE authenticator) of one process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.curve: CurveConfig = config.zmq.curve
        self.context = zmq.Context()
        self._auth = None

    def _start_auth(self) -> None:
        if self._auth is not None:
            return
        from zmq.auth.thread import ThreadAuthenticator  # only servers with CURVE pay for it

        keys_dir = self.curve.authorized_keys_dir
        if keys_dir is None or not keys_dir.is_dir():
            raise ConfigError(f"{self.config.path}: [zmq.curve] authorized_keys_dir: "
                              f"{keys_dir} is not a directory of client public keys")
        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("zmq.auth"))
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(keys_dir))

    def bind(self, kind: int, endpoint: str, key: str) -> zmq.Socket:
        """Bind a server socket; refuse a non-loopback bind without CURVE."""
        sock = self.context.socket(kind)
        _limits(sock)
        if not is_local_endpoint(endpoint) or self.curve.server_enabled:
            if not self.curve.server_enabled:
                sock.close()
                raise ConfigError(
                    f"{self.config.path}: [zmq] {key}: {endpoint} is reachable from other "
                    "hosts; set [zmq.curve] server_secret_key and authorized_keys_dir "
                    "(anime-keys creates them) or bind to 127.0.0.1 / ipc://")
            from zmq.auth import load_certificate

            self._start_auth()
            public, secret = load_certificate(str(self.curve.server_secret_key))
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        _prepare_ipc(endpoint)
        sock.bind(endpoint)
        log.debug("bound endpoint=%s key=%s", endpoint, key)
        return sock

    def connect_dealer(self, endpoint: str, identity: bytes) -> zmq.Socket:
        """A DEALER that queues nothing for a peer that is not connected (IMMEDIATE):
        its owner re-sends what matters, so a restarted dispatcher sees no backlog."""
        return self.connect(zmq.DEALER, endpoint, identity=identity, immediate=True)

    def connect(self, kind: int, endpoint: str, identity: bytes | None = None,
                immediate: bool = False) -> zmq.Socket:
        sock = self.context.socket(kind)
        _limits(sock)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 100)
        if self.curve.client_enabled:
            from zmq.auth import load_certificate

            public, secret = load_certificate(str(self.curve.client_secret_key))
            if self.curve.server_public_key is None:
                raise ConfigError(f"{self.config.path}: [zmq.curve] server_public_key: "
                                  "missing (required with client_secret_key)")
            server_public, _ = load_certificate(str(self.curve.server_public_key))
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server_public
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        self.context.destroy(linger=0)
