"""Every registered message kind round-trips; anything malformed is a ProtocolError."""

from __future__ import annotations

import msgpack
import pytest

from shared import protocol
from shared.protocol import MAX_MESSAGE_BYTES, ProtocolError, decode, encode

SAMPLES = {"int": 7, "str": "x ü $(rm) 'q'", "float": 1.5, "bool": True,
           "dict": {"a": 1, "nested": {"b": [1, 2]}}, "list": ["a", 1]}


def sample(cls: type) -> protocol.Message:
    values = {}
    for name, annotation in cls._field_types.items():
        values[name] = SAMPLES[annotation.split("|")[0].strip()]
    return cls(**values)


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


def test_the_registry_knows_the_conversation() -> None:
    assert {"worker.ready", "worker.bye", "job.assign", "job.heartbeat", "job.finished",
            "job.commit", "job.landed", "job.failed", "job.ack", "job.cancel", "disk.state",
            "disk.measure", "status.request", "status.reply"} <= set(protocol.kinds())


def test_optional_fields_take_their_defaults_and_extra_fields_are_ignored() -> None:
    body = {"v": protocol.VERSION, "worker_id": "w", "session": "s", "seq": 1, "future": 3}
    assert decode(frames("worker.ready", body)) == protocol.WorkerReady("w", "s", 1, "")


def _bad_bodies(kind: str) -> list[tuple[str, object]]:
    cls = protocol.message_class(kind)
    good = {k: v for k, v in msgpack.unpackb(encode(sample(cls))[1]).items()}
    bad: list[tuple[str, object]] = [("not a map", [1, 2]), ("no version", {
        k: v for k, v in good.items() if k != "v"}), ("wrong version", {**good, "v": 99})]
    for name, allowed in cls._field_types.items():
        if name not in cls._field_defaults:
            bad.append((f"missing {name}", {k: v for k, v in good.items() if k != name}))
        wrong = [1 if "int" not in allowed and "float" not in allowed else "text",
                 b"\x00bytes", True if "bool" not in allowed else "text"]
        for value in wrong:
            bad.append((f"{name}={value!r}", {**good, name: value}))
    return bad


@pytest.mark.parametrize("kind", protocol.kinds())
def test_malformed_bodies_are_refused(kind: str) -> None:
    for what, body in _bad_bodies(kind):
        with pytest.raises(ProtocolError):
            decode(frames(kind, body))
            pytest.fail(f"{kind}: accepted {what}")


@pytest.mark.parametrize("wire", [
    [],
    [b"worker.ready"],
    [b"worker.ready", b"\x81", b"extra"],
    [b"no.such.kind", msgpack.packb({"v": 1})],
    [b"\xff\xfe", msgpack.packb({"v": 1})],
    [b"worker.ready", b"\xc1garbage"],
    [b"worker.ready", b"\x92\x01"],  # truncated msgpack
    [b"worker.ready", msgpack.packb({1: "int key", "v": 1})],
    [b"status.request", b"x" * (MAX_MESSAGE_BYTES + 1)],
], ids=["no frames", "one frame", "three frames", "unknown kind", "kind not ascii",
        "garbage body", "truncated body", "int map key", "oversized"])
def test_malformed_frames_are_refused(wire: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(wire)
