"""The workers the dispatcher talks to: one live session per worker id.

A session is one worker process, ``<worker_id>/<session>`` as its ZeroMQ routing
id. A new session of a worker id in use is a restart only if every other session
of that id is gone: not connected any more (the ROUTER cannot route to it), or
silent for lease_seconds. Otherwise two live processes share the id (an orphan
left by a crashed launcher, a copy on another machine): the newcomer is refused,
so they never take each other's leases. A worker id is also bound to the CURVE
key that used it first, for as long as a session or a lease of it exists: another
authorised machine cannot speak for it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from shared.logfmt import kv
from shared.protocol import (JobAck, JobCancel, JobFailed, JobFinished, JobHeartbeat,
                             JobLanded, Message, WorkerReady, WorkerRefused)
from services.dispatcher.leases import owner_worker_id

log = logging.getLogger(__name__)
REFUSAL_LOG_SECONDS = 60.0

Outgoing = tuple[bytes, Message]


@dataclass
class WorkerSeen:
    worker_id: str
    host: str
    last_seen: float
    state: str = "idle"


def always_connected(identity: bytes) -> bool:
    return True


@dataclass
class Sessions:
    lease_seconds: float
    # Whether a session is still connected (the server asks its ROUTER); tests say it.
    connected: Callable[[bytes], bool] = always_connected
    workers: dict[bytes, WorkerSeen] = field(default_factory=dict)
    idle: OrderedDict = field(default_factory=OrderedDict)  # identity -> (seq, seen_at)
    consumed_seq: dict[bytes, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # worker id -> CURVE key ("" local)
    _logged: dict[tuple[bytes, str], float] = field(default_factory=dict)

    def admit(self, identity: bytes, key: str, msg: Message, now: float,
              lease_owners: Callable[[], list[bytes]]) -> tuple[str | None, list[bytes]]:
        """``(refusal, gone)``: why ``identity`` may not speak for its worker id (or None:
        it is then registered), and the other sessions of its id that are gone, whose
        leases go back at once. ``lease_owners()``: the owners of the leases still running
        (asked only for a session not seen before)."""
        worker_id = owner_worker_id(identity)
        if msg.worker_id != worker_id:
            return (f"worker_id {msg.worker_id!r} is not the one of the connection's identity "
                    f"{identity.decode('utf-8', 'replace')!r}"), []
        bound = self.keys.get(worker_id)
        if bound is not None and bound != key:
            return (f"worker id {worker_id} is in use by another machine (another CURVE key); "
                    "give each worker a unique --worker-id"), []
        if identity in self.workers:
            return None, []
        gone: list[bytes] = []
        owners = lease_owners()
        if identity not in owners:  # a lease is proof enough (e.g. re-adopted after our restart)
            others = {i for i in self.workers if owner_worker_id(i) == worker_id}
            others |= {o for o in owners if o != identity and owner_worker_id(o) == worker_id}
            live = sorted(i for i in others if self._live(i, now))
            if live:
                return (f"another worker with id {worker_id} is running (session "
                        f"{live[0].decode('utf-8', 'replace')}); give each worker a unique "
                        "--worker-id"), []
            gone = sorted(others)
        self.keys[worker_id] = key
        self.workers[identity] = WorkerSeen(worker_id, getattr(msg, "host", ""), now)
        log.info(kv("worker connected", worker_id=worker_id, owner=identity.decode()))
        return None, gone

    # --- credits: a worker that said it is idle may be handed one job -------------

    def credit(self, identity: bytes, msg: WorkerReady, now: float) -> bool:
        """A WorkerReady: the worker is idle; True if it is a new credit (each idle
        period has its own seq: a repeat of one already used is none)."""
        self.workers[identity].state = "idle"
        if msg.seq <= self.consumed_seq.get(identity, -1):
            return False
        if identity not in self.idle:
            log.debug(kv("worker idle", worker_id=msg.worker_id, seq=msg.seq))
        self.idle[identity] = (msg.seq, now)
        return True

    def used(self, identity: bytes, seq: int) -> None:
        """The credit ``seq`` was spent on a job."""
        del self.idle[identity]
        self.consumed_seq[identity] = seq

    def busy(self, identity: bytes, state: str) -> None:
        """A heartbeat of a job: the worker holds no credit, and says what it is doing."""
        self.idle.pop(identity, None)
        self.workers[identity].state = state

    def _live(self, identity: bytes, now: float) -> bool:
        seen = self.workers.get(identity)
        if seen is not None and now - seen.last_seen > self.lease_seconds:
            return False
        return not identity.startswith(b"unknown") and self.connected(identity)

    def forget(self, identity: bytes, lease_owners: Iterable[bytes]) -> None:
        """Drop a session; its worker id's key binding goes with the id's last session
        and lease."""
        self.workers.pop(identity, None)
        self.idle.pop(identity, None)
        self.consumed_seq.pop(identity, None)
        worker_id = owner_worker_id(identity)
        if worker_id in self.keys and not any(
                owner_worker_id(i) == worker_id for i in (*self.workers, *lease_owners)):
            del self.keys[worker_id]

    def silent(self, now: float) -> list[bytes]:
        """Sessions not heard from for lease_seconds."""
        stale = now - self.lease_seconds
        return [i for i, w in self.workers.items() if w.last_seen < stale]

    def refuse(self, identity: bytes, msg: Message, reason: str, now: float) -> list[Outgoing]:
        """The answer to a refused session: WorkerRefused, and what ends its re-sends."""
        logged = (identity, reason)
        if now - self._logged.get(logged, -1e18) >= REFUSAL_LOG_SECONDS:
            if len(self._logged) > 1000:
                self._logged.clear()
            self._logged[logged] = now
            log.warning(kv("refused a worker", worker_id=owner_worker_id(identity),
                           owner=identity.decode("utf-8", "replace"), kind=msg.KIND, reason=reason))
        out: list[Outgoing] = [(identity, WorkerRefused(worker_id=owner_worker_id(identity),
                                                        reason=reason))]
        if isinstance(msg, (JobHeartbeat, JobFinished)):  # whatever it runs is not its job
            out.append((identity, JobCancel(job_id=msg.job_id, attempt=msg.attempt, reason=reason)))
        elif isinstance(msg, (JobLanded, JobFailed)):  # nothing recorded; stop re-sending
            out.append((identity, JobAck(job_id=msg.job_id, attempt=msg.attempt)))
        return out
