"""The control requests' bodies (/api/ctl/<command>), checked before anything is sent,
and the client that carries them to the dispatcher's control endpoint."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from services.controls import request
from services.web import controls as ctl
from shared.config import load_config
from shared.protocol import ControlPause, ControlReply, decode, encode
from shared.sockets import Sockets
from tests.system import render_toml


@pytest.mark.parametrize("command,body,fields", [
    ("pause", None, {"duration_seconds": None, "now": False}),
    ("pause", {"for": "2h"}, {"duration_seconds": 7200.0, "now": False}),
    ("pause", {"for": "90m", "now": True}, {"duration_seconds": 5400.0, "now": True}),
    ("pause", {"for": 30}, {"duration_seconds": 30.0, "now": False}),
    ("pause", {"for": " 1.5d "}, {"duration_seconds": 129600.0, "now": False}),
    ("resume", {}, {}),
    ("retry", {"failed": True}, {"failed": True, "job_ids": [], "anime_id": None}),
    ("retry", {"job_ids": [3, 4]}, {"failed": False, "job_ids": [3, 4], "anime_id": None}),
    ("retry", {"anime_id": 5114}, {"failed": False, "job_ids": [], "anime_id": 5114}),
    ("cancel", {"job_id": 17}, {"job_id": 17}),
    ("priority", {"anime_id": 5114, "priority": "high"}, {"anime_id": 5114, "job_id": None, "priority": 10}),
    ("priority", {"job_id": 3, "priority": -3}, {"anime_id": None, "job_id": 3, "priority": -3}),
    ("bandwidth", {"mbps": 0}, {"mbps": 0.0}),
    ("bandwidth", {"mbps": 12.5}, {"mbps": 12.5}),
])
def test_each_command_becomes_the_fields_of_its_message(command, body, fields):
    assert ctl.parse(command, body) == fields


@pytest.mark.parametrize("command,body,message", [
    ("pause", {"for": "soon"}, "for: must be a duration such as 30s, 90m or 2h, got 'soon'"),
    ("pause", {"for": 0}, "for: must be longer than 0, got 0"),
    ("pause", {"now": "yes"}, "now: must be true or false, got 'yes'"),
    ("pause", {"until": 5}, "until: unknown field (expected: for, now)"),
    ("resume", {"x": 1}, "x: unknown field (expected: none)"),
    ("retry", {}, "give exactly one of failed: true, job_ids or anime_id"),
    ("retry", {"failed": True, "anime_id": 1}, "give exactly one of failed: true, job_ids or anime_id"),
    ("retry", {"job_ids": ["3"]}, "job_ids: must be a list of job ids, got ['3']"),
    ("cancel", {}, "job_id: missing (the job to cancel)"),
    ("cancel", {"job_id": True}, "job_id: must be a positive whole number, got True"),
    ("priority", {"anime_id": 1, "job_id": 2, "priority": 1}, "give exactly one of anime_id or job_id"),
    ("priority", {"anime_id": 1, "priority": "urgent"},
     "priority: must be high, normal, low or a whole number, got 'urgent'"),
    ("bandwidth", {"mbps": -1}, "mbps: must be a number of megabits per second, 0 for unlimited, got -1"),
    ("bandwidth", [], "the body must be a JSON object"),
])
def test_a_bad_body_names_the_field_and_what_to_send(command, body, message):
    with pytest.raises(ctl.BadArgument) as info:
        ctl.parse(command, body)
    assert str(info.value) == message


def test_each_parsed_command_is_its_control_message():
    for command, body in [("pause", {"for": "2h", "now": True}), ("resume", {}),
                          ("retry", {"job_ids": [3]}), ("cancel", {"job_id": 4}),
                          ("priority", {"anime_id": 9, "priority": "low"}), ("bandwidth", {"mbps": 3})]:
        msg = request(command, ctl.parse(command, body), "anime-web 127.0.0.1")
        assert msg.KIND == f"control.{command}" and msg.source == "anime-web 127.0.0.1"
        assert decode(encode(msg)) == msg


@pytest.fixture
def config(tmp_path):
    run = Path(tempfile.mkdtemp(prefix="ctl-", dir="/tmp"))
    path = tmp_path / "config.toml"
    path.write_text(render_toml({
        "data": {"root_dir": "data", "storage_dir": "storage"},
        "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8},
        "zmq": {"control": f"ipc://{run}/control.sock"}}))
    yield load_config(path)
    shutil.rmtree(run, ignore_errors=True)


def test_the_client_asks_the_control_endpoint_and_returns_its_reply(config):
    """A ROUTER in a thread stands in for the dispatcher; the client runs on an event loop."""
    sockets = Sockets(config)
    router = sockets.bind(zmq.ROUTER, config.zmq.control, "control")
    seen = []

    def serve():
        if router.poll(5000):
            identity, *frames = router.recv_multipart()
            seen.append(decode(frames))
            router.send_multipart([identity] + encode(ControlReply(
                ok=True, message="paused until resumed", result={"paused": True})))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = ctl.ZmqControlClient(sockets, config.zmq.control)
        reply = asyncio.run(client.send("pause", {"duration_seconds": None, "now": True,
                                                  "source": "anime-web 127.0.0.1"}))
    finally:
        thread.join()
        sockets.close()
    assert reply == {"ok": True, "message": "paused until resumed", "result": {"paused": True}}
    assert seen == [ControlPause(source="anime-web 127.0.0.1", duration_seconds=None, now=True)]


def test_with_no_dispatcher_the_client_says_so_within_a_second(config):
    sockets = Sockets(config)
    try:
        client = ctl.ZmqControlClient(sockets, config.zmq.control, timeout=5.0)
        started = time.monotonic()
        with pytest.raises(ctl.ControlsUnavailable, match="^no answer from the dispatcher at ipc://"):
            asyncio.run(client.send("resume", {}))
        assert time.monotonic() - started < 2.5
    finally:
        sockets.close()


def test_without_an_endpoint_nothing_carries_a_request():
    with pytest.raises(ctl.ControlsUnavailable, match="^controls not available yet$"):
        asyncio.run(ctl.NoControlEndpoint().send("pause", {"duration_seconds": None, "now": False}))


def test_the_commands_are_anime_ctls():
    assert sorted(ctl.COMMANDS) == ["bandwidth", "cancel", "pause", "priority", "resume", "retry"]
