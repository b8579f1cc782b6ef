"""The human-readable rendering of a status document (``anime-status`` without ``--json``).

Fits 80 columns (a line is never longer than ``MAX_WIDTH``); sizes are decimal
(1 MB = 1,000,000 bytes), times are the local clock. Each busy worker takes two
lines: what it downloads, then a progress bar line.
"""

from __future__ import annotations

import textwrap
import time

WIDTH = 80
MAX_WIDTH = 100
BAR_WIDTH = 24
LABEL = 11  # "last hour  " and the indent of continuation lines


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # not reached


def human_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = max(0, int(s))
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def clock(at: float | None, now: float | None = None) -> str:
    """Local time of day; with the date when it is not today."""
    if at is None:
        return "?"
    when = time.localtime(at)
    if now is not None and time.localtime(now)[:3] != when[:3]:
        return time.strftime("%Y-%m-%d %H:%M:%S", when)
    return time.strftime("%H:%M:%S", when)


def bar(percent: float | None, width: int = BAR_WIDTH, mark: float | None = None) -> str:
    """``[#####-----]``; unknown percent: ``[?????]``; ``mark`` (a percent) shows as ``|``."""
    if percent is None:
        return "[" + "?" * width + "]"
    filled = int(width * min(max(percent, 0.0), 100.0) / 100)
    cells = ["#"] * filled + ["-"] * (width - filled)
    if mark is not None and 0 <= mark < 100:
        at = int(width * mark / 100)
        if at >= filled:
            cells[at] = "|"
    return "[" + "".join(cells) + "]"


def clip(line: str, width: int = MAX_WIDTH) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def _label(name: str, text: str) -> str:
    return f"{name:<{LABEL}}{text}"


def _more(text: str) -> str:
    return " " * LABEL + text


def _packed(parts: list[str], prefix: str = "") -> list[str]:
    """Continuation lines: ``prefix`` then ``parts`` joined by ", ", wrapped at WIDTH."""
    lines, line = [], prefix
    for i, part in enumerate(parts):
        if i and LABEL + len(line) + 2 + len(part) > WIDTH:
            lines.append(_more(line + ","))
            line = part
        else:
            line += (", " if i else "") + part
    return lines + [_more(line)] if line else lines


def _queue(q: dict, now: float | None) -> list[str]:
    if "counted_at" in q and q["counted_at"] is None:  # a dispatcher that just started
        return [_label("queue", "not counted yet (the first count since the start runs)")]
    cancelled = f", {q['cancelled']} cancelled" if q.get("cancelled") else ""
    lines = [_label("queue", f"{q.get('queued', 0)} queued, {q.get('downloading', 0)} downloading, "
                             f"{q.get('downloaded', 0)} downloaded, {q.get('failed', 0)} failed"
                             f"{cancelled}")]
    waiting, backing = q.get("waiting_for_selection", 0), q.get("backing_off", 0)
    unreleased = q.get("waiting_for_release") or 0
    if waiting or backing or unreleased:
        retry = f" (next retry {clock(q['next_retry_at'], now)})" if q.get("next_retry_at") else ""
        lines += _packed([f"{waiting} wait for a selection", f"{backing} back off{retry}"]
                         + _release_wait(q, now), "of which ")
    lines += _backoff_reasons(q.get("backoff_reasons") or [], now)
    if q.get("other_stages"):
        lines += _packed([f"{k} {v}" for k, v in sorted(q["other_stages"].items())], "other stages: ")
    if q.get("priorities"):
        lines += _packed([f"{p.get('anime_title') or p.get('anime_id')} {_priority(p.get('priority'))}"
                          f" ({p.get('jobs')} to do)" for p in q["priorities"]], "priority: ")
    return lines


def _priority(value: object) -> str:
    return {10: "high", -10: "low"}.get(value, f"{value}") if isinstance(value, int) else "?"


def _pause(pause: dict, bandwidth: dict, now: float | None) -> list[str]:
    """The operator's pause and a bandwidth limit changed at run time, when there are."""
    lines = []
    if pause.get("paused"):
        until = f" until {clock(pause['until'], now)}" if pause.get("until") else " until resumed"
        since = f" since {clock(pause['at'], now)}" if pause.get("at") else ""
        by = f" by {pause['by']}" if pause.get("by") else ""
        lines.append(_label("paused", f"by the operator{since}{until}"))
        if by:
            lines.append(_more(f"asked{by}" + ("; running downloads were interrupted"
                                               if pause.get("interrupted") else "")))
    if bandwidth.get("changed"):
        def mbps(value: object) -> str:
            return f"{value:g} Mbps" if isinstance(value, (int, float)) and value > 0 else "unlimited"
        lines.append(_label("bandwidth", f"{mbps(bandwidth.get('total_mbps'))} (config.toml: "
                                         f"{mbps(bandwidth.get('configured_mbps'))}) until a restart"))
    return lines


def _backoff_reasons(reasons: list[dict], now: float | None) -> list[str]:
    """Why jobs back off: each reason with its count and soonest retry, wrapped."""
    lines = []
    for r in reasons:
        retry = f" (next retry {clock(r['next_retry_at'], now)})" if r.get("next_retry_at") else ""
        lines += [_more(part) for part in textwrap.wrap(
            f"backing off: {r.get('count', 0)} x {r.get('reason') or '?'}{retry}",
            WIDTH - LABEL, subsequent_indent="  ")]
    return lines


# --- failures that know what they are (docs/failures.md) --------------------------

CLASS_WORDS = {"not_released": "not released", "selection": "selection",
               "transient": "transient", "cloudflare": "Cloudflare", "other": "other"}


def _release_wait(q: dict, now: float | None) -> list[str]:
    n = q.get("waiting_for_release") or 0
    if not n:
        return []
    recheck = f" (next re-check {clock(q['next_recheck_at'], now)})" if q.get("next_recheck_at") else ""
    return [f"{n} wait{'s' if n == 1 else ''} for a release{recheck}"]


def _failure_classes(status: dict, now: float | None) -> list[str]:
    """Failed attempts of the last hour by class, the hosts held after a Cloudflare block,
    the anime whose selection needs a review."""
    classes = status.get("failure_classes") or {}
    lines = []
    counts = [(CLASS_WORDS.get(k, k), n) for k, n in (classes.get("last_hour") or {}).items() if n]
    if counts:
        lines.append(_label("classes", "failed attempts in the last hour:"))
        lines += _packed([f"{n} {word}" for word, n in counts])
    for hold in classes.get("cloudflare_holds") or []:
        host = hold.get("host") or "(no host name)"
        lines.append(_label("held", f"host {host}: Cloudflare block, no start before "
                                    f"{clock(hold.get('until'), now)}"))
    review = status.get("selection_review") or []
    if review:
        lines.append(_label("review", "needs a selection review (search or -S found nothing):"))
    for r in review:
        n = r.get("failed", 0)
        tail = f" (MAL ID {r.get('anime_id')}, {n} failed job{'s' if n != 1 else ''})"
        title = str(r.get("anime_title") or "?")
        room = WIDTH - LABEL - 2 - len(tail)
        if len(title) > room:
            title = title[: max(room - 3, 8)] + "..."
        lines.append(_more("  " + title + tail))
    return lines


def _worker(w: dict, id_width: int) -> list[str]:
    head = f"  {w['id']:<{id_width}}  {w['state']:<11}  "
    job = w.get("job")
    if not job:
        return [head.rstrip()]
    right = f"  job {job['id']}, {human_seconds(job.get('running_seconds'))}"
    title = f"{job.get('anime_title') or '?'} ep {job.get('episode')}"
    room = WIDTH - len(head) - len(right)
    if len(title) > room:
        title = title[: max(room - 3, 8)] + "..."
    first = head + title.ljust(room) + right
    percent = job.get("percent")
    pct = f"{percent:5.1f}%" if percent is not None else "    ?%"
    speed = f"{human_bytes(job['speed_bps'])}/s" if job.get("speed_bps") else "-"
    second = (" " * (4 + id_width) + f"{bar(percent)} {pct}  {human_bytes(job.get('bytes'))}  "
              f"{speed}  ETA {human_seconds(job.get('eta_seconds'))}")
    return [first, second]


def _workers(workers: list[dict]) -> list[str]:
    states: dict[str, int] = {}
    for w in workers:
        states[w["state"]] = states.get(w["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    lines = [_label("workers", f"{len(workers)} connected" + (f" ({summary})" if summary else ""))]
    id_width = max((len(str(w["id"])) for w in workers), default=3)
    for w in workers:
        lines += _worker(w, id_width)
    return lines


def _disk(d: dict) -> list[str]:
    hard = d.get("hard_limit_bytes")
    usage = d.get("usage_bytes")
    percent = 100 * usage / hard if usage is not None and hard else None
    pause_mark = 100 * d["pause_threshold_bytes"] / hard if hard and d.get("pause_threshold_bytes") else None
    lines = [_label("disk", f"{d.get('state', 'unknown') + ' ':<10}{bar(percent, mark=pause_mark)} "
                            f"{human_bytes(usage)} of {human_bytes(hard)} hard limit"),
             _more(f"pause at {human_bytes(d.get('pause_threshold_bytes'))}, resume below "
                   f"{human_bytes(d.get('resume_threshold_bytes'))}; reserved "
                   f"{human_bytes(d.get('reserved_bytes'))}, free {human_bytes(d.get('free_bytes'))}")]
    reason = d.get("reason") if d.get("state") == "unavailable" else None
    if reason:  # right under the state: what to check (a path, a mount)
        lines[1:1] = [_more(part) for part in textwrap.wrap(
            f"storage unavailable: {reason}", WIDTH - LABEL, subsequent_indent="  ")]
    if d.get("breakdown"):
        lines += _packed([f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in d["breakdown"].items()])
    if d.get("refusal") and not (reason and reason in d["refusal"]):
        lines += [_more(part) for part in textwrap.wrap(f"not starting downloads: {d['refusal']}",
                                                        WIDTH - LABEL, subsequent_indent="  ")]
    return lines


def _failures(failures: list[dict], now: float | None) -> list[str]:
    lines = []
    for i, f in enumerate(failures):
        messages = [m.strip() for m in (f.get("error") or "").splitlines() if m.strip()]
        at = f" at {clock(f['at'], now)}" if f.get("at") else ""
        head = f"job {f['id']} {f.get('anime_title') or '?'} ep {f.get('episode')}{at}:"
        first = messages[0] if messages else "no message"
        why = messages[-1:] if len(messages) > 1 else []  # the first line says what, the last why
        if LABEL + len(head) + 1 + len(first) <= WIDTH:
            head, shown = f"{head} {first}", why
        else:
            shown = [first] + why
        lines.append(_label("failures", head) if i == 0 else _more(head))
        lines += [_more("  " + m) for m in shown]
    return lines


def _mismatches(mismatches: list[dict], now: float | None) -> list[str]:
    """Episodes that landed from a show whose site title is not the selected one."""
    lines = []
    for i, m in enumerate(mismatches):
        at = f" at {clock(m['at'], now)}" if m.get("at") else ""
        head = f"job {m['id']} {m.get('anime_title') or '?'} ep {m.get('episode')}{at}:"
        lines.append(_label("titles", head) if i == 0 else _more(head))
        lines.append(_more(f"  site {m.get('site_title')!r}, selected {m.get('selected_title')!r}"))
    return lines


def _database(db: dict, now: float | None) -> list[str]:
    """One line, only while the database refuses the dispatcher's writes."""
    if not db.get("busy_since"):
        return []
    waiting = db.get("pending_writes") or 0
    lines = [f"database busy since {clock(db['busy_since'], now)}" + (
        f" ({waiting} write{'s' if waiting != 1 else ''} waiting)" if waiting else "")]
    if db.get("error"):
        lines += [_more(part) for part in textwrap.wrap(
            f"{db['error']}; the dispatcher retries its writes until they are done",
            WIDTH - LABEL, subsequent_indent="  ")]
    return lines


def render_text(status: dict) -> str:
    now = status.get("generated_at")
    disp = status.get("dispatcher") or {}
    flags = [f for f, on in (("dry run", disp.get("dry_run")), ("stopping", disp.get("stopping"))) if on]
    if disp.get("anime_id") is not None:
        flags.append(f"anime {disp['anime_id']} only")
    lines = [f"anime-downloader at {clock(now)}" + (f" ({', '.join(flags)})" if flags else "")]
    lines += _database(status.get("database") or {}, now)
    lines += _pause(status.get("pause") or {}, status.get("bandwidth") or {}, now)
    lines += _queue(status.get("queue") or {}, now)
    lines += _workers(status.get("workers") or [])
    lines += _disk(status.get("disk") or {})
    hour = status.get("last_hour") or {}
    lines.append(_label("last hour", f"{hour.get('downloaded', 0)} episodes downloaded, average "
                                     f"{human_bytes(hour.get('average_size_bytes'))}"))
    lines += _failures(status.get("recent_failures") or [], now)
    lines += _failure_classes(status, now)
    lines += _mismatches(status.get("title_mismatches") or [], now)
    return "\n".join(clip(line) for line in lines)


def render_queue_from_database(q: dict, db_path: str, now: float) -> str:
    """The queue lines alone, as read from jobs.db while no dispatcher answers (anime-status)."""
    lines = [f"from {db_path} (read-only: the dispatcher is not answering) at {clock(now)}"]
    lines += _queue(q, now)
    return "\n".join(clip(line) for line in lines)
