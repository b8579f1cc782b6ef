"""The operator's requests (``/api/ctl/<command>``), mirroring ``anime-ctl`` (issue 18).

Each command's JSON body is checked by services/controls.py (pure, shared with
anime-ctl) and becomes the fields of its ``control.<command>`` message; a
``ControlClient`` sends it to the dispatcher's control endpoint (``[zmq] control``) and
returns the dispatcher's ``control.reply``. ``ZmqControlClient`` is the real one, on
anime-web's event loop; ``NoControlEndpoint`` answers "controls not available" (HTTP
503), for a web server built without one.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import zmq
import zmq.asyncio

from services.controls import COMMANDS, PRIORITY_NAMES, BadArgument, duration_seconds, parse, request
from shared.protocol import ControlReply, ProtocolError, decode, encode
from shared.sockets import Sockets

__all__ = ["COMMANDS", "PRIORITY_NAMES", "BadArgument", "duration_seconds", "parse",
           "ControlClient", "ControlsUnavailable", "NoControlEndpoint", "ZmqControlClient"]
NOT_AVAILABLE = "controls not available yet"
CONTROL_TIMEOUT = 5.0  # a pause --now writes one row per running download: still quick
CONNECT_SECONDS = 1.0  # a local endpoint connects in milliseconds; nothing there: say so


class ControlsUnavailable(Exception):
    """Nothing can carry the request to the dispatcher (no control endpoint, no answer)."""


class ControlClient(Protocol):
    async def send(self, command: str, fields: dict) -> dict:
        """The dispatcher's ``control.reply`` as ``{"ok", "message", "result"}``;
        raises ControlsUnavailable when it cannot be asked."""


class NoControlEndpoint:
    """A web server without a way to the dispatcher's controls."""

    async def send(self, command: str, fields: dict) -> dict:
        raise ControlsUnavailable(NOT_AVAILABLE)


class ZmqControlClient:
    """The dispatcher's control endpoint, asked from anime-web's event loop (zmq.asyncio).

    A fresh DEALER per request, as for the status: a late answer to an earlier request
    is never taken for this one, and a silent dispatcher costs ``timeout`` and nothing
    else. The socket is made like ``Sockets.connect`` makes it (limits, reconnects,
    CURVE off loopback) and wrapped for asyncio (``zmq.asyncio.Socket.from_socket``)."""

    def __init__(self, sockets: Sockets, endpoint: str, timeout: float = CONTROL_TIMEOUT) -> None:
        self.sockets = sockets
        self.endpoint = endpoint
        self.timeout = timeout

    def _socket(self) -> tuple[zmq.asyncio.Socket, zmq.Socket]:
        # IMMEDIATE: nothing is queued for a dispatcher that is not there, so a stopped one
        # is known within CONNECT_SECONDS instead of the whole timeout
        plain = self.sockets.connect(zmq.DEALER, self.endpoint, immediate=True)
        return zmq.asyncio.Socket.from_socket(plain), plain

    async def send(self, command: str, fields: dict) -> dict:
        fields = dict(fields)
        source = fields.pop("source", "anime-web")
        msg = request(command, fields, source)
        sock, plain = self._socket()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            if not await sock.poll(min(CONNECT_SECONDS, self.timeout) * 1000, zmq.POLLOUT):
                raise ControlsUnavailable(self._silent(min(CONNECT_SECONDS, self.timeout)))
            try:
                await sock.send_multipart(encode(msg), zmq.NOBLOCK)
            except zmq.Again:
                raise ControlsUnavailable(self._silent()) from None
            while (left := deadline - loop.time()) > 0:
                if not await sock.poll(left * 1000):
                    break
                try:
                    reply = decode(await sock.recv_multipart())
                except ProtocolError:
                    continue
                if isinstance(reply, ControlReply):
                    return {"ok": reply.ok, "message": reply.message, "result": dict(reply.result)}
            raise ControlsUnavailable(self._silent())
        finally:
            # Closed through the asyncio wrapper: it removes its reader of ZMQ_FD from the
            # loop first (a descriptor number left registered would steal the events of
            # the next HTTP connection that gets that number).
            sock.close(linger=0)
            plain.close(linger=0)

    def _silent(self, seconds: float | None = None) -> str:
        return (f"no answer from the dispatcher at {self.endpoint} within "
                f"{self.timeout if seconds is None else seconds:g}s (is anime-downloader running?)")
