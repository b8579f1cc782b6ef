"""[web] in config.toml: defaults, the listen address, and the rule for other hosts."""

from __future__ import annotations

import pytest

from shared.config import load_config, parse_listen
from tests.unit.test_config import error_of, write


def test_defaults_listen_on_this_machine_only(tmp_path):
    web = load_config(write(tmp_path, drop=("web", "listen"))).web
    assert (web.host, web.port, web.password, web.api_key) == ("127.0.0.1", 8766, None, None)
    assert web.listen == "127.0.0.1:8766" and web.local


@pytest.mark.parametrize("value,host,port", [
    ("127.0.0.1:8766", "127.0.0.1", 8766), ("localhost:0", "localhost", 0),
    ("[::1]:9000", "::1", 9000), ("0.0.0.0:80", "0.0.0.0", 80), ("[::]:8766", "::", 8766),
])
def test_listen_values(value, host, port):
    assert parse_listen(value) == (host, port)


@pytest.mark.parametrize("value,error", [
    ("8766", "must be HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:8766, got '8766'"),
    ("127.0.0.1:70000", "must be HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:8766, got '127.0.0.1:70000'"),
    ("::1:8766", "write an IPv6 address in brackets, e.g. [::1]:8766, got '::1:8766'"),
    ("nas.local:8766", "the host must be an IP address (127.0.0.1, 0.0.0.0, [::1]...) or localhost, got 'nas.local'"),
])
def test_a_bad_listen_is_one_line_naming_the_key(tmp_path, value, error):
    assert error_of(write(tmp_path, {"web": {"listen": value}})) == \
        f"{tmp_path / 'config.toml'}: [web] listen: {error}"


def test_other_hosts_need_a_password_or_an_api_key(tmp_path):
    path = write(tmp_path, {"web": {"listen": "192.168.1.10:8766"}})
    assert error_of(path) == (f"{path}: [web] listen: 192.168.1.10:8766 is reachable from other "
                              "hosts; set [web] password or api_key, or listen on 127.0.0.1:8766")
    web = load_config(write(tmp_path, {"web": {"listen": "192.168.1.10:8766", "password": "pw"}})).web
    assert not web.local and web.password == "pw"
    web = load_config(write(tmp_path, {"web": {"listen": "0.0.0.0:8766", "api_key": "k" * 16}})).web
    assert web.api_key == "k" * 16


def test_a_short_api_key_or_an_empty_password_is_refused(tmp_path):
    assert "[web] api_key: must be at least 16 characters, got 5" in \
        error_of(write(tmp_path, {"web": {"api_key": "short"}}))
    assert error_of(write(tmp_path, {"web": {"password": ""}})).endswith("[web] password: must not be empty")
    assert error_of(write(tmp_path, {"web": {"port": 1}})).endswith("[web] port: unknown key")
