"""The human-readable rendering of a status document."""

from __future__ import annotations

import time

BAR_WIDTH = 24


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = int(s)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def bar(percent: float | None) -> str:
    if percent is None:
        return "[" + "?" * BAR_WIDTH + "]"
    filled = int(BAR_WIDTH * min(max(percent, 0.0), 100.0) / 100)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def _queue(q: dict) -> list[str]:
    line = (f"queue: {q['queued']} queued, {q['downloading']} downloading, "
            f"{q['downloaded']} downloaded, {q['failed']} failed, "
            f"{q['waiting_for_selection']} waiting for a selection, {q['backing_off']} backing off")
    lines = [line]
    if q.get("next_retry_at"):
        lines.append(f"  next retry at {time.strftime('%H:%M:%S', time.localtime(q['next_retry_at']))}")
    if q.get("other_stages"):
        lines.append("  other stages: " + ", ".join(f"{k}={v}" for k, v in sorted(q["other_stages"].items())))
    return lines


def _worker(w: dict) -> str:
    job = w.get("job")
    if not job:
        return f"  {w['id']:<8} {w['state']}"
    title = f"{job['anime_title']} ep {job['episode']}"
    pct = f"{job['percent']:5.1f}%" if job.get("percent") is not None else "  ?  %"
    speed = f"{human_bytes(job.get('speed_bps'))}/s" if job.get("speed_bps") else "-"
    return (f"  {w['id']:<8} {w['state']:<11} {bar(job.get('percent'))} {pct} "
            f"{human_bytes(job.get('bytes'))} {speed} ETA {human_seconds(job.get('eta_seconds'))} "
            f"({human_seconds(job.get('running_seconds'))}) {title}")


def _disk(d: dict) -> list[str]:
    lines = [f"disk: {d['state']}  usage {human_bytes(d['usage_bytes'])} "
             f"(resume < {human_bytes(d['resume_threshold_bytes'])}, pause at "
             f"{human_bytes(d['pause_threshold_bytes'])}, hard limit {human_bytes(d['hard_limit_bytes'])}); "
             f"reserved {human_bytes(d['reserved_bytes'])}; free {human_bytes(d['free_bytes'])}"]
    if d.get("breakdown"):
        lines.append("  " + ", ".join(f"{k} {human_bytes(v)}" for k, v in d["breakdown"].items()))
    if d.get("refusal"):
        lines.append(f"  not starting downloads: {d['refusal']}")
    return lines


def render_text(status: dict) -> str:
    lines = _queue(status["queue"])
    lines.append(f"workers ({len(status['workers'])}):")
    lines += [_worker(w) for w in status["workers"]] or ["  none connected"]
    lines += _disk(status["disk"])
    hour = status.get("last_hour", {})
    lines.append(f"last hour: {hour.get('downloaded', 0)} episodes, average "
                 f"{human_bytes(hour.get('average_size_bytes'))}")
    failures = status.get("recent_failures") or []
    if failures:
        lines.append("recent failures:")
        for f in failures:
            first = (f.get("error") or "").splitlines()[0] if f.get("error") else ""
            lines.append(f"  job {f['id']} {f['anime_title']} ep {f['episode']}: {first}")
    return "\n".join(lines)
