"""The control requests' bodies (/api/ctl/<command>), checked before anything is sent."""

from __future__ import annotations

import asyncio

import pytest

from services.web import controls as ctl


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


def test_until_issue_18_nothing_carries_a_request():
    with pytest.raises(ctl.ControlsUnavailable, match="^controls not available yet$"):
        asyncio.run(ctl.NoControlEndpoint().send("pause", {"duration_seconds": None, "now": False}))


def test_the_commands_are_anime_ctls():
    assert sorted(ctl.COMMANDS) == ["bandwidth", "cancel", "pause", "priority", "resume", "retry"]
