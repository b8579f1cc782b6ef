"""The poll loops' timers: named deadlines on a clock the test owns."""

from __future__ import annotations

import math

from shared.timers import Timers


def test_a_timer_comes_due_at_its_time_and_stays_due_until_re_armed() -> None:
    t = Timers()
    t.start("beat", 100.0, 2.0)
    assert not t.due("beat", 101.999)
    assert t.due("beat", 102.0)
    assert t.due("beat", 103.0)
    t.start("beat", 103.0, 2.0)
    assert not t.due("beat", 104.0) and t.left("beat", 104.0) == 1.0


def test_an_unarmed_or_cancelled_timer_is_never_due() -> None:
    t = Timers()
    assert not t.due("resend", 1e12) and t.left("resend", 0.0) == math.inf
    t.at("resend", 5.0)
    t.cancel("resend")
    assert not t.armed("resend") and not t.due("resend", 10.0)


def test_the_poll_waits_for_the_soonest_timer_rounded_up_and_capped() -> None:
    t = Timers()
    assert t.wait_ms(0.0) is None  # nothing armed: wait for ever
    assert t.wait_ms(0.0, cap=5.0) == 5000
    t.start("beat", 0.0, 2.0)
    t.start("resend", 0.0, 0.0004)
    assert t.soonest(0.0) == 0.0004 and t.wait_ms(0.0) == 1  # never wakes just before it
    t.cancel("resend")
    assert t.wait_ms(1.5) == 500
    assert t.wait_ms(3.0) == 0  # overdue: do not sleep
