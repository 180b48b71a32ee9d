/* The plant dashboard: picks a scope and a period, then asks the /v1 API for OEE, the trend,
 * the downtime Pareto, machine states and fleet health, and draws them with Chart.js.
 * Every panel loads on its own: one failing endpoint shows a note in its panel, never a blank
 * page. The API token is kept in sessionStorage (this tab only) and sent as a Bearer header.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "edge-gateway-token";
  const RANGES = { "8h": 8 * 3600e3, "24h": 24 * 3600e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
  const STATE_COLORS = {
    running: "#1f9d55", setup: "#2b6cb0", idle: "#d4a017", fault: "#d64545",
    planned_stop: "#9aa5b1", unknown: "#cbd2d9",
  };
  const STATE_NAMES = {
    running: "Running", setup: "Setup", idle: "Idle / waiting", fault: "Fault",
    planned_stop: "Planned stop", unknown: "Unknown (no data)",
  };
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const charts = {};
  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail || `HTTP ${status}`);
      this.status = status;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(path, params) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    const response = await fetch(url, { headers });
    if (!response.ok) {
      let detail = "";
      try {
        const body = await response.json();
        detail = body.detail || body.title || "";
      } catch (_) { /* not JSON: the status says enough */ }
      throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return response.json();
  }

  // -- formatting ---------------------------------------------------------------------------

  function pct(value) {
    return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)} %`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
    return `${(seconds / 86400).toFixed(1)} days`;
  }

  function hours(seconds) {
    return seconds === null || seconds === undefined ? "–" : `${(seconds / 3600).toFixed(1)} h`;
  }

  const timeFormat = new Intl.DateTimeFormat(undefined, {
    timeZone: tz, month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
  const dayFormat = new Intl.DateTimeFormat(undefined, { timeZone: tz, weekday: "short", month: "short", day: "numeric" });
  const clockFormat = new Intl.DateTimeFormat(undefined, { timeZone: tz, hour: "2-digit", minute: "2-digit" });

  function grade(value) {
    if (value === null || value === undefined) return "";
    return value >= 0.85 ? "good" : value >= 0.6 ? "fair" : "poor";
  }

  // -- state of the page (kept in the URL so a view can be shared) ---------------------------

  const query = new URLSearchParams(window.location.search);
  const view = {
    site: query.get("site") || "",
    line: query.get("line") || "",
    equipment: query.get("equipment") || "",
    range: RANGES[query.get("range")] ? query.get("range") : "24h",
    interval: ["shift", "1h", "1d"].includes(query.get("interval")) ? query.get("interval") : "shift",
    from: query.get("from"),
    to: query.get("to"),
  };

  function period() {
    if (view.from && view.to) return { from: view.from, to: view.to };
    const end = new Date();
    return { from: new Date(end.getTime() - RANGES[view.range]).toISOString(), to: end.toISOString() };
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
      if (view[key]) params.set(key, view[key]);
    }
    window.history.replaceState(null, "", `${window.location.pathname}?${params}`);
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
    if (error instanceof ApiError && error.status === 429) return "the API is busy (rate limit); retry in a minute";
    return `could not load: ${error.message}`;
  }

  // -- pickers --------------------------------------------------------------------------------

  function fill(select, items, selected, allLabel) {
    select.replaceChildren();
    if (allLabel) select.append(new Option(allLabel, ""));
    for (const [value, label] of items) select.append(new Option(label, value));
    select.value = items.some(([v]) => v === selected) ? selected : "";
  }

  async function loadPickers() {
    try {
      const sites = (await api("/v1/sites")).sites || [];
      if (!view.site && sites.length) view.site = sites[0].site_id;
      fill($("site"), sites.map((s) => [s.site_id, s.name || s.site_id]), view.site, null);
      const lines = view.site ? (await api("/v1/lines", { site: view.site })).lines || [] : [];
      fill($("line"), lines.map((l) => [l.line_id, l.line_id]), view.line, "All lines");
      const equipment = view.site
        ? (await api("/v1/equipment", { site: view.site, line: view.line || null })).equipment || []
        : [];
      fill($("equipment"), equipment.map((e) => [e.equipment_id, e.equipment_id]), view.equipment, "All equipment");
      if (view.equipment && !equipment.some((e) => e.equipment_id === view.equipment)) view.equipment = "";
      return equipment.map((e) => e.equipment_id);
    } catch (error) {
      // Without the hierarchy the page still works for a scope given in the URL.
      message(`Sites and equipment: ${explain(error)}`);
      if (view.site) fill($("site"), [[view.site, view.site]], view.site, null);
      if (view.equipment) fill($("equipment"), [[view.equipment, view.equipment]], view.equipment, null);
      return view.equipment ? [view.equipment] : [];
    }
  }

  // -- panels ---------------------------------------------------------------------------------

  function chart(id, config) {
    if (charts[id]) charts[id].destroy();
    config.options = Object.assign({ animation: false, responsive: true, maintainAspectRatio: false }, config.options);
    charts[id] = new window.Chart($(id), config);
  }

  function setTile(name, value, detail) {
    const tile = $(`tile-${name}`);
    tile.querySelector(".value").textContent = pct(value);
    tile.querySelector(".detail").textContent = detail || "";
    tile.dataset.value = value === null || value === undefined ? "" : String(value);
    tile.className = `tile${name === "oee" ? " tile-oee" : ""} ${grade(value)}`.trim();
  }

  function bucketLabel(bucket) {
    const start = new Date(bucket.start);
    if (bucket.shift) return `${dayFormat.format(start)} ${bucket.shift}`;
    if (view.interval === "1d") return dayFormat.format(start);
    return timeFormat.format(start);
  }

  async function loadOee(s, p) {
    try {
      const body = await api("/v1/oee", { ...s, ...p, interval: view.interval, tz });
      const total = body.total || {};
      const c = total.components || {};
      setTile("oee", total.oee, `${c.good ?? 0} good parts of ${c.produced ?? 0}`);
      setTile("availability", total.availability, `running ${hours(c.production_s)} of ${hours(c.planned_busy_s)} planned (machine hours)`);
      setTile("performance", total.performance, `${hours(c.ideal_produced_s)} at ideal speed in ${hours(c.production_s)} running`);
      setTile("quality", total.quality, `${c.scrap ?? 0} scrap, ${c.rework ?? 0} rework`);
      const buckets = body.groups && body.groups.length ? body.groups[0].buckets : [];
      chart("trend", {
        type: "bar",
        data: {
          labels: buckets.map(bucketLabel),
          datasets: [
            { type: "bar", label: "OEE", data: buckets.map((b) => b.oee === null ? null : b.oee * 100), backgroundColor: "#2b6cb0", order: 2 },
            { type: "line", label: "Availability", data: buckets.map((b) => b.availability === null ? null : b.availability * 100), borderColor: "#1f9d55", backgroundColor: "#1f9d55", order: 1 },
            { type: "line", label: "Performance", data: buckets.map((b) => b.performance === null ? null : b.performance * 100), borderColor: "#d4a017", backgroundColor: "#d4a017", order: 1 },
            { type: "line", label: "Quality", data: buckets.map((b) => b.quality === null ? null : b.quality * 100), borderColor: "#805ad5", backgroundColor: "#805ad5", order: 1 },
          ],
        },
        options: { scales: { y: { min: 0, suggestedMax: 100, title: { display: true, text: "%" } } } },
      });
      $("trend-note").textContent = buckets.length ? "" : "No production recorded in this period.";
    } catch (error) {
      for (const name of ["oee", "availability", "performance", "quality"]) setTile(name, null, "");
      $("trend-note").textContent = `OEE: ${explain(error)}`;
    }
  }

  async function loadPareto(s, p) {
    try {
      const body = await api("/v1/downtime/pareto", { ...s, ...p, by: "reason", top: 8 });
      const items = body.items || [];
      chart("pareto", {
        type: "bar",
        data: {
          labels: items.map((i) => i.reason || "(no reason)"),
          datasets: [
            { type: "bar", label: "Downtime (min)", data: items.map((i) => i.seconds / 60), backgroundColor: "#d64545", yAxisID: "y", order: 2 },
            { type: "line", label: "Cumulative %", data: items.map((i) => (i.cumulative_share || 0) * 100), borderColor: "#1d2733", backgroundColor: "#1d2733", yAxisID: "share", order: 1 },
          ],
        },
        options: {
          scales: {
            y: { beginAtZero: true, title: { display: true, text: "minutes" } },
            share: { position: "right", min: 0, max: 100, grid: { drawOnChartArea: false }, title: { display: true, text: "cumulative %" } },
          },
        },
      });
      $("pareto-note").textContent = items.length
        ? `Total downtime ${duration(body.total_s)}${body.other_s ? `, other reasons ${duration(body.other_s)}` : ""}.`
        : "No downtime in this period.";
    } catch (error) {
      $("pareto-note").textContent = `Downtime: ${explain(error)}`;
    }
  }

  async function loadTimeline(equipmentIds, p) {
    const ids = (view.equipment ? [view.equipment] : equipmentIds).slice(0, 12);
    if (!ids.length) {
      $("timeline-note").textContent = "Pick a site with equipment to see machine states.";
      return;
    }
    const results = await Promise.allSettled(
      ids.map((id) => api(`/v1/equipment/${encodeURIComponent(id)}/states`, { ...p, site: view.site || null })));
    const byState = {};
    const failed = [];
    results.forEach((result, i) => {
      if (result.status !== "fulfilled") {
        failed.push(`${ids[i]}: ${explain(result.reason)}`);
        return;
      }
      for (const interval of result.value.intervals || []) {
        const state = interval.state || "unknown";
        (byState[state] = byState[state] || []).push({ x: [Date.parse(interval.start), Date.parse(interval.end)], y: ids[i] });
      }
    });
    const from = Date.parse(p.from);
    const to = Date.parse(p.to);
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
          x: { type: "linear", min: from, max: to, ticks: { maxTicksLimit: 8, callback: (v) => (to - from > 2 * 86400e3 ? dayFormat : clockFormat).format(new Date(v)) } },
          y: { stacked: true },
        },
        plugins: {
          tooltip: {
            callbacks: {
              label: (ctx) => {
                const [a, b] = ctx.raw.x;
                return `${ctx.dataset.label}: ${timeFormat.format(new Date(a))} – ${clockFormat.format(new Date(b))} (${duration((b - a) / 1000)})`;
              },
            },
          },
        },
      },
    });
    $("timeline-note").textContent = failed.join("; ");
  }

  async function loadFleet() {
    const body = $("fleet").querySelector("tbody");
    try {
      const agents = (await api("/v1/agents", { site: view.site || null })).agents || [];
      body.replaceChildren();
      for (const a of agents) {
        const row = body.insertRow();
        const since = a.seconds_since_seen;
        const status = since === null || since === undefined ? ["lost", "never seen"]
          : since < 300 ? ["ok", "reporting"] : since < 3600 ? ["late", "late"] : ["lost", "silent"];
        const badge = document.createElement("span");
        badge.className = `badge ${status[0]}`;
        badge.textContent = status[1];
        row.insertCell().textContent = a.agent_id;
        row.insertCell().textContent = a.site_id;
        row.insertCell().append(badge);
        row.insertCell().textContent = since === null || since === undefined ? "–" : `${duration(since)} ago`;
        row.insertCell().textContent = a.outbox_depth === null || a.outbox_depth === undefined ? "–" : `${a.outbox_depth} batches`;
        row.insertCell().textContent = duration(a.outbox_oldest_unacked_s);
        row.insertCell().textContent = a.version || "–";
      }
      $("fleet-note").textContent = agents.length ? "" : "No agent enrolled for this site yet.";
    } catch (error) {
      $("fleet-note").textContent = `Agents: ${explain(error)}`;
    }
  }

  // -- wiring ---------------------------------------------------------------------------------

  async function refresh() {
    document.body.dataset.state = "loading";
    message("");
    const equipmentIds = await loadPickers();
    saveView();
    const s = scope();
    const p = period();
    $("scope-label").textContent = s ? `${s.scope} ${s.id}, ${timeFormat.format(new Date(p.from))} – ${timeFormat.format(new Date(p.to))}` : "";
    if (!s) {
      message("No site yet: enroll an agent and let it send data (see the README).");
    } else {
      await Promise.all([loadOee(s, p), loadPareto(s, p), loadTimeline(equipmentIds, p)]);
    }
    await loadFleet();
    document.body.dataset.state = "ready";
  }

  function onPick(key, resets) {
    return (event) => {
      if (key === "range" && event.target.value === "custom") return;
      view[key] = event.target.value;
      for (const other of resets) view[other] = "";
      if (key === "range") { view.from = null; view.to = null; }
      refresh();
    };
  }

  function start() {
    $("tz").textContent = tz;
    if (view.from && view.to) {
      // A link with an explicit window: show it as such until another period is picked.
      $("range").prepend(new Option("Window from the link", "custom"));
      $("range").value = "custom";
    } else {
      $("range").value = view.range;
    }
    $("interval").value = view.interval;
    $("site").addEventListener("change", onPick("site", ["line", "equipment"]));
    $("line").addEventListener("change", onPick("line", ["equipment"]));
    $("equipment").addEventListener("change", onPick("equipment", []));
    $("range").addEventListener("change", onPick("range", []));
    $("interval").addEventListener("change", onPick("interval", []));
    // A link with #token=... (the one `make demo` prints) signs the tab in; the token leaves
    // the address bar at once so it is not bookmarked or shared with the page's address.
    const linked = new URLSearchParams(window.location.hash.slice(1)).get("token");
    if (linked) {
      sessionStorage.setItem(TOKEN_KEY, linked);
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
    $("token").value = token();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      refresh();
    });
    $("token-clear").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token").value = "";
      refresh();
    });
    if (!window.Chart) {
      message("The chart library did not load; numbers are shown without charts.");
      window.Chart = function () { return { destroy() {} }; };
    }
    refresh();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
