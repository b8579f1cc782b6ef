"""Who may connect to a CURVE endpoint, and how a refusal is logged.

The authenticator accepts the client public keys found in ``[zmq.curve]
authorized_keys_dir`` (re-read at every handshake: a key added with ``anime-keys
client`` counts without a restart) plus the server's own key (the dispatcher reaching
the disk-watcher's non-loopback endpoint on the same host). Every refusal is logged
at WARNING: an unknown key with the client's address (from the ZAP request), a
client without CURVE or with the wrong server key from a socket monitor (libzmq
gives no address for those). A client that keeps retrying (every 100 ms after
a failed handshake) is logged at most once a minute, with a count.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import zmq

from shared.logfmt import kv, lazy_logger

log = lazy_logger(__name__)  # no logging import until it logs: shared/logfmt.py
REFUSAL_REPEAT_SECONDS = 60.0


class Refusals:
    """Logs refused clients at WARNING, each (endpoint, address, reason, key) at most
    once per REFUSAL_REPEAT_SECONDS, with how many were refused in between."""

    def __init__(self, message: str = "refused client") -> None:
        self.message = message
        self._seen: dict[tuple, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def refused(self, endpoint: str, reason: str, address: str | None = None,
                client_key: str | None = None) -> None:
        now = time.monotonic()
        what = (endpoint, address, reason, client_key)
        with self._lock:
            last, count = self._seen.get(what, (None, 0))
            if last is not None and now - last < REFUSAL_REPEAT_SECONDS:
                self._seen[what] = (last, count + 1)
                return
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[what] = (now, 0)
        log.warning(kv(self.message, endpoint=endpoint, address=address,
                            reason=reason, client_key=client_key, repeated=count or None))


class AuthorizedKeys:
    """The client public keys in a directory (``*.key``), re-read at each lookup."""

    def __init__(self, directory: Path, also: tuple[bytes, ...] = ()) -> None:
        self.directory = directory
        self.also = set(also)
        self._bad: set[str] = set()

    def load(self) -> set[bytes]:
        from zmq.auth import load_certificate

        keys = set(self.also)
        try:
            paths = sorted(self.directory.glob("*.key"))
        except OSError as exc:
            log.warning(kv("cannot read authorized_keys_dir", path=self.directory, error=exc))
            return keys
        for path in paths:
            try:
                public, _ = load_certificate(path)
            except (OSError, ValueError) as exc:
                if str(path) not in self._bad:
                    self._bad.add(str(path))
                    log.warning(kv("ignored a key file that holds no public key", path=path,
                                   error=exc))
                continue
            keys.add(public)
        return keys


def authenticator_class():
    import logging

    from zmq.auth.thread import ThreadAuthenticator  # only servers with CURVE pay for it

    class Authenticator(ThreadAuthenticator):
        """pyzmq's ZAP handler; a refused key is logged with the client's address
        (pyzmq itself logs denials at DEBUG, without the address)."""

        def __init__(self, context: zmq.Context, keys: AuthorizedKeys, refusals: Refusals) -> None:
            super().__init__(context, log=logging.getLogger("zmq.auth"))
            self.keys = keys
            self.refusals = refusals
            self._address: str | None = None

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            # Frames: version, request id, domain, address, identity, mechanism, key.
            self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else None
            await super().handle_zap_message(msg)

        def callback(self, domain: str, key: bytes) -> bool:  # the credentials provider
            if key in self.keys.load():
                log.debug(kv("accepted client", endpoint=domain, address=self._address,
                             client_key=key.decode()))
                return True
            self.refusals.refused(domain, "unknown key (not in authorized_keys_dir)",
                                  self._address or "unknown", key.decode())
            return False

    return Authenticator


_HANDSHAKE_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no CURVE key (plain-text client)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE handshake failed (wrong server key?)",
}


class HandshakeWatch(threading.Thread):
    """Reads a socket monitor and reports failed handshakes (libzmq gives no peer
    address for them; an unknown key is reported by the ZAP handler instead)."""

    SERVER_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    CLIENT_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH

    def __init__(self, context: zmq.Context, sock: zmq.Socket, key: str, server: bool,
                 refusals: Refusals) -> None:
        super().__init__(daemon=True, name=f"handshakes-{key}")
        address = f"inproc://handshakes-{id(sock)}"
        sock.monitor(address, (self.SERVER_EVENTS if server else self.CLIENT_EVENTS)
                     | zmq.EVENT_MONITOR_STOPPED)
        self.pair = context.socket(zmq.PAIR)
        self.pair.connect(address)
        self.key = key
        self.server = server
        self.refusals = refusals
        self.halt = threading.Event()

    def run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while not self.halt.is_set():
                if not self.pair.poll(200):
                    continue
                event = recv_monitor_message(self.pair)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                self._report(event["event"], event["value"])
        except zmq.ZMQError:
            return  # the context is going away
        finally:
            self.pair.close(linger=0)

    def _report(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            reason = _HANDSHAKE_REASONS.get(value, f"not a ZeroMQ CURVE client (protocol error {value:#x})")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = f"authentication refused (status {value}): is this client's key authorised?"
        else:
            error = os.strerror(value) if value > 0 else str(value)
            reason = f"handshake failed ({error}): not a CURVE client, or it hung up"
        self.refusals.refused(self.key, reason, "unknown" if self.server else None)
