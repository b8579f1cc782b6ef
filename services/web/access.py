"""Who may use anime-web, and how: every decision here is pure (no sockets, no clock).

- Listening on a loopback address without a password or an API key, only this machine
  may connect, and only under a loopback name in ``Host`` (so a page elsewhere that gets
  a name of its own resolved to 127.0.0.1, "DNS rebinding", cannot read the API).
- With ``[web] password`` or ``api_key`` set (required for any other address), every
  request must carry one: the password by HTTP basic auth (any user name), the key in an
  ``X-Api-Key`` header. The loopback is not exempt: a reverse proxy on this machine would
  make every stranger look local.
- A request that changes something (not GET/HEAD) from a browser also needs the CSRF
  token the page gets from ``/api/session``, and an ``Origin`` that is this server: a
  browser attaches basic-auth credentials to any site's requests, never custom headers.
  With the API key (a header no other site can make a browser send) no token is needed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

import msgspec

from shared.config import WebConfig, is_loopback_host

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
REALM = "anime-downloader"


class Ask(msgspec.Struct, frozen=True):
    """The parts of an HTTP request that the decision reads."""

    method: str
    peer: str | None  # the client's address, None if unknown
    host: str | None = None  # the Host header
    authorization: str | None = None
    api_key: str | None = None  # the X-Api-Key header
    csrf_token: str | None = None  # the X-CSRF-Token header
    origin: str | None = None
    fetch_site: str | None = None  # Sec-Fetch-Site


class Verdict(msgspec.Struct, frozen=True):
    """``status`` 0 lets the request through; otherwise the HTTP status and why."""

    status: int
    reason: str = ""
    challenge: bool = False  # send WWW-Authenticate: Basic (the browser asks for the password)
    via: str = ""  # how the client proved itself: "password", "api_key", "loopback"

    @property
    def allowed(self) -> bool:
        return self.status == 0


def _is_loopback_peer(peer: str | None) -> bool:
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def host_name(host_header: str | None) -> str | None:
    """The name in a Host header, without the port (``[::1]:8766`` -> ``::1``)."""
    if not host_header:
        return None
    value = host_header.strip()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def basic_password(authorization: str | None) -> str | None:
    """The password of an ``Authorization: Basic ...`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    return password if sep else None


def _same(given: str | None, expected: str | None) -> bool:
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class Access:
    """The rules of one anime-web process; ``csrf_secret`` is new at every start."""

    def __init__(self, web: WebConfig, csrf_secret: bytes, url: str | None = None) -> None:
        self.web = web
        self.url = url or f"http://{web.listen}/"  # as bound (the port, if 0 was asked)
        self.csrf_token = hmac.new(csrf_secret, b"anime-web csrf", hashlib.sha256).hexdigest()

    @property
    def needs_credentials(self) -> bool:
        return self.web.password is not None or self.web.api_key is not None

    def check(self, ask: Ask) -> Verdict:
        who = self.identify(ask)
        if not who.allowed:
            return who
        if ask.method.upper() in SAFE_METHODS or who.via == "api_key":
            return who
        return self.check_csrf(ask, who)

    def identify(self, ask: Ask) -> Verdict:
        """Is the client allowed at all (any method)?"""
        if self.needs_credentials:
            if self.web.api_key is not None and _same(ask.api_key, self.web.api_key):
                return Verdict(0, via="api_key")
            if self.web.password is not None and _same(basic_password(ask.authorization),
                                                       self.web.password):
                return Verdict(0, via="password")
            what = " or ".join(name for name, value in (("the password", self.web.password),
                                                        ("the API key", self.web.api_key)) if value)
            return Verdict(401, f"this server needs {what}",
                           challenge=self.web.password is not None)
        if not _is_loopback_peer(ask.peer):
            return Verdict(403, "only this machine may connect: set [web] password or api_key "
                                "to allow others")
        name = host_name(ask.host)
        if name is None or not is_loopback_host(name):
            return Verdict(403, f"unexpected Host {ask.host!r}: open the page as "
                                f"{self.url}")
        return Verdict(0, via="loopback")

    def check_csrf(self, ask: Ask, who: Verdict) -> Verdict:
        if ask.fetch_site == "cross-site":
            return Verdict(403, "a request from another site")
        if ask.origin is not None and not self._same_origin(ask.origin, ask.host):
            return Verdict(403, f"a request from another origin ({ask.origin})")
        if not _same(ask.csrf_token, self.csrf_token):
            return Verdict(403, "missing or wrong CSRF token (X-CSRF-Token, from /api/session); "
                                "reload the page")
        return who

    @staticmethod
    def _same_origin(origin: str, host: str | None) -> bool:
        if origin == "null" or host is None:
            return False
        return urlsplit(origin).netloc.lower() == host.strip().lower()


class RefusalLog:
    """Which refusals to log: the first of each (peer, reason), then at most one a
    minute with how many were refused meanwhile (a client that keeps knocking must not
    fill the log)."""

    def __init__(self, repeat_seconds: float = 60.0) -> None:
        self.repeat_seconds = repeat_seconds
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def count(self, peer: str | None, reason: str, now: float) -> int | None:
        """How many refusals to report now (this one included), or None to stay quiet."""
        key = (peer or "unknown", reason)
        last, pending = self._seen.get(key, (None, 0))
        pending += 1
        if last is not None and now - last < self.repeat_seconds:
            self._seen[key] = (last, pending)
            return None
        if len(self._seen) > 1000:  # many peers: forget the old ones
            self._seen.clear()
        self._seen[key] = (now, 0)
        return pending
