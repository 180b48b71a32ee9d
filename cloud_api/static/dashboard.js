/* The plant dashboard: a live view of every machine (polled with ETags, so an unchanged plant
 * costs a 304), and for a chosen scope and period the OEE tiles, trend with the target line,
 * downtime Pareto, OEE ranked by machine, state timelines (zoomable) and fleet health, all
 * from the public /v1 API and drawn with Chart.js.
 *
 * Every panel loads on its own: one failing endpoint shows a note in its panel, never a blank
 * page. The token is kept for the tab (sessionStorage), or for the screen (localStorage) when
 * asked or in kiosk mode (?kiosk=1), so a screen on the line signs itself in after a restart.
 * Times are shown in the plant's time zone (the site's, as its agent reported it) unless
 * another is picked; the choice and the OEE target are kept in localStorage. Tiles, trend
 * bars and target lines use the targets the API answers with (`against_targets`: target and
 * direction, from the agent's YAML or PUT /v1/targets); the browser's OEE target only where
 * the API has none.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "edge-gateway-token";
  const TZ_KEY = "edge-gateway-tz";
  const TARGET_KEY = "edge-gateway-target";
  const MIN = 60e3;
  const HOUR = 3600e3;
  const DAY = 86400e3;
  const RANGES = {
    "15m": 15 * MIN, "1h": HOUR, "4h": 4 * HOUR, "8h": 8 * HOUR, "24h": DAY, "7d": 7 * DAY, "30d": 30 * DAY,
  };
  const INTERVALS = ["auto", "1m", "15m", "1h", "shift", "1d"];
  const INTERVAL_NAMES = { "1m": "per minute", "15m": "per 15 minutes", "1h": "per hour", shift: "per shift", "1d": "per day" };
  const STATE_COLORS = {
    running: "#1f9d55", setup: "#2b6cb0", idle: "#d4a017", fault: "#d64545",
    planned_stop: "#9aa5b1", unknown: "#cbd2d9",
  };
  const STATE_NAMES = {
    running: "Running", setup: "Setup", idle: "Idle / waiting", fault: "Fault",
    planned_stop: "Planned stop", unknown: "Unknown (no data)",
  };
  const GRADE_COLORS = { good: "#1f9d55", fair: "#d4a017", poor: "#d64545", none: "#9aa5b1" };
  const BROWSER_TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const natural = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" }).compare;
  const charts = {};
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, detail, retryAfter) {
      super(detail || `HTTP ${status}`);
      this.status = status;
      this.retryAfter = retryAfter;
    }
  }

  // -- state of the page (kept in the URL so a view can be shared) ---------------------------

  const query = new URLSearchParams(window.location.search);
  const kiosk = ["1", "true", "yes"].includes(query.get("kiosk") || "");
  const view = {
    site: query.get("site") || "",
    line: query.get("line") || "",
    equipment: query.get("equipment") || "",
    range: RANGES[query.get("range")] || query.get("range") === "shift" ? query.get("range") : "shift",
    interval: INTERVALS.includes(query.get("interval")) ? query.get("interval") : "auto",
    from: query.get("from"),
    to: query.get("to"),
    tz: query.get("tz") || localStorage.getItem(TZ_KEY) || "plant",
    target: Number(query.get("target") || localStorage.getItem(TARGET_KEY) || 85) / 100,
  };
  if (!(view.target > 0 && view.target <= 1)) view.target = 0.85;
  // Seconds between live polls and between reloads of the period panels (a viewer token may
  // make 1000 requests an hour: 360 + 6 x 60 leaves room for clicks).
  const liveEvery = Math.max(2, Number(query.get("refresh")) || (kiosk ? 5 : 10));
  const panelsEvery = kiosk ? 120 : 60;
  const page = {
    live: null, liveEtag: null, live200: 0, live304: 0, clockOffset: 0, siteZone: null,
    equipment: [], stateFilter: "", zoom: null, liveTimer: null, panelsTimer: null, lastPeriod: null,
  };

  // -- API ------------------------------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
  }

  function saveToken(value, remember) {
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
    if (value) (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
  }

  async function request(path, params, etag) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    if (etag) headers["If-None-Match"] = etag;
    // no-store: the page revalidates itself (and so sees the 304s it causes).
    const response = await fetch(url, { headers, cache: "no-store" });
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) page.clockOffset = date - Date.now();
    if (response.status === 304) return { status: 304, body: null, etag };
    if (!response.ok) {
      let detail = "";
      try {
        const body = await response.json();
        detail = body.detail || body.title || "";
      } catch (_) { /* not JSON: the status says enough */ }
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail),
        Number(response.headers.get("Retry-After")) || null);
    }
    return { status: response.status, body: await response.json(), etag: response.headers.get("ETag") };
  }

  async function api(path, params) {
    return (await request(path, params)).body;
  }

  const now = () => Date.now() + page.clockOffset;

  // -- formatting -----------------------------------------------------------------------------

  function pct(value) {
    return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
  }

  // One unit for numbers shown together, chosen by the largest: seconds below two minutes,
  // minutes below three hours, hours below three days, then days.
  function unitFor(seconds) {
    const s = Math.abs(seconds || 0);
    if (s < 120) return { name: "s", long: "seconds", div: 1 };
    if (s < 3 * 3600) return { name: "min", long: "minutes", div: 60 };
    if (s < 3 * 86400) return { name: "h", long: "hours", div: 3600 };
    return { name: "days", long: "days", div: 86400 };
  }

  function number(value) {
    const v = Math.abs(value);
    return v === 0 || v >= 10 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(1);
  }

  function inUnit(seconds, unit) {
    return `${number(seconds / unit.div)} ${unit.name}`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return inUnit(seconds, unitFor(seconds));
  }

  function durations(...values) {
    const unit = unitFor(Math.max(...values.map((v) => Math.abs(v || 0))));
    return values.map((v) => (v === null || v === undefined ? "–" : inUnit(v, unit)));
  }

  function zone() {
    if (view.tz === "plant") return page.siteZone || BROWSER_TZ;
    if (view.tz === "browser") return BROWSER_TZ;
    return view.tz;
  }

  const formats = {};
  function fmt(kind) {
    const key = `${kind}|${zone()}`;
    if (!formats[key]) {
      const options = {
        time: { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" },
        day: { weekday: "short", month: "short", day: "numeric" },
        clock: { hour: "2-digit", minute: "2-digit" },
        seconds: { hour: "2-digit", minute: "2-digit", second: "2-digit" },
        parts: { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" },
      }[kind];
      formats[key] = new Intl.DateTimeFormat(kind === "parts" ? "en-US" : undefined, { timeZone: zone(), ...options });
    }
    return formats[key];
  }

  // The wall clock of instant `ms` in the shown zone, as the fields of a datetime-local input.
  function wallClock(ms) {
    const p = Object.fromEntries(fmt("parts").formatToParts(new Date(ms)).map((x) => [x.type, x.value]));
    return `${p.year}-${p.month}-${p.day}T${p.hour}:${p.minute}`;
  }

  // The instant whose wall clock in the shown zone is `text` (YYYY-MM-DDTHH:MM).
  function fromWallClock(text) {
    const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})/.exec(text || "");
    if (!m) return null;
    const wanted = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5]);
    let guess = wanted;
    for (let i = 0; i < 3; i += 1) {
      const shown = Date.parse(`${wallClock(guess)}:00Z`);
      guess += wanted - shown;
    }
    return guess;
  }

  // Ticks at round times of the shown zone (every 10 s up to every week), at most `most`.
  const TICK_STEPS = [10e3, 15e3, 30e3, MIN, 2 * MIN, 5 * MIN, 10 * MIN, 15 * MIN, 30 * MIN, HOUR,
    2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY];
  function timeTicks(from, to, most) {
    const step = TICK_STEPS.find((s) => (to - from) / s <= most) || 7 * DAY;
    const offset = Date.parse(`${wallClock(from)}:00Z`) - Math.floor(from / MIN) * MIN;
    const ticks = [];
    for (let t = Math.ceil((from + offset) / step) * step - offset; t <= to; t += step) ticks.push({ value: t });
    return ticks;
  }

  // The target of `kpi` an answer carries (`against_targets`: target and direction, set in
  // the agent's YAML or by PUT /v1/targets); for OEE without one, the browser's target.
  function goalOf(answer, kpi = "oee") {
    const found = answer && answer.against_targets && answer.against_targets[kpi];
    if (found) return { target: found.target, better: found.better, from: "api" };
    return { target: view.target, better: "higher", from: "browser" };
  }

  // Good at or beyond the target in the KPI's direction, fair within 15 % of it, else poor.
  function grade(value, goal = goalOf(null)) {
    if (value === null || value === undefined) return "none";
    const { target, better } = goal;
    if (better === "lower") {
      if (value <= target) return "good";
      return value <= target * 1.15 ? "fair" : "poor";
    }
    if (value >= target) return "good";
    return value >= target * 0.85 ? "fair" : "poor";
  }

  function message(text) {
    const box = $("message");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function explain(error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      message(error.status === 401
        ? "The API needs a token: paste one in the field at the top right."
        : "This token may not read this data (site or role).");
      return "not allowed with this token";
    }
    if (error instanceof ApiError && error.status === 404) return "no data for this selection";
    if (error instanceof ApiError && error.status === 429) return "the API is busy (rate limit); retrying later";
    return `could not load: ${error.message}`;
  }

  // -- the period -----------------------------------------------------------------------------

  function currentShift() {
    const machines = (page.live && page.live.equipment) || [];
    const starts = machines.filter((m) => m.shift && m.shift.start).map((m) => Date.parse(m.shift.start));
    return starts.length ? Math.max(...starts) : null;
  }

  function period() {
    if (page.zoom) return page.zoom;
    if (view.from && view.to) return { from: view.from, to: view.to, fixed: true };
    const end = now();
    let start = view.range === "shift" ? currentShift() : end - RANGES[view.range];
    if (!start || start >= end) start = end - 8 * HOUR;
    return { from: new Date(start).toISOString(), to: new Date(end).toISOString() };
  }

  function scope() {
    if (view.equipment) return { scope: "equipment", id: view.equipment, site: view.site || null };
    if (view.line) return { scope: "line", id: view.line, site: view.site || null };
    if (view.site) return { scope: "site", id: view.site, site: null };
    return null;
  }

  function saveView() {
    const params = new URLSearchParams();
    for (const key of ["site", "line", "equipment", "range", "interval", "from", "to"]) {
      if (view[key] && !(key === "range" && (view.from || view[key] === "shift")) && !(key === "interval" && view[key] === "auto")) {
        params.set(key, view[key]);
      }
    }
    if (query.get("tz")) params.set("tz", view.tz);
    if (kiosk) params.set("kiosk", "1");
    if (query.get("refresh")) params.set("refresh", query.get("refresh"));
    window.history.replaceState(null, "", `${window.location.pathname}?${params}${window.location.hash}`);
  }

  // -- pickers --------------------------------------------------------------------------------

  function fill(select, items, selected, allLabel) {
    select.replaceChildren();
    if (allLabel) select.append(new Option(allLabel, ""));
    for (const [value, label] of items) select.append(new Option(label, value));
    select.value = items.some(([v]) => v === selected) ? selected : "";
  }

  function fillZones() {
    const items = [
      ["plant", `Plant (${page.siteZone || "not reported"})`],
      ["browser", `This browser (${BROWSER_TZ})`],
      ["UTC", "UTC"],
    ];
    if (!["plant", "browser", "UTC"].includes(view.tz)) items.push([view.tz, view.tz]);
    fill($("tz-pick"), items, view.tz, null);
  }

  async function loadPickers() {
    try {
      const sites = (await api("/v1/sites")).sites || [];
      if (!view.site && sites.length) view.site = sites[0].site_id;
      const site = sites.find((s) => s.site_id === view.site);
      page.siteZone = (site && site.timezone) || page.siteZone;
      $("site-name").textContent = site ? `· ${site.name || site.site_id}` : "";
      fill($("site"), sites.map((s) => [s.site_id, s.name || s.site_id]), view.site, null);
      const lines = view.site ? (await api("/v1/lines", { site: view.site })).lines || [] : [];
      lines.sort((a, b) => natural(a.line_id, b.line_id));
      fill($("line"), lines.map((l) => [l.line_id, l.line_id]), view.line, "All lines");
      const equipment = view.site
        ? (await api("/v1/equipment", { site: view.site, line: view.line || null })).equipment || []
        : [];
      equipment.sort((a, b) => natural(a.equipment_id, b.equipment_id));
      fill($("equipment"), equipment.map((e) => [e.equipment_id, e.equipment_id]), view.equipment, "All equipment");
      if (view.equipment && !equipment.some((e) => e.equipment_id === view.equipment)) view.equipment = "";
      page.equipment = equipment.map((e) => e.equipment_id);
    } catch (error) {
      // Without the hierarchy the page still works for a scope given in the URL.
      message(`Sites and equipment: ${explain(error)}`);
      if (view.site) fill($("site"), [[view.site, view.site]], view.site, null);
      if (view.equipment) fill($("equipment"), [[view.equipment, view.equipment]], view.equipment, null);
      page.equipment = view.equipment ? [view.equipment] : [];
    }
    fillZones();
  }

  // -- charts ---------------------------------------------------------------------------------

  // A dashed horizontal (or vertical, for a horizontal bar chart) line at the OEE target.
  const targetLine = {
    id: "targetLine",
    afterDatasetsDraw(chart, _args, options) {
      if (options.value === null || options.value === undefined) return;
      const horizontal = chart.options.indexAxis === "y";
      const scale = horizontal ? chart.scales.x : chart.scales.y;
      if (!scale) return;
      const at = scale.getPixelForValue(options.value);
      const { left, right, top, bottom } = chart.chartArea;
      const ctx = chart.ctx;
      ctx.save();
      ctx.strokeStyle = "#1d2733";
      ctx.setLineDash([6, 4]);
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      if (horizontal) { ctx.moveTo(at, top); ctx.lineTo(at, bottom); } else { ctx.moveTo(left, at); ctx.lineTo(right, at); }
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#1d2733";
      ctx.font = "12px system-ui, sans-serif";
      const label = `target ${Math.round(options.value)} %`;
      if (horizontal) ctx.fillText(label, Math.min(at + 4, right - 70), top + 12);
      else ctx.fillText(label, right - ctx.measureText(label).width - 4, at - 4);
      ctx.restore();
    },
  };

  function chart(id, config) {
    if (charts[id]) charts[id].destroy();
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options);
    charts[id] = new window.Chart($(id), config);
    return charts[id];
  }

  // -- live plant -----------------------------------------------------------------------------

  function agentStatus(agent, at) {
    if (!agent || !agent.late_at) return { cls: "lost", text: "never seen" };
    if (at >= Date.parse(agent.lost_at)) return { cls: "lost", text: "silent" };
    if (at >= Date.parse(agent.late_at)) return { cls: "late", text: "late" };
    return { cls: "ok", text: "reporting" };
  }

  function agentsById() {
    return Object.fromEntries(((page.live && page.live.agents) || []).map((a) => [a.agent_id, a]));
  }

  function machineTile(m, agents, at) {
    const tile = document.createElement("article");
    const state = m.state || "unknown";
    const agent = agentStatus(agents[m.agent_id], at);
    const stale = agent.cls !== "ok";
    tile.className = `machine state-${state}${stale ? " stale" : ""}`;
    tile.dataset.equipment = m.equipment_id;
    tile.dataset.state = state;
    const head = document.createElement("header");
    const name = document.createElement("h3");
    name.textContent = m.equipment_id;
    const line = document.createElement("span");
    line.className = "line";
    line.textContent = m.line_id || "";
    head.append(name, line);
    const stateLine = document.createElement("p");
    stateLine.className = "state";
    const stateName = document.createElement("span");
    stateName.textContent = STATE_NAMES[state] || state;
    const since = document.createElement("span");
    since.className = "since";
    since.dataset.since = m.since || "";
    since.textContent = m.since ? duration(Math.max(0, (at - Date.parse(m.since)) / 1000)) : "";
    stateLine.append(stateName, since);
    const reason = document.createElement("p");
    reason.className = "reason";
    reason.textContent = state === "running" ? "" : m.reason || (state === "fault" || state === "idle" ? "no reason given" : "");
    const shift = m.shift || {};
    const goal = goalOf(m);
    const target = goal.target;
    const oee = document.createElement("p");
    oee.className = `oee ${grade(shift.oee, goal)}`;
    oee.dataset.target = String(target);
    oee.textContent = pct(shift.oee);
    oee.dataset.value = shift.oee === null || shift.oee === undefined ? "" : String(shift.oee);
    const sub = document.createElement("p");
    sub.className = "sub";
    sub.textContent = m.shift ? `OEE ${m.shift.name} shift · target ${Math.round(target * 100)} %` : "no shift data yet";
    const count = document.createElement("p");
    count.className = "count";
    if (shift.good !== undefined) {
      count.textContent = shift.ideal_count
        ? `${shift.good} good of ${shift.ideal_count} at ideal rate`
        : `${shift.good} good, ${shift.scrap} scrap`;
      if (shift.ideal_count) {
        const bar = document.createElement("span");
        bar.className = "progress";
        const fill = document.createElement("span");
        fill.className = grade(shift.good / shift.ideal_count, goal);
        fill.style.width = `${Math.min(100, (100 * shift.good) / shift.ideal_count).toFixed(1)}%`;
        bar.append(fill);
        count.append(bar);
      }
    }
    tile.append(head, stateLine, reason, oee, sub, count);
    if (stale) {
      const flag = document.createElement("p");
      flag.className = "stale-flag";
      const last = agents[m.agent_id] && agents[m.agent_id].status_reported_at;
      flag.textContent = `agent ${agent.text}${last ? `, last report ${duration((at - Date.parse(last)) / 1000)} ago` : ""}`;
      tile.append(flag);
    }
    return tile;
  }

  function renderLive() {
    const live = page.live;
    if (!live) return;
    const at = now();
    const agents = agentsById();
    let machines = live.equipment.slice().sort((a, b) => natural(a.equipment_id, b.equipment_id));
    if (view.equipment) machines = machines.filter((m) => m.equipment_id === view.equipment);
    const total = machines.length;
    const byState = {};
    for (const m of machines) byState[m.state || "unknown"] = (byState[m.state || "unknown"] || 0) + 1;
    if (page.stateFilter && !byState[page.stateFilter]) page.stateFilter = "";
    const shown = page.stateFilter ? machines.filter((m) => (m.state || "unknown") === page.stateFilter) : machines;
    $("machines").replaceChildren(...shown.map((m) => machineTile(m, agents, at)));
    const chips = [];
    for (const state of Object.keys(STATE_COLORS)) {
      if (!byState[state]) continue;
      const chip = document.createElement("button");
      chip.type = "button";
      chip.className = `chip state-${state}${page.stateFilter === state ? " on" : ""}`;
      chip.dataset.state = state;
      chip.textContent = `${byState[state]} ${STATE_NAMES[state].toLowerCase()}`;
      chip.addEventListener("click", () => {
        page.stateFilter = page.stateFilter === state ? "" : state;
        renderLive();
      });
      chips.push(chip);
    }
    $("live-filter").replaceChildren(...chips);
    $("live-count").textContent = `showing ${shown.length} of ${total} machine${total === 1 ? "" : "s"}`;
    const starts = machines.filter((m) => m.shift).map((m) => m.shift);
    const newest = starts.sort((a, b) => Date.parse(b.start) - Date.parse(a.start))[0];
    $("live-shift").textContent = newest
      ? `${newest.name} shift since ${fmt("clock").format(new Date(newest.start))}${newest.end ? `, until ${fmt("clock").format(new Date(newest.end))}` : ""}`
      : "";
    $("live-note").textContent = total ? "" : "No equipment reported for this selection yet.";
    renderFleetStatus();
  }

  // Ages move on between polls: the time in state and the clock tick every second.
  function tick() {
    const at = now();
    $("clock").textContent = `${fmt("seconds").format(new Date(at))} ${zone()}`;
    for (const el of document.querySelectorAll(".machine .since")) {
      if (el.dataset.since) el.textContent = duration(Math.max(0, (at - Date.parse(el.dataset.since)) / 1000));
    }
    const stale = (page.live && page.live.agents || []).some((a) => {
      const shownAs = document.querySelector(`#fleet tr[data-agent="${CSS.escape(a.agent_id)}"]`);
      return shownAs && shownAs.dataset.status !== agentStatus(a, at).cls;
    });
    if (stale) renderLive();
  }

  async function loadLive() {
    if (!view.site) return;
    const key = `${view.site}|${view.line}`;
    if (page.liveKey !== key) { page.liveEtag = null; page.liveKey = key; }
    try {
      const result = await request("/v1/plant/live", { site: view.site, line: view.line || null }, page.liveEtag);
      if (result.status === 304) {
        page.live304 += 1;
      } else {
        page.live200 += 1;
        page.live = result.body;
        page.liveEtag = result.etag;
        if (page.live.timezone && page.live.timezone !== page.siteZone) {
          page.siteZone = page.live.timezone;
          fillZones();
        }
      }
      document.body.dataset.live200 = String(page.live200);
      document.body.dataset.live304 = String(page.live304);
      $("live-updated").textContent = `checked ${fmt("seconds").format(new Date(now()))}`;
      renderLive();
      return null;
    } catch (error) {
      $("live-note").textContent = `Live view: ${explain(error)}`;
      // Without a valid token, polling would only feed the API's failure throttle: wait for
      // a new token (refresh() starts polling again).
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) return -1;
      return error instanceof ApiError && error.retryAfter ? error.retryAfter : null;
    }
  }

  function scheduleLive(delay) {
    clearTimeout(page.liveTimer);
    page.liveTimer = setTimeout(async () => {
      const retry = await loadLive();
      if (retry !== -1) scheduleLive(retry || liveEvery);
    }, delay * 1000);
  }

  // -- period panels --------------------------------------------------------------------------

  // `goal`: the tile is coloured against it (the OEE tile always, with the browser's target
  // where the API has none; another tile where the API carries a target for it).
  function setTile(name, value, detail, goal) {
    const tile = $(`tile-${name}`);
    tile.querySelector(".value").textContent = pct(value);
    tile.querySelector(".detail").textContent = detail || "";
    tile.dataset.value = value === null || value === undefined ? "" : String(value);
    tile.dataset.target = goal ? String(goal.target) : "";
    tile.className = `tile${name === "oee" ? " tile-oee" : ""} ${goal ? grade(value, goal) : ""}`.trim();
  }

  function tileGoal(total, kpi) {
    const goal = goalOf(total, kpi);
    return kpi === "oee" || goal.from === "api" ? goal : null;
  }

  function autoInterval(span) {
    if (span <= 2 * HOUR) return "1m";
    if (span <= 12 * HOUR) return "15m";
    if (span <= 4 * DAY) return "1h";
    return "1d";
  }

  function bucketLabel(bucket, interval, span) {
    const start = new Date(bucket.start);
    if (bucket.shift) return `${fmt("day").format(start)} ${bucket.shift}`;
    if (interval === "1d") return fmt("day").format(start);
    return (span > DAY ? fmt("time") : fmt("clock")).format(start);
  }

  async function loadOee(s, p) {
    const span = Date.parse(p.to) - Date.parse(p.from);
    let interval = view.interval === "auto" ? autoInterval(span) : view.interval;
    try {
      let body = await api("/v1/oee", { ...s, from: p.from, to: p.to, interval, tz: zone() });
      // Little data (a plant that just started): a finer interval, down to a minute.
      while (view.interval === "auto" && interval !== "1m"
        && ((body.groups[0] && body.groups[0].buckets.length) || 0) < 4) {
        interval = { "15m": "1m", "1h": "15m", "1d": "1h" }[interval];
        body = await api("/v1/oee", { ...s, from: p.from, to: p.to, interval, tz: zone() });
      }
      const total = body.total || {};
      const c = total.components || {};
      const goal = goalOf(total);
      setTile("oee", total.oee, `${c.good ?? 0} good parts of ${c.produced ?? 0}, target ${Math.round(goal.target * 100)} %`, goal);
      const [run, planned] = durations(c.production_s, c.planned_busy_s);
      setTile("availability", total.availability, `running ${run} of ${planned} planned (machine time)`, tileGoal(total, "availability"));
      const [ideal, running] = durations(c.ideal_produced_s, c.production_s);
      setTile("performance", total.performance, `${ideal} at ideal speed in ${running} running`, tileGoal(total, "performance"));
      setTile("quality", total.quality, `${c.scrap ?? 0} scrap, ${c.rework ?? 0} rework`, tileGoal(total, "quality"));
      const buckets = body.groups && body.groups.length ? body.groups[0].buckets : [];
      const series = (key) => buckets.map((b) => (b[key] === null ? null : b[key] * 100));
      chart("trend", {
        type: "bar",
        data: {
          labels: buckets.map((b) => bucketLabel(b, interval, span)),
          datasets: [
            { type: "bar", label: "OEE", data: series("oee"), backgroundColor: buckets.map((b) => GRADE_COLORS[grade(b.oee, goal)]), order: 2, maxBarThickness: 48 },
            { type: "line", label: "Availability", data: series("availability"), borderColor: "#1f9d55", backgroundColor: "#1f9d55", order: 1, pointRadius: buckets.length > 60 ? 0 : 3 },
            { type: "line", label: "Performance", data: series("performance"), borderColor: "#805ad5", backgroundColor: "#805ad5", order: 1, pointRadius: buckets.length > 60 ? 0 : 3 },
            { type: "line", label: "Quality", data: series("quality"), borderColor: "#2b6cb0", backgroundColor: "#2b6cb0", order: 1, pointRadius: buckets.length > 60 ? 0 : 3 },
          ],
        },
        options: {
          scales: {
            y: { min: 0, suggestedMax: 100, title: { display: true, text: "%" } },
            x: { ticks: { autoSkip: true, maxRotation: 0 } },
          },
          plugins: {
            targetLine: { value: goal.target * 100 },
            // The bars' colours grade each bucket; the legend shows OEE in a neutral colour.
            legend: {
              labels: {
                generateLabels: (c) => window.Chart.defaults.plugins.legend.labels.generateLabels(c)
                  .map((l) => (l.datasetIndex === 0 ? { ...l, fillStyle: "#5d6b7a", strokeStyle: "#5d6b7a" } : l)),
              },
            },
          },
        },
        plugins: [targetLine],
      });
      $("trend-interval").textContent = INTERVAL_NAMES[interval] || "";
      $("trend-note").textContent = buckets.length
        ? `Bars: OEE against the target of ${Math.round(goal.target * 100)} %${goal.from === "api" ? "" : " (this browser's)"} (green at or above, amber within 15 % of it, red below).`
        : "No production recorded in this period.";
    } catch (error) {
      for (const name of ["oee", "availability", "performance", "quality"]) setTile(name, null, "");
      $("trend-note").textContent = `OEE: ${explain(error)}`;
    }
  }

  async function loadPareto(s, p) {
    try {
      const body = await api("/v1/downtime/pareto", { ...s, from: p.from, to: p.to, by: "reason", top: 8 });
      const items = body.items || [];
      const unit = unitFor(Math.max(0, ...items.map((i) => i.seconds)));
      chart("pareto", {
        type: "bar",
        data: {
          labels: items.map((i) => i.reason || "(no reason)"),
          datasets: [
            { type: "bar", label: `Downtime (${unit.name})`, data: items.map((i) => i.seconds / unit.div), backgroundColor: "#d64545", yAxisID: "y", order: 2, maxBarThickness: 64 },
            { type: "line", label: "Cumulative %", data: items.map((i) => (i.cumulative_share || 0) * 100), borderColor: "#1d2733", backgroundColor: "#1d2733", yAxisID: "share", order: 1 },
          ],
        },
        options: {
          scales: {
            y: { beginAtZero: true, title: { display: true, text: unit.long }, ticks: { precision: 0 } },
            share: { position: "right", min: 0, max: 100, grid: { drawOnChartArea: false }, title: { display: true, text: "cumulative %" } },
            x: { ticks: { autoSkip: false, maxRotation: 30 } },
          },
          plugins: { tooltip: { callbacks: { label: (ctx) => (ctx.dataset.yAxisID === "y" ? `Downtime: ${duration(items[ctx.dataIndex].seconds)}` : `Cumulative: ${ctx.parsed.y.toFixed(0)} %`) } } },
        },
      });
      $("pareto-note").textContent = items.length
        ? `Total downtime ${duration(body.total_s)}${body.other_s ? `, other reasons ${duration(body.other_s)}` : ""}.`
        : "No downtime in this period.";
    } catch (error) {
      $("pareto-note").textContent = `Downtime: ${explain(error)}`;
    }
  }

  async function loadRanked(s, p) {
    try {
      const body = await api("/v1/oee", { ...s, from: p.from, to: p.to, interval: "1mo", tz: zone(), group_by: "equipment" });
      const rows = (body.groups || []).map((g) => ({ id: g.equipment, oee: g.total.oee, goal: goalOf(g.total) }))
        .sort((a, b) => (b.oee ?? -1) - (a.oee ?? -1) || natural(a.id, b.id));
      $("ranked-chart").style.height = `${Math.max(160, rows.length * 24 + 50)}px`;
      chart("ranked", {
        type: "bar",
        data: {
          labels: rows.map((r) => r.id),
          datasets: [{ label: "OEE %", data: rows.map((r) => (r.oee === null ? null : r.oee * 100)), backgroundColor: rows.map((r) => GRADE_COLORS[grade(r.oee, r.goal)]), maxBarThickness: 22 }],
        },
        options: {
          indexAxis: "y",
          scales: { x: { min: 0, suggestedMax: 100, title: { display: true, text: "OEE %" } }, y: { ticks: { autoSkip: false } } },
          plugins: { legend: { display: false }, targetLine: { value: goalOf(body.total).target * 100 } },
        },
        plugins: [targetLine],
      });
      $("ranked-note").textContent = rows.length ? `${rows.length} machine${rows.length === 1 ? "" : "s"}, best first.` : "No production recorded in this period.";
    } catch (error) {
      $("ranked-note").textContent = `OEE by machine: ${explain(error)}`;
    }
  }

  async function loadTimeline(p) {
    const all = view.equipment ? [view.equipment] : page.equipment.slice();
    if (!all.length) {
      $("timeline-note").textContent = "Pick a site with equipment to see machine states.";
      return;
    }
    let intervals;
    try {
      const body = await api("/v1/plant/states", { site: view.site, line: view.line || null, from: p.from, to: p.to });
      intervals = (body.intervals || []).filter((i) => all.includes(i.equipment_id));
      if (body.truncated) $("timeline-note").textContent = "Too many state changes for this period: zoom in.";
    } catch (error) {
      $("timeline-note").textContent = `Machine states: ${explain(error)}`;
      return;
    }
    const ids = all.sort(natural);
    const byState = {};
    let first = Infinity;
    for (const interval of intervals) {
      const state = interval.state || "unknown";
      const a = Date.parse(interval.start);
      first = Math.min(first, a);
      // The interval rides along: stopnotes.js opens a stop's classification form from it.
      (byState[state] = byState[state] || []).push({ x: [a, Date.parse(interval.end)], y: interval.equipment_id, interval });
    }
    let from = Date.parse(p.from);
    const to = Math.min(Date.parse(p.to), now());
    // A plant that started within the period: the axis starts with its data.
    const fitted = !p.fixed && first > from && first < to;
    if (fitted) from = first;
    const span = to - from;
    const tickFormat = span <= 8 * MIN ? fmt("seconds") : span <= 2 * DAY ? fmt("clock") : fmt("time");
    $("timeline-chart").style.height = `${Math.max(140, ids.length * 22 + 60)}px`;
    chart("timeline", {
      type: "bar",
      data: {
        labels: ids,
        datasets: Object.keys(STATE_COLORS).filter((s) => byState[s]).map((state) => ({
          label: STATE_NAMES[state], data: byState[state], backgroundColor: STATE_COLORS[state],
          borderSkipped: false, grouped: false, barPercentage: 0.8, categoryPercentage: 1,
        })),
      },
      options: {
        indexAxis: "y",
        scales: {
          x: {
            type: "linear", min: from, max: to,
            afterBuildTicks: (axis) => { axis.ticks = timeTicks(from, to, 8); },
            ticks: { autoSkip: false, maxRotation: 0, callback: (v) => tickFormat.format(new Date(v)) },
          },
          y: { stacked: true, ticks: { autoSkip: false } },
        },
        plugins: {
          legend: { position: "top" },
          tooltip: {
            callbacks: {
              label: (ctx) => {
                const [a, b] = ctx.raw.x;
                return `${ctx.raw.y} ${ctx.dataset.label}: ${fmt("time").format(new Date(a))} – ${fmt("clock").format(new Date(b))} (${duration((b - a) / 1000)})`;
              },
            },
          },
        },
      },
    });
    const notes = [`showing ${ids.length} of ${page.equipment.length || ids.length} machines`];
    if (fitted) notes.push(`data from ${fmt("time").format(new Date(first))}`);
    if (page.zoom) notes.push(`zoomed to ${fmt("time").format(new Date(Date.parse(page.zoom.from)))} – ${fmt("time").format(new Date(Date.parse(page.zoom.to)))}`);
    if (!intervals.length) notes.push("no state recorded in this period");
    $("timeline-note").textContent = `${notes.join("; ")}.`;
    $("timeline-note").dataset.shown = String(ids.length);
  }

  async function loadFleet() {
    try {
      const agents = (await api("/v1/agents", { site: view.site || null })).agents || [];
      page.fleet = agents.sort((a, b) => natural(a.agent_id, b.agent_id));
      renderFleetStatus();
      $("fleet-note").textContent = agents.length
        ? "Late: no status report for 2.5 of the agent's own status intervals; silent: for 10."
        : "No agent enrolled for this site yet.";
    } catch (error) {
      $("fleet-note").textContent = `Agents: ${explain(error)}`;
    }
  }

  function renderFleetStatus() {
    if (!page.fleet) return;
    const live = agentsById();
    const at = now();
    const body = $("fleet").querySelector("tbody");
    body.replaceChildren();
    for (const a of page.fleet) {
      const row = body.insertRow();
      const l = live[a.agent_id];
      const status = l ? agentStatus(l, at) : { cls: "late", text: "unknown" };
      row.dataset.agent = a.agent_id;
      row.dataset.status = status.cls;
      const badge = document.createElement("span");
      badge.className = `badge ${status.cls}`;
      badge.textContent = status.text;
      const seen = a.last_seen ? (at - Date.parse(a.last_seen)) / 1000 : null;
      row.insertCell().textContent = a.agent_id;
      row.insertCell().textContent = a.site_id;
      row.insertCell().append(badge);
      row.insertCell().textContent = seen === null ? "–" : `${duration(Math.max(0, seen))} ago`;
      row.insertCell().textContent = l ? `${duration(l.status_interval_s)}${l.status_interval_source === "reported" ? "" : ` (${l.status_interval_source})`}` : "–";
      row.insertCell().textContent = a.outbox_depth === null || a.outbox_depth === undefined ? "–" : `${a.outbox_depth} batches`;
      row.insertCell().textContent = duration(a.outbox_oldest_unacked_s);
      row.insertCell().textContent = a.version || "–";
      row.insertCell().append(...configCell(a.config, row));
    }
  }

  // The configuration the cloud pushes: running and desired versions and the agent's last
  // result. Marked when the agent does not run the desired version or its last result is a
  // rejection or a roll-back (row.dataset.config lists the marks, "" when none).
  function configCell(config, row) {
    const c = config || {};
    const marks = [];
    const last = c.last_result || null;
    if (c.desired_version !== null && c.desired_version !== undefined && c.running_version !== c.desired_version) marks.push("behind");
    if (last && (last.result === "rejected" || last.result === "rolled_back")) marks.push(last.result);
    row.dataset.config = marks.join(" ");
    if (!config || (c.desired_version == null && c.running_version == null && !last)) return ["–"];
    const running = c.running_version == null ? "?" : c.running_version === 0 ? "local file" : `v${c.running_version}`;
    const desired = c.desired_version == null ? "none" : `v${c.desired_version}`;
    const versions = document.createElement("span");
    versions.className = marks.includes("behind") ? "config-mark" : "";
    versions.textContent = `runs ${running}, desired ${desired}`;
    if (!last) return [versions];
    const result = document.createElement("span");
    result.className = `badge ${marks.includes(last.result) ? "lost" : last.result === "applied" ? "ok" : "late"}`;
    result.textContent = `${last.result.replace("_", " ")}${last.version == null ? "" : ` v${last.version}`}`;
    const why = [last.reason, ...(last.problems || []).map((p) => `${p.path}${p.line ? ` (line ${p.line})` : ""}: ${p.reason}`)];
    result.title = why.filter(Boolean).join("\n");
    return [versions, " ", result];
  }

  // One load of the panels at a time; a request during one (a zoom during the periodic
  // reload) runs once it is done, so the newest period is the one drawn last.
  async function loadPanels() {
    if (page.panelsRunning) {
      page.panelsAgain = true;
      return page.panelsRunning;
    }
    document.body.dataset.panels = "loading";
    page.panelsRunning = (async () => {
      do {
        page.panelsAgain = false;
        await loadPanelsOnce();
      } while (page.panelsAgain);
    })();
    try {
      await page.panelsRunning;
    } finally {
      page.panelsRunning = null;
      document.body.dataset.panels = "ready";
    }
    return null;
  }

  async function loadPanelsOnce() {
    const s = scope();
    const p = period();
    page.lastPeriod = p;
    const range = `${fmt("time").format(new Date(p.from))} – ${fmt("time").format(new Date(p.to))}`;
    $("scope-label").textContent = s ? `${s.scope} ${s.id}, ${range}` : "";
    $("zoom-reset").hidden = !page.zoom;
    if (!s) {
      message("No site yet: enroll an agent and let it send data (see the README).");
    } else {
      await Promise.all([loadOee(s, p), loadPareto(s, p), loadRanked(s, p), loadTimeline(p)]);
    }
    await loadFleet();
  }

  function schedulePanels() {
    clearTimeout(page.panelsTimer);
    page.panelsTimer = setTimeout(async () => {
      // A window that ends now moves on; a fixed one (a link, custom, a zoom) stays put.
      if (!(view.from && view.to) && !page.zoom) await loadPanels();
      else await loadFleet();
      schedulePanels();
    }, panelsEvery * 1000);
  }

  // -- wiring ---------------------------------------------------------------------------------

  async function refresh() {
    document.body.dataset.state = "loading";
    message("");
    await loadPickers();
    saveView();
    $("tz").textContent = zone();
    await loadLive();
    await loadPanels();
    document.body.dataset.state = "ready";
    scheduleLive(liveEvery);
    schedulePanels();
  }

  function onPick(key, resets) {
    return (event) => {
      if (key === "range" && event.target.value === "custom") {
        const p = page.lastPeriod || period();
        $("from").value = wallClock(Date.parse(p.from));
        $("to").value = wallClock(Date.parse(p.to));
        $("custom-range").hidden = false;
        return;
      }
      view[key] = event.target.value;
      for (const other of resets) view[other] = "";
      if (key === "range") { view.from = null; view.to = null; $("custom-range").hidden = true; }
      page.zoom = null;
      refresh();
    };
  }

  function applyCustomRange() {
    const from = fromWallClock($("from").value);
    const to = fromWallClock($("to").value);
    if (from === null || to === null || to <= from) {
      message("A custom period needs a start before its end.");
      return;
    }
    view.from = new Date(from).toISOString();
    view.to = new Date(to).toISOString();
    page.zoom = null;
    refresh();
  }

  // Drag across the timeline to zoom into that stretch (all panels follow).
  function wireZoom() {
    const box = $("timeline-chart");
    const band = $("zoom-band");
    let startX = null;
    const xOf = (event) => event.clientX - box.getBoundingClientRect().left;
    box.addEventListener("mousedown", (event) => {
      if (!charts.timeline || !charts.timeline.scales) return;
      startX = xOf(event);
      band.hidden = false;
      band.style.left = `${startX}px`;
      band.style.width = "0px";
    });
    box.addEventListener("mousemove", (event) => {
      if (startX === null) return;
      const x = xOf(event);
      band.style.left = `${Math.min(x, startX)}px`;
      band.style.width = `${Math.abs(x - startX)}px`;
    });
    window.addEventListener("mouseup", (event) => {
      if (startX === null) return;
      const x = xOf(event);
      band.hidden = true;
      const scale = charts.timeline.scales.x;
      const [a, b] = [Math.min(x, startX), Math.max(x, startX)];
      startX = null;
      if (b - a < 5) return;
      const from = scale.getValueForPixel(a);
      const to = scale.getValueForPixel(b);
      if (to - from < MIN) return;
      zoomTo(from, to);
    });
    $("zoom-out").addEventListener("click", () => {
      const p = page.lastPeriod || period();
      const a = Date.parse(p.from);
      const b = Date.parse(p.to);
      const mid = (a + b) / 2;
      zoomTo(mid - (b - a), Math.min(now(), mid + (b - a)));
    });
    $("zoom-reset").addEventListener("click", () => { page.zoom = null; loadPanels(); });
  }

  function zoomTo(from, to) {
    page.zoom = { from: new Date(Math.round(from)).toISOString(), to: new Date(Math.round(to)).toISOString(), fixed: true };
    loadPanels();
  }

  // Kiosk mode is meant for a read-only (viewer) token; say so when it gets another.
  function checkKioskToken() {
    const parts = token().split(".");
    if (parts.length !== 3) return;
    try {
      const claims = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
      if (claims.role && claims.role !== "viewer") {
        message(`This screen uses a ${claims.role} token; a screen on the line should use a viewer (read-only) token.`);
      }
    } catch (_) { /* not a JWT we can read: the API decides */ }
  }

  function start() {
    if (kiosk) document.body.classList.add("kiosk");
    if (view.from && view.to) {
      // A link with an explicit window: show it as such until another period is picked.
      $("range").prepend(new Option("Window from the link", "link"));
      $("range").value = "link";
    } else {
      $("range").value = view.range;
    }
    $("interval").value = view.interval;
    $("target").value = String(Math.round(view.target * 100));
    $("site").addEventListener("change", onPick("site", ["line", "equipment"]));
    $("line").addEventListener("change", onPick("line", ["equipment"]));
    $("equipment").addEventListener("change", onPick("equipment", []));
    $("range").addEventListener("change", onPick("range", []));
    $("interval").addEventListener("change", onPick("interval", []));
    $("apply-range").addEventListener("click", applyCustomRange);
    $("tz-pick").addEventListener("change", (event) => {
      view.tz = event.target.value;
      localStorage.setItem(TZ_KEY, view.tz);
      refresh();
    });
    $("target").addEventListener("change", (event) => {
      const value = Number(event.target.value);
      if (!(value > 0 && value <= 100)) return;
      view.target = value / 100;
      localStorage.setItem(TARGET_KEY, String(value));
      renderLive();
      loadPanels();
    });
    // A link with #token=... (the one `make demo` prints) signs the tab in. In kiosk mode the
    // token is kept for the screen (localStorage) and the fragment stays, so a screen that
    // restarts on the same address, even with its storage wiped, signs in again; otherwise
    // it leaves the address bar at once so it is not bookmarked or shared with the page.
    const linked = new URLSearchParams(window.location.hash.slice(1)).get("token");
    if (linked) {
      saveToken(linked, kiosk);
      if (!kiosk) history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    if (kiosk) checkKioskToken();
    $("token").value = token();
    $("token-remember").checked = Boolean(localStorage.getItem(TOKEN_KEY));
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      saveToken($("token").value.trim(), $("token-remember").checked);
      refresh();
    });
    $("token-clear").addEventListener("click", () => {
      saveToken("", false);
      $("token").value = "";
      refresh();
    });
    $("refresh-note").textContent = `The plant view refreshes every ${liveEvery} s, the charts every ${panelsEvery} s.`;
    if (!window.Chart) {
      message("The chart library did not load; numbers are shown without charts.");
      window.Chart = function () { return { destroy() {} }; };
    }
    wireZoom();
    // A stop classified from the timeline (stopnotes.js): the Pareto and timeline show it.
    document.addEventListener("stop-classified", () => loadPanels());
    tick();
    setInterval(tick, 1000);
    refresh();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
