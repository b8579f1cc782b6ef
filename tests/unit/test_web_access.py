"""Who may use anime-web: each decision of services/web/access.py, without a socket."""

from __future__ import annotations

import base64

import pytest

from services.web.access import Access, Ask, RefusalLog, basic_password, host_name
from shared.config import WebConfig

LOCAL = WebConfig(host="127.0.0.1", port=8766)
PASSWORD = WebConfig(host="0.0.0.0", port=8766, password="s3cret")
KEY = WebConfig(host="0.0.0.0", port=8766, api_key="k" * 24)
SECRET = b"x" * 32


def basic(password: str, user: str = "me") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def ask(method: str = "GET", peer: str = "127.0.0.1", host: str = "127.0.0.1:8766", **kw) -> Ask:
    return Ask(method=method, peer=peer, host=host, **kw)


@pytest.mark.parametrize("peer,host,status", [
    ("127.0.0.1", "127.0.0.1:8766", 0),
    ("127.0.0.5", "localhost:8766", 0),
    ("::1", "[::1]:8766", 0),
    ("::ffff:127.0.0.1", "127.0.0.1:8766", 0),
    ("192.168.1.23", "127.0.0.1:8766", 403),  # another host: only this machine, without a password
    ("10.0.0.2", "10.0.0.1:8766", 403),
    (None, "127.0.0.1:8766", 403),
    ("127.0.0.1", "evil.example:8766", 403),  # DNS rebinding: another site's name, our address
    ("127.0.0.1", None, 403),
])
def test_without_credentials_only_this_machine_under_a_loopback_name(peer, host, status):
    verdict = Access(LOCAL, SECRET).check(ask(peer=peer, host=host))
    assert verdict.status == status, verdict


def test_the_rebinding_refusal_says_which_address_to_open():
    verdict = Access(LOCAL, SECRET, "http://127.0.0.1:41234/").check(ask(host="evil.example"))
    assert "open the page as http://127.0.0.1:41234/" in verdict.reason


@pytest.mark.parametrize("peer", ["192.168.1.23", "127.0.0.1"])  # a local proxy looks local
def test_with_a_password_every_client_must_give_it(peer):
    access = Access(PASSWORD, SECRET)
    refused = access.check(ask(peer=peer))
    assert (refused.status, refused.challenge) == (401, True)
    assert refused.reason == "this server needs the password"
    assert access.check(ask(peer=peer, authorization=basic("wrong"))).status == 401
    assert access.check(ask(peer=peer, authorization=basic("s3cret", user=""))).via == "password"
    assert access.check(ask(peer=peer, authorization="Bearer s3cret")).status == 401
    assert access.check(ask(peer=peer, api_key="s3cret")).status == 401  # not a key


def test_with_only_an_api_key_the_browser_is_not_asked_for_a_password():
    access = Access(KEY, SECRET)
    refused = access.check(ask(peer="192.168.1.23"))
    assert (refused.status, refused.challenge) == (401, False)
    assert access.check(ask(peer="192.168.1.23", api_key="k" * 24)).via == "api_key"
    assert access.check(ask(api_key="k" * 23)).status == 401
    assert access.check(ask(authorization=basic("k" * 24))).status == 401


def test_a_change_needs_the_token_and_our_origin_except_with_the_api_key():
    access = Access(LOCAL, SECRET)
    token = access.csrf_token
    post = lambda **kw: access.check(ask(method="POST", **kw))  # noqa: E731
    assert post().status == 403 and "CSRF" in post().reason
    assert post(csrf_token="0" * 64).status == 403
    assert post(csrf_token=token).allowed
    assert post(csrf_token=token, origin="http://127.0.0.1:8766").allowed
    assert post(csrf_token=token, origin="http://evil.example").status == 403
    assert post(csrf_token=token, origin="null").status == 403
    assert post(csrf_token=token, fetch_site="cross-site").status == 403
    assert post(csrf_token=token, fetch_site="same-origin").allowed
    assert access.check(ask(method="DELETE")).status == 403
    assert access.check(ask(method="GET")).allowed  # reads need no token
    keyed = Access(WebConfig(host="127.0.0.1", port=8766, api_key="k" * 24, password="pw"), SECRET)
    assert keyed.check(ask(method="POST", api_key="k" * 24)).allowed
    assert keyed.check(ask(method="POST", authorization=basic("pw"))).status == 403


def test_the_token_is_new_at_every_start():
    assert Access(LOCAL, b"a" * 32).csrf_token != Access(LOCAL, b"b" * 32).csrf_token
    assert Access(LOCAL, b"a" * 32).csrf_token == Access(PASSWORD, b"a" * 32).csrf_token


def test_header_parsing():
    assert basic_password(basic("p:w")) == "p:w"
    assert basic_password("Basic !!!") is None
    assert basic_password("Basic " + base64.b64encode(b"nocolon").decode()) is None
    assert basic_password(None) is None
    assert host_name("[::1]:8766") == "::1" and host_name("localhost") == "localhost"
    assert host_name("127.0.0.1:80") == "127.0.0.1" and host_name("[::1") is None


def test_refusals_are_logged_once_a_minute_per_peer_and_reason_with_a_count():
    log = RefusalLog(60)
    assert log.count("10.0.0.2", "no password", 0.0) == 1
    assert [log.count("10.0.0.2", "no password", t) for t in (1.0, 2.0, 59.0)] == [None] * 3
    assert log.count("10.0.0.3", "no password", 3.0) == 1
    assert log.count("10.0.0.2", "no password", 61.0) == 4
    assert log.count("10.0.0.2", "no password", 62.0) is None
