"""Every ZeroMQ message of the system, defined once.

A message travels as two frames, ``[kind, body]``: the kind as ASCII bytes (so a
SUB prefix filter works) and the body a msgpack map carrying ``v`` (the protocol
version) and the message's fields. ``decode`` checks the kind, the version and
every field's type and raises ``ProtocolError`` for anything else; callers log
and drop such frames. The messages are msgspec Structs: typed, frozen, and encoded
and validated by msgspec's msgpack codec in C. This is the only module that knows
the wire format.

Conversation between a worker (DEALER) and the dispatcher (ROUTER)::

    worker                         dispatcher
    WorkerReady(seq)        ->                      "I hold nothing; give me one job"
                            <-     JobAssign         a lease: job_id + attempt
    JobHeartbeat (every ~2s)->                      extends the lease, carries progress
    JobFinished             ->                      file verified, staged in private dir
                            <-     JobCommit         lease still ours: rename into place
                            <-     JobCancel         lease lost: discard the file
    JobLanded               ->                      renamed; dispatcher records downloaded
    JobFailed               ->                      error / timeout / interrupted / ...
                            <-     JobAck            terminal message recorded
    WorkerBye               ->                      worker is exiting
                            <-     WorkerRefused     worker id in use by another live
                                                     session (or another CURVE key)
                            <-     WorkerProbe       (to an older session of an id) still
                                                     connected? no answer expected

Terminal answers wait for the database: JobAck only once what it acknowledges has
been committed (a neighbour may hold the database's lock for seconds), so the
worker's re-sends are what carries a landing or a failure across that wait.

Terminal messages (finished, landed, failed) are re-sent until answered, so a
dispatcher restart loses nothing; the dispatcher treats repeats idempotently.
After a landing the worker holds nothing, so its next WorkerReady follows right
behind the JobLanded (which it re-sends until acked, even while the next job
runs): the dispatcher reads both in one wake-up and answers ack and job together.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

VERSION = 1
MAX_MESSAGE_BYTES = 256 * 1024  # also ZMQ_MAXMSGSIZE (+1 KiB) on every bound socket

# Why a job attempt ended without a file (JobFailed.reason). Only ERROR and
# TIMEOUT count towards max_retries; the others hand the job back untouched.
REASON_ERROR = "error"
REASON_TIMEOUT = "timeout"
REASON_INTERRUPTED = "interrupted"  # operator stop: SIGTERM to the worker
REASON_NO_SPACE = "no_space"  # ENOSPC while writing
REASON_HARD_LIMIT = "hard_limit"  # aborted because usage reached hard_limit_gb
REASON_INVALID = "invalid"  # the job row itself cannot be run; fails at once
REASON_DRY_RUN = "dry_run"  # --dry-run: argv carries the command it would have run
# The storage is not there (missing, lost its marker, read-only, failing: shared/storage.py):
# not the job's fault, so not counted; the dispatcher waits for the disk-watcher's next word.
REASON_STORAGE = "storage_unavailable"
FAIL_REASONS = (REASON_ERROR, REASON_TIMEOUT, REASON_INTERRUPTED, REASON_NO_SPACE,
                REASON_HARD_LIMIT, REASON_INVALID, REASON_DRY_RUN, REASON_STORAGE)


class ProtocolError(ValueError):
    """A frame that is not a valid message of this protocol."""


class Message(msgspec.Struct, frozen=True, tag_field="v", tag=VERSION):
    """Base of all messages; subclasses declare KIND (with @message) and typed fields.

    The version travels as msgspec's tag field: the encoder writes ``v`` into every
    body, and a decoder refuses a body whose ``v`` is another. Fields unknown to this
    version are skipped, not refused (no ``forbid_unknown_fields``): a newer peer may
    add optional fields, and mixed versions keep talking.
    """

    KIND: ClassVar[str] = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a new dict (shallow: values are not copied)."""
        return msgspec.structs.asdict(self)


class _Envelope(msgspec.Struct):
    """What every body must carry whatever its kind: msgspec takes a missing tag for
    the expected one, so a body without ``v`` is caught here."""

    v: int


_REGISTRY: dict[str, type[Message]] = {}
_DECODERS: dict[str, msgspec.msgpack.Decoder] = {}  # made on first use: a CLI decodes one kind
_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)
_ENCODER = msgspec.msgpack.Encoder()


def message(kind: str):
    """Class decorator: register a Message subclass as the message ``kind``."""

    def register(cls: type[Message]) -> type[Message]:
        cls.KIND = kind
        if kind in _REGISTRY:
            raise RuntimeError(f"duplicate message kind {kind}")
        _REGISTRY[kind] = cls
        return cls

    return register


# --- worker <-> dispatcher ---------------------------------------------------

@message("worker.ready")
class WorkerReady(Message):
    """The worker holds no job and asks for one. ``seq`` grows with each idle
    period; repeats of one seq (re-sent while idle) are one credit, not many."""
    worker_id: str
    session: str
    seq: int
    host: str = ""


@message("worker.bye")
class WorkerBye(Message):
    worker_id: str
    session: str


@message("worker.refused")
class WorkerRefused(Message):
    """The dispatcher will not work with this session: its worker id is in use by
    another live session, or by another machine's CURVE key. The worker logs
    ``reason`` and keeps asking (it is taken once the other session is gone)."""
    worker_id: str
    reason: str


@message("worker.probe")
class WorkerProbe(Message):
    """Sent by the dispatcher to an older session of a worker id when a new one
    appears: only whether the ROUTER can still route it counts (a worker that is
    gone is not connected any more). Workers ignore it; no answer."""


@message("job.assign")
class JobAssign(Message):
    job_id: int
    attempt: int
    anime_id: int
    anime_title: str
    episode: int
    selected_index: int
    selected_title: str
    confidence: str
    lease_seconds: float
    rate_limit_bps: int  # 0 = unlimited; the worker's share of total_bandwidth_mbps
    dry_run: bool = False
    # Retries counted so far: attempt - 1 - retry_count earlier attempts ended without
    # counting one (stops, full disk...). The worker caps how many stops it cannot prove
    # were stops may go uncounted (services/worker/verdict.py).
    retry_count: int = 0
    # The id in the storage's marker (shared/storage.py): the worker writes nothing unless
    # storage_dir holds it, also on another machine that cannot read the installation's
    # record. "" (a dispatcher that never identified it): not checked.
    storage_id: str = ""


@message("job.heartbeat")
class JobHeartbeat(Message):
    worker_id: str
    session: str
    job_id: int
    attempt: int
    bytes: int
    percent: float | None = None
    speed_bps: float | None = None
    eta_seconds: float | None = None
    state: str = "downloading"  # downloading | verifying | stopping
    started_at: float = 0.0


@message("job.finished")
class JobFinished(Message):
    """A verified file waits in the job's private directory for the go-ahead."""
    worker_id: str
    session: str
    job_id: int
    attempt: int
    ext: str
    size_bytes: int
    duration_seconds: float | None = None
    site_title: str | None = None  # the site's title in the downloaded file's name
    title_mismatch: bool = False  # site_title is not the job's selected_title


@message("job.commit")
class JobCommit(Message):
    job_id: int
    attempt: int
    video_path: str


@message("job.landed")
class JobLanded(Message):
    worker_id: str
    session: str
    job_id: int
    attempt: int
    video_path: str
    size_bytes: int
    duration_seconds: float | None = None
    site_title: str | None = None  # as in JobFinished
    title_mismatch: bool = False


@message("job.failed")
class JobFailed(Message):
    worker_id: str
    session: str
    job_id: int
    attempt: int
    reason: str
    error: str
    argv: list[str] = []  # dry run: the command it would have run (a fresh list each)
    # What kind of failure the error is (shared/failures.py: not_released, selection,
    # transient, cloudflare, other); "" when not classified (a stop...) or from an older
    # worker: the dispatcher then classifies the error itself.
    failure_class: str = ""


@message("job.ack")
class JobAck(Message):
    job_id: int
    attempt: int


@message("job.cancel")
class JobCancel(Message):
    """Stop this attempt now (its process group is killed). ``keep_partials``: the partial
    files stay for a later attempt to resume (a lost lease, an operator's pause --now or a
    new bandwidth limit); False: they are deleted (an operator's cancel)."""
    job_id: int
    attempt: int
    reason: str
    keep_partials: bool = True


# --- disk-watcher ------------------------------------------------------------

@message("disk.state")
class DiskStateMsg(Message):
    """``state`` ``unavailable``: the storage is not there (``reason`` says why in one
    line); the measurement fields then describe whatever is at ``storage_dir``."""
    seq: int
    state: str  # running | paused | hard_limit | unavailable
    usage_bytes: int
    breakdown: dict[str, int]  # bytes per part of the storage (README: disk.breakdown)
    free_bytes: int
    pause_threshold_bytes: int
    resume_threshold_bytes: int
    hard_limit_bytes: int
    min_free_bytes: int
    measured_at: float
    published_at: float
    reason: str = ""  # why the storage is unavailable; "" otherwise
    storage_id: str = ""  # the storage's marker id ("" until identified)


@message("disk.usage")
class DiskUsageMsg(DiskStateMsg):
    """The same fields, published at the re-measures between two ``disk.state``
    publications (up to five a second while downloads run) for the dispatcher's
    admission. Workers subscribe to ``disk.state`` alone (on every change of state,
    and every second): they act on the state, not on every byte."""


@message("disk.measure")
class DiskMeasure(Message):
    """Ask the disk-watcher to re-measure now (a download landed, or the
    dispatcher is about to admit against an old measurement)."""
    reason: str
    requested_at: float = 0.0


# --- status probe ------------------------------------------------------------

@message("status.request")
class StatusRequest(Message):
    pass


@message("status.reply")
class StatusReply(Message):
    status: dict[str, Any]  # the document of anime-status --json


# --- operator controls (anime-ctl, anime-web) -> dispatcher ---------------------
# On the control endpoint ([zmq] control, a ROUTER the dispatcher binds); each request is
# answered with one ControlReply. ``source`` says who asks (``anime-ctl``, ``anime-web
# 127.0.0.1``): the dispatcher logs every action with it. The field names are those of
# services/controls.py, which parses anime-ctl's arguments and the web's JSON bodies.

@message("control.pause")
class ControlPause(Message):
    """No new download starts; ``duration_seconds``: resume by itself after that long;
    ``now``: also interrupt the running downloads (requeued, no retry counted)."""
    source: str
    duration_seconds: float | None = None
    now: bool = False


@message("control.resume")
class ControlResume(Message):
    source: str


@message("control.retry")
class ControlRetry(Message):
    """Exactly one of: every failed job, these job ids, or one anime's jobs."""
    source: str
    failed: bool = False
    job_ids: list[int] = []
    anime_id: int | None = None


@message("control.cancel")
class ControlCancel(Message):
    source: str
    job_id: int


@message("control.priority")
class ControlPriority(Message):
    """One anime's jobs (``anime_id``) or one job (``job_id``) get ``priority``."""
    source: str
    priority: int
    anime_id: int | None = None
    job_id: int | None = None


@message("control.bandwidth")
class ControlBandwidth(Message):
    """``total_bandwidth_mbps`` from now until the dispatcher restarts; 0 = unlimited."""
    source: str
    mbps: float


@message("control.reply")
class ControlReply(Message):
    """``message``: one line saying what was done (or why not); ``result``: its figures
    (``error``: ``bad_argument``, ``not_found``, ``conflict`` or ``unavailable`` when not ok)."""
    ok: bool
    message: str
    result: dict[str, Any] = {}


#: command name (anime-ctl's, /api/ctl/<command>) -> its request message
CONTROL_REQUESTS: dict[str, type[Message]] = {
    "pause": ControlPause, "resume": ControlResume, "retry": ControlRetry,
    "cancel": ControlCancel, "priority": ControlPriority, "bandwidth": ControlBandwidth,
}


def kinds() -> list[str]:
    return sorted(_REGISTRY)


def message_class(kind: str) -> type[Message]:
    return _REGISTRY[kind]


def encode(msg: Message) -> list[bytes]:
    return [msg.KIND.encode("ascii"), _ENCODER.encode(msg)]


def decode(frames: list[bytes]) -> Message:
    """Turn ``[kind, body]`` into its Message; raise ProtocolError on anything else:
    a wrong type anywhere in the body (``list[str]`` items included), a missing field,
    another version."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    raw_kind, raw_body = frames
    if len(raw_body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(raw_body)} bytes is over {MAX_MESSAGE_BYTES}")
    try:
        kind = raw_kind.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("kind is not ASCII") from None
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise ProtocolError(f"unknown kind {kind[:40]!r}")
    try:
        version = _ENVELOPE.decode(raw_body).v
        if version != VERSION:
            raise ProtocolError(f"{kind}: unsupported protocol version {version}")
        return _decoder(kind, cls).decode(raw_body)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{kind}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{kind}: body is not msgpack: {exc}") from None


def _decoder(kind: str, cls: type[Message]) -> msgspec.msgpack.Decoder:
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.msgpack.Decoder(cls)
    return decoder
