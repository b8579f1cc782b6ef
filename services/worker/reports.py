"""The messages that end an attempt, re-sent until the dispatcher answers them.

The pending report (the current attempt's JobFinished or JobFailed) is re-sent every
``RESEND_SECONDS`` until its answer (JobCommit, JobCancel or JobAck) comes; landings
until their JobAck, while the next job may already run: the worker asks for work
right behind each landing (one exchange fewer per job). Usually one landing; more only
if the dispatcher dropped a landing it could not record (a busy database) but handed
out the next job. So a dispatcher restart loses nothing.
"""

from __future__ import annotations

from shared.protocol import JobLanded, Message
from shared.timers import Timers

RESEND_SECONDS = 1.0
PENDING, LANDINGS = "resend", "landings"  # their timers


class Reports:
    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self.pending: Message | None = None
        self.landings: dict[tuple[int, int], JobLanded] = {}

    @property
    def empty(self) -> bool:
        return self.pending is None and not self.landings

    def report(self, msg: Message, now: float) -> Message:
        """``msg`` waits for its answer; returns it, to be sent now."""
        self.pending = msg
        self.timers.start(PENDING, now, RESEND_SECONDS)
        return msg

    def landed(self, msg: JobLanded, now: float) -> JobLanded:
        """A landing waits for its ack; returns it, to be sent now."""
        self.landings[(msg.job_id, msg.attempt)] = msg
        self.timers.start(LANDINGS, now, RESEND_SECONDS)
        return msg

    def acked_landing(self, job_id: int, attempt: int) -> bool:
        """True if the ack was for a landing (which is then done with)."""
        if self.landings.pop((job_id, attempt), None) is None:
            return False
        if not self.landings:
            self.timers.cancel(LANDINGS)
        return True

    def answers_pending(self, job_id: int, attempt: int) -> bool:
        p = self.pending
        return p is not None and (p.job_id, p.attempt) == (job_id, attempt)

    def clear_pending(self) -> None:
        self.pending = None
        self.timers.cancel(PENDING)

    def due(self, now: float) -> list[Message]:
        """What is to be sent again now."""
        out: list[Message] = []
        if self.pending is not None and self.timers.due(PENDING, now):
            self.timers.start(PENDING, now, RESEND_SECONDS)
            out.append(self.pending)
        if self.landings and self.timers.due(LANDINGS, now):
            self.timers.start(LANDINGS, now, RESEND_SECONDS)
            out.extend(self.landings.values())
        return out
