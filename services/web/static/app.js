// anime-web: renders the dispatcher's status document, live, from /api/events.
// Every value from the document goes into the page as text (textContent), never as
// markup: anime titles and ani-cli's messages come from elsewhere.
"use strict";

(function () {
  const KNOWN_KEYS = new Set(["generated_at", "dispatcher", "queue", "workers", "disk",
    "recent_failures", "last_hour", "database", "title_mismatches", "pause", "storage"]);
  const QUEUE_FIRST = ["queued", "downloading", "downloaded", "failed",
    "waiting_for_selection", "backing_off"];
  const QUEUE_LABELS = {waiting_for_selection: "wait for a selection", backing_off: "back off"};
  const PARTS = ["videos", "audio", "transcripts", "in_progress", "other"];
  const session = {csrfToken: null, heartbeat: 2, controls: false};
  let lastUpdate = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "style") Object.assign(node.style, value);
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(node, ...children) {
    node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  }

  // --- formatting (decimal units, as anime-status) ------------------------------------
  function bytes(n) {
    if (n === null || n === undefined) return "?";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
  }

  function duration(s) {
    if (s === null || s === undefined) return "--:--";
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    const two = (x) => String(x).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(sec)}` : `${two(m)}:${two(sec)}`;
  }

  function clock(at) {
    if (at === null || at === undefined) return "?";
    const when = new Date(at * 1000);
    const today = new Date().toDateString() === when.toDateString();
    return today ? when.toLocaleTimeString([], {hour12: false})
                 : when.toLocaleString([], {hour12: false});
  }

  function count(n, one, many) { return `${n} ${n === 1 ? one : (many || one + "s")}`; }

  // --- header -------------------------------------------------------------------------
  function renderHeader(update) {
    const o = update.overview || {};
    $("head").dataset.state = o.state || "unknown";
    $("state").textContent = o.label || o.state || "?";
    let why = o.why || "";
    if (o.state === "not_answering" && update.since) {
      why += ` (since ${clock(update.since)}; still trying)`;
    } else if (o.since) {
      why += ` (since ${clock(o.since)})`;
    }
    if (o.until) why += ` until ${clock(o.until)}`;
    $("why").textContent = why;
    const s = update.status;
    $("fresh").textContent = !s ? "" : update.ok ? `updated ${clock(s.generated_at)}`
                                                 : `last known status from ${clock(s.generated_at)}`;
    $("main").classList.toggle("stale", !update.ok);
  }

  function showOffline(text) {
    $("head").dataset.state = "offline";
    $("state").textContent = "page not connected";
    $("why").textContent = text;
    $("main").classList.add("stale");
  }

  // --- workers ------------------------------------------------------------------------
  function renderWorkers(status) {
    const workers = Array.isArray(status.workers) ? status.workers : [];
    const states = {};
    for (const w of workers) states[w.state] = (states[w.state] || 0) + 1;
    const summary = Object.entries(states).sort().map(([s, n]) => `${n} ${s}`).join(", ");
    $("workers-summary").textContent = workers.length
      ? `${count(workers.length, "worker")} connected (${summary})` : "no worker connected";
    fill($("worker-list"), workers.map(worker));
  }

  function worker(w) {
    const job = w.job && typeof w.job === "object" ? w.job : null;
    const head = el("div", {class: "w-head"},
      el("span", {class: "w-id"}, w.id),
      el("span", {class: "w-title"}, job ? `${job.anime_title || "?"} ep ${job.episode}` : ""),
      el("span", {class: "w-state"}, w.state));
    if (!job) return el("li", {dataset: {worker: w.id, state: w.state}}, head);
    const pct = typeof job.percent === "number" ? job.percent : null;
    const bar = el("div", {class: pct === null ? "progress unknown" : "progress"},
      el("div", {style: {width: `${pct === null ? 0 : Math.min(100, pct)}%`}}));
    const figures = el("div", {class: "w-figures"},
      el("span", {class: "percent"}, pct === null ? "?%" : `${pct.toFixed(1)}%`),
      el("span", {}, bytes(job.bytes)),
      el("span", {}, job.speed_bps ? `${bytes(job.speed_bps)}/s` : "-"),
      el("span", {}, `ETA ${duration(job.eta_seconds)}`),
      el("span", {}, `job ${job.id}, running ${duration(job.running_seconds)}`),
      el("button", {type: "button", class: "small", dataset: {cancelJob: job.id},
                    disabled: !session.controls}, "cancel"));
    return el("li", {dataset: {worker: w.id, state: w.state, job: job.id,
                               percent: pct === null ? "" : pct}}, head, bar, figures);
  }

  // --- disk ---------------------------------------------------------------------------
  function renderDisk(disk) {
    disk = disk && typeof disk === "object" ? disk : {};
    $("disk-state").textContent = disk.state || "unknown";
    const hard = disk.hard_limit_bytes, usage = disk.usage_bytes;
    const full = Math.max(hard || 0, usage || 0) || 1;
    const share = (n) => `${Math.max(0, Math.min(100, 100 * n / full))}%`;
    const breakdown = disk.breakdown && typeof disk.breakdown === "object" ? disk.breakdown : {};
    const names = PARTS.concat(Object.keys(breakdown).filter((k) => !PARTS.includes(k)));
    const marks = [["resume", disk.resume_threshold_bytes, "resume below"],
                   ["pause", disk.pause_threshold_bytes, "pause at"],
                   ["hard", hard, "hard limit"]].filter(([, at]) => typeof at === "number");
    fill($("disk-bar"),
      names.filter((k) => breakdown[k] > 0).map((k) =>
        el("div", {class: "part", title: `${k.replace("_", " ")} ${bytes(breakdown[k])}`,
                   style: {width: share(breakdown[k]), background: `var(--${k}, var(--other))`}})),
      marks.map(([cls, at, label]) => el("div", {class: `mark ${cls}`, title: `${label} ${bytes(at)}`,
                                                 style: {left: `min(${share(at)}, calc(100% - 2px))`}})));
    fill($("disk-legend"),
      names.filter((k) => k in breakdown).map((k) =>
        el("li", {}, el("i", {style: {background: `var(--${k}, var(--other))`}}),
           `${k.replace("_", " ")} ${bytes(breakdown[k])}`)),
      marks.map(([cls, at, label]) => el("li", {}, el("i", {class: `line ${cls}`}), `${label} ${bytes(at)}`)));
    const parts = [`${bytes(usage)} used of ${bytes(hard)} hard limit`,
                   `reserved ${bytes(disk.reserved_bytes)}`, `free ${bytes(disk.free_bytes)}`];
    if (typeof disk.age_seconds === "number" && disk.age_seconds > 5) {
      parts.push(`measured ${Math.round(disk.age_seconds)} s ago`);
    }
    $("disk-figures").textContent = parts.join(" · ");
    const reason = disk.reason || disk.unavailable_reason || disk.refusal;
    $("disk-refusal").textContent = reason ? `not starting downloads: ${reason}` : "";
  }

  // --- queue --------------------------------------------------------------------------
  function renderQueue(queue) {
    queue = queue && typeof queue === "object" ? queue : {};
    const keys = QUEUE_FIRST.filter((k) => k in queue).concat(Object.keys(queue).filter((k) =>
      !QUEUE_FIRST.includes(k) && typeof queue[k] === "number" && !k.endsWith("_at")));
    fill($("queue-counts"), keys.map((k) => el("div", {dataset: {count: k}},
      el("dt", {}, QUEUE_LABELS[k] || k.replaceAll("_", " ")), el("dd", {}, queue[k]))));
    const notes = [];
    if (queue.next_retry_at) notes.push(`next retry ${clock(queue.next_retry_at)}`);
    const other = queue.other_stages && typeof queue.other_stages === "object" ? queue.other_stages : {};
    const stages = Object.entries(other).map(([k, v]) => `${k} ${v}`);
    if (stages.length) notes.push(`other stages: ${stages.join(", ")}`);
    if (queue.counted_at) notes.push(`counted ${clock(queue.counted_at)}`);
    $("queue-notes").textContent = notes.join(" · ");
    renderByAnime(queue.by_anime);
  }

  // The queue by anime: the dispatcher's `queue.by_anime` rows (the anime with work left or
  // failures, busiest first), each with its buttons: retry its failed jobs, raise or lower
  // its priority one step (high 10, normal 0, low -10).
  const BY_ANIME_COLUMNS = [["queued", "queued"], ["downloading", "downloading"],
    ["downloaded", "downloaded"], ["failed", "failed"], ["waiting_release", "waiting for a release"]];

  function priorityName(p) {
    return p === 10 ? "high" : p === 0 ? "normal" : p === -10 ? "low" : String(p);
  }

  function renderByAnime(rows) {
    if (!Array.isArray(rows) || !rows.length) { fill($("by-anime")); return; }
    const head = el("tr", {}, el("th", {}, "anime"),
      BY_ANIME_COLUMNS.map(([, label]) => el("th", {}, label)), el("th", {}, "priority"), el("th", {}, ""));
    const body = rows.map((r) => {
      const priority = Number(r.priority || 0);
      return el("tr", {dataset: {anime: r.anime_id}},
        el("td", {}, r.anime_title || `MAL ${r.anime_id}`),
        BY_ANIME_COLUMNS.map(([k]) => el("td", {}, String(r[k] || 0))),
        el("td", {}, priorityName(priority)),
        el("td", {class: "row-buttons"},
          el("button", {type: "button", class: "small", title: "raise its priority",
                        dataset: {priorityAnime: r.anime_id, priorityTo: priority + 10},
                        disabled: !session.controls}, "▲"),
          el("button", {type: "button", class: "small", title: "lower its priority",
                        dataset: {priorityAnime: r.anime_id, priorityTo: priority - 10},
                        disabled: !session.controls}, "▼"),
          r.failed ? el("button", {type: "button", class: "small",
                                   dataset: {retryAnime: r.anime_id},
                                   disabled: !session.controls}, "retry failed") : null));
    });
    fill($("by-anime"), el("div", {class: "table-scroll"},
      el("table", {}, el("thead", {}, head), el("tbody", {}, body))));
  }

  // --- failures, last hour, titles, the rest -------------------------------------------
  function renderFailures(failures) {
    failures = Array.isArray(failures) ? failures : [];
    if (!failures.length) { fill($("failure-list"), el("li", {class: "muted"}, "none")); return; }
    fill($("failure-list"), failures.map((f) => {
      const lines = String(f.error || "").split("\n");
      return el("li", {dataset: {job: f.id}},
        el("div", {class: "f-head"}, `${f.anime_title || "?"} ep ${f.episode}`,
           el("span", {class: "muted"}, ` · job ${f.id}${f.at ? " · " + clock(f.at) : ""}`)),
        el("div", {class: "f-first"}, lines[0]),
        el("button", {type: "button", class: "small", dataset: {retryJob: f.id},
                      disabled: !session.controls}, "retry"),
        lines.length > 1 ? el("pre", {}, lines.slice(1).join("\n")) : null);
    }));
  }

  function renderLastHour(h) {
    h = h && typeof h === "object" ? h : {};
    const n = h.downloaded || 0;
    $("last-hour-text").textContent = n
      ? `${count(n, "episode")} downloaded, ${bytes(h.bytes)} in all, average ${bytes(h.average_size_bytes)}`
      : "no episode downloaded";
  }

  function renderTitles(list) {
    list = Array.isArray(list) ? list : [];
    $("titles").hidden = !list.length;
    fill($("title-list"), list.map((t) => el("li", {},
      el("div", {class: "f-head"}, `${t.anime_title || "?"} ep ${t.episode}`,
         el("span", {class: "muted"}, ` · job ${t.id}${t.at ? " · " + clock(t.at) : ""}`)),
      el("div", {}, `site: ${t.site_title} · selected: ${t.selected_title}`))));
  }

  function renderMore(status) {
    const extra = Object.keys(status).filter((k) => !KNOWN_KEYS.has(k)).sort();
    $("more").hidden = !extra.length;
    fill($("more-list"), extra.map((k) => [el("dt", {}, k.replaceAll("_", " ")),
      el("dd", {}, el("pre", {}, typeof status[k] === "string" ? status[k]
                                  : JSON.stringify(status[k], null, 2)))]));
  }

  function renderFooter(status) {
    const d = status.dispatcher && typeof status.dispatcher === "object" ? status.dispatcher : {};
    const bits = [`dispatcher pid ${d.pid ?? "?"}`];
    if (d.dry_run) bits.push("dry run");
    if (d.anime_id !== null && d.anime_id !== undefined) bits.push(`only MAL ID ${d.anime_id}`);
    $("dispatcher-info").textContent = bits.join(" · ");
  }

  function render(update) {
    lastUpdate = update;
    renderHeader(update);
    const s = update.status;
    if (!s || typeof s !== "object") return;
    for (const part of [() => renderWorkers(s), () => renderDisk(s.disk), () => renderQueue(s.queue),
                        () => renderFailures(s.recent_failures), () => renderLastHour(s.last_hour),
                        () => renderTitles(s.title_mismatches), () => renderMore(s),
                        () => renderFooter(s)]) {
      try { part(); } catch (err) { console.error("render", err); }  // one odd section, not a blank page
    }
  }

  // --- live updates -------------------------------------------------------------------
  function connect() {
    const source = new EventSource("/api/events");
    source.addEventListener("hello", (e) => {
      const hello = JSON.parse(e.data);
      session.csrfToken = hello.csrf_token;
      session.heartbeat = hello.heartbeat_seconds;
      session.controls = hello.controls;
      for (const b of document.querySelectorAll("button")) b.disabled = !session.controls;
    });
    source.addEventListener("update", (e) => render(JSON.parse(e.data)));
    source.onerror = () => {
      showOffline("anime-web is not reachable; trying again");
      if (source.readyState === EventSource.CLOSED) {  // the browser gave up: we do not
        setTimeout(connect, Math.max(1000, session.heartbeat * 1000));
      }
    };
  }

  // The operator's buttons (issue 18) post here; the token proves the page is ours.
  async function postControl(command, body) {
    const response = await fetch(`/api/ctl/${encodeURIComponent(command)}`, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": session.csrfToken || ""},
      body: JSON.stringify(body || {}),
    });
    let reply;
    try { reply = await response.json(); } catch (err) { reply = {ok: false, message: response.statusText}; }
    return {status: response.status, reply};
  }

  // --- the buttons: each posts one control and shows the dispatcher's answer --------------
  const REQUESTS = {
    "pause": () => ["pause", {}],
    "pause-for": () => ["pause", {for: $("pause-for").value}],
    "pause-now": () => ["pause", {now: true}],
    "resume": () => ["resume", {}],
    "bandwidth": () => ["bandwidth", {mbps: Number($("bandwidth-mbps").value || "NaN")}],
    "priority": () => ["priority", {anime_id: Number($("priority-anime").value || "NaN"),
                                    priority: $("priority-value").value}],
  };

  async function act(command, body) {
    const result = $("ctl-result");
    result.textContent = `${command}…`;
    delete result.dataset.ok;
    try {
      const {reply} = await postControl(command, body);
      result.dataset.ok = reply.ok ? "true" : "false";
      result.textContent = reply.ok ? reply.message : `${command}: ${reply.message || reply.error}`;
    } catch (err) {
      result.dataset.ok = "false";
      result.textContent = `${command}: ${err}`;
    }
  }

  document.addEventListener("click", (e) => {
    const button = e.target.closest("button");
    if (!button || button.disabled) return;
    const d = button.dataset;
    if (d.ctl in REQUESTS) act(...REQUESTS[d.ctl]());
    else if (d.cancelJob) act("cancel", {job_id: Number(d.cancelJob)});
    else if (d.retryJob) act("retry", {job_ids: [Number(d.retryJob)]});
    else if (d.retryAnime) act("retry", {anime_id: Number(d.retryAnime)});
    else if (d.priorityAnime) act("priority", {anime_id: Number(d.priorityAnime),
                                               priority: Number(d.priorityTo)});
  });

  window.animeWeb = {postControl, session, get lastUpdate() { return lastUpdate; }};
  connect();
})();
