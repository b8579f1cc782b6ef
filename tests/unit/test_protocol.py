"""Every registered message kind round-trips; anything malformed is a ProtocolError.

The bodies of the hand-made frames are packed with msgpack-python, an implementation
independent of the one the protocol uses (msgspec), as the previous versions of the
services packed theirs.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import msgpack
import msgspec
import pytest

from shared import protocol
from shared.protocol import MAX_MESSAGE_BYTES, ProtocolError, decode, encode

SAMPLES: dict[Any, Any] = {int: 7, str: "x ü $(rm) 'q'", float: 1.5, bool: True,
                           dict[str, Any]: {"a": 1, "nested": {"b": [1, 2]}},
                           dict[str, int]: {"videos": 3, "other": 0},
                           list[str]: ["ani-cli", "-S", "1"], list[int]: [3, 12]}


def kinds_of(annotation: Any) -> tuple[Any, ...]:
    """``float | None`` -> (float, NoneType); ``list[str]`` -> (list[str],)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def fields(cls: type) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(cls)


def sample(cls: type) -> protocol.Message:
    return cls(**{f.name: SAMPLES[kinds_of(f.type)[0]] for f in fields(cls)})


def frames(kind: str, body: object) -> list[bytes]:
    return [kind.encode(), msgpack.packb(body, use_bin_type=True)]


@pytest.mark.parametrize("kind", protocol.kinds())
def test_every_kind_round_trips(kind: str) -> None:
    cls = protocol.message_class(kind)
    msg = sample(cls)
    wire = encode(msg)
    assert wire[0] == kind.encode()
    assert decode(wire) == msg
    assert decode(list(wire)).KIND == kind


@pytest.mark.parametrize("kind", protocol.kinds())
def test_the_wire_is_a_plain_msgpack_map_with_the_version(kind: str) -> None:
    """What a peer of an earlier version (msgpack-python, ``v`` last) sends decodes, and
    what this version sends is the map such a peer reads: mixed versions keep talking."""
    msg = sample(protocol.message_class(kind))
    body = msgpack.unpackb(encode(msg)[1], raw=False)
    assert body == {"v": protocol.VERSION, **msg.as_dict()}
    old_style = {**msg.as_dict(), "v": protocol.VERSION}
    assert decode(frames(kind, old_style)) == msg


def test_the_registry_knows_the_conversation() -> None:
    assert {"worker.ready", "worker.bye", "job.assign", "job.heartbeat", "job.finished",
            "job.commit", "job.landed", "job.failed", "job.ack", "job.cancel", "disk.state",
            "disk.measure", "status.request", "status.reply"} <= set(protocol.kinds())


def test_optional_fields_take_their_defaults_and_extra_fields_are_ignored() -> None:
    body = {"v": protocol.VERSION, "worker_id": "w", "session": "s", "seq": 1, "future": 3,
            "future_table": {"nested": [1, {"x": None}]}}
    assert decode(frames("worker.ready", body)) == protocol.WorkerReady("w", "s", 1, "")


def test_a_default_list_is_fresh_for_each_message() -> None:
    a = protocol.JobFailed("w", "s", 1, 1, "error", "boom")
    a.argv.append("x")
    assert protocol.JobFailed("w", "s", 1, 1, "error", "boom").argv == []


def test_messages_are_frozen() -> None:
    msg = protocol.JobAck(job_id=1, attempt=2)
    with pytest.raises(AttributeError):
        msg.attempt = 3  # type: ignore[misc]
    assert hash(msg) == hash(protocol.JobAck(1, 2))


def _wrong_values(annotation: Any) -> list[object]:
    allowed = kinds_of(annotation)
    wrong: list[object] = [b"\x00bytes"]
    wrong.append("text" if int in allowed or float in allowed else 1)
    wrong.append("text" if bool in allowed else True)
    if type(None) not in allowed:
        wrong.append(None)
    if list[str] in allowed:
        wrong += [["ok", 1], [None]]  # the items are checked too
    if dict[str, int] in allowed:
        wrong += [{"videos": "3"}, {"videos": 1.5}, {1: 3}]
    if dict[str, Any] in allowed:
        wrong.append({1: "int key"})
    return wrong


def _bad_bodies(kind: str) -> list[tuple[str, object]]:
    cls = protocol.message_class(kind)
    good = msgpack.unpackb(encode(sample(cls))[1], raw=False)
    bad: list[tuple[str, object]] = [("not a map", [1, 2]), ("no version", {
        k: v for k, v in good.items() if k != "v"}), ("wrong version", {**good, "v": 99}),
        ("version not a number", {**good, "v": "1"})]
    for f in fields(cls):
        if f.required:
            bad.append((f"missing {f.name}", {k: v for k, v in good.items() if k != f.name}))
        for value in _wrong_values(f.type):
            bad.append((f"{f.name}={value!r}", {**good, f.name: value}))
    return bad


@pytest.mark.parametrize("kind", protocol.kinds())
def test_malformed_bodies_are_refused(kind: str) -> None:
    for what, body in _bad_bodies(kind):
        with pytest.raises(ProtocolError):
            decode(frames(kind, body))
            pytest.fail(f"{kind}: accepted {what}")


def test_the_error_names_the_kind_and_the_field() -> None:
    body = {"v": 1, "worker_id": "w", "session": "s", "job_id": 1, "attempt": 1,
            "reason": "dry_run", "error": "", "argv": ["ani-cli", 3]}
    with pytest.raises(ProtocolError, match=r"^job.failed: .*`\$\.argv\[1\]`"):
        decode(frames("job.failed", body))
    with pytest.raises(ProtocolError, match="^job.ack: unsupported protocol version 2$"):
        decode(frames("job.ack", {"v": 2, "job_id": 1, "attempt": 1}))


@pytest.mark.parametrize("wire", [
    [],
    [b"worker.ready"],
    [b"worker.ready", b"\x81", b"extra"],
    [b"no.such.kind", msgpack.packb({"v": 1})],
    [b"\xff\xfe", msgpack.packb({"v": 1})],
    [b"worker.ready", b"\xc1garbage"],
    [b"worker.ready", b"\x92\x01"],  # truncated msgpack
    [b"worker.ready", b""],
    [b"worker.ready", msgpack.packb({1: "int key", "v": 1})],
    [b"status.request", b"x" * (MAX_MESSAGE_BYTES + 1)],
], ids=["no frames", "one frame", "three frames", "unknown kind", "kind not ascii",
        "garbage body", "truncated body", "empty body", "int map key", "oversized"])
def test_malformed_frames_are_refused(wire: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(wire)
