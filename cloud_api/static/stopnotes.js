/* Classifying stops from the state timeline: a click on a fault or idle bar opens a small
 * form (a reason from the equipment's reason list, a note, optionally the operator who
 * reported it) that annotates that stop: POST /v1/equipment/{id}/annotations with the stop's
 * start (`stop_start` of the interval: a stop that began before the shown window is cut there,
 * its bar starts at the window's start, but the annotation names the stop's real start). A stop already classified can be given another reason (the newer annotation wins) or
 * taken back to the PLC's reason (DELETE of its annotation). After a change the page's panels
 * reload (the `stop-classified` event), so the Pareto and the timeline show the new reason.
 * Kept apart from dashboard.js: it needs of it only the timeline chart, whose bars carry
 * their interval of /v1/plant/states.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "edge-gateway-token";
  const STOPS = ["fault", "idle"];
  const $ = (id) => document.getElementById(id);
  let current = null; // the interval the form is open for

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
  }

  async function call(method, path, params, body) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) url.searchParams.set(k, v);
    const headers = { Accept: "application/json", Authorization: `Bearer ${token()}` };
    if (body) headers["Content-Type"] = "application/json";
    const response = await fetch(url, { method, headers, body: body ? JSON.stringify(body) : undefined, cache: "no-store" });
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try {
        const problem = await response.json();
        if (problem.detail) detail = typeof problem.detail === "string" ? problem.detail : JSON.stringify(problem.detail);
      } catch (_) { /* not JSON: the status says enough */ }
      throw new Error(detail);
    }
    return response.status === 204 ? null : response.json();
  }

  function when(iso) {
    return new Date(iso).toLocaleString();
  }

  // The instant of the state event that began the stop: what an annotation names it by.
  function stopStart(interval) {
    return interval.stop_start || interval.start;
  }

  async function reasonsOf(site, equipment) {
    const body = await call("GET", `/v1/equipment/${encodeURIComponent(equipment)}`, { site });
    const rows = Array.isArray(body.equipment) ? body.equipment : [body];
    const row = rows.find((r) => r.equipment_id === equipment) || rows[0] || {};
    return [...new Set(Object.values(row.reasons || {}))].sort();
  }

  async function open(interval) {
    current = interval;
    const form = $("stop-form");
    $("stop-form-error").textContent = "";
    const began = stopStart(interval);
    const cut = began !== interval.start ? " (began before the shown period)" : "";
    $("stop-form-what").textContent =
      `${interval.equipment_id}: ${interval.state} from ${when(began)}${cut} to ${when(interval.end)}`;
    $("stop-form-plc").textContent = interval.plc_reason || "no reason";
    $("stop-form-current").textContent = interval.reason || "no reason";
    $("stop-form-note").value = "";
    $("stop-form-operator").value = "";
    $("stop-form-remove").hidden = !interval.annotation;
    const select = $("stop-form-reason");
    select.replaceChildren(new Option("loading reasons…", ""));
    if (typeof form.showModal === "function") form.showModal(); else form.setAttribute("open", "");
    try {
      const reasons = await reasonsOf(interval.site_id, interval.equipment_id);
      select.replaceChildren(...reasons.map((r) => new Option(r, r, false, r === interval.reason)));
      if (!reasons.length) $("stop-form-error").textContent = "This equipment reports no reason list.";
    } catch (error) {
      select.replaceChildren();
      $("stop-form-error").textContent = `Reasons unavailable: ${error.message}`;
    }
    form.dataset.ready = "true";
  }

  function close() {
    const form = $("stop-form");
    form.dataset.ready = "false";
    if (typeof form.close === "function") form.close(); else form.removeAttribute("open");
    current = null;
  }

  function changed(what) {
    document.body.dataset.stopNote = what;
    document.dispatchEvent(new CustomEvent("stop-classified", { detail: what }));
  }

  async function save(event) {
    event.preventDefault();
    if (!current) return;
    const reason = $("stop-form-reason").value;
    if (!reason) { $("stop-form-error").textContent = "Pick a reason."; return; }
    const body = { site: current.site_id, ts: stopStart(current), kind: "downtime", reason };
    const note = $("stop-form-note").value.trim();
    const operator = $("stop-form-operator").value.trim();
    if (note) body.note = note;
    if (operator) body.operator = operator;
    try {
      const made = await call("POST", `/v1/equipment/${encodeURIComponent(current.equipment_id)}/annotations`, null, body);
      close();
      changed(`classified ${made.annotation_id}`);
    } catch (error) {
      $("stop-form-error").textContent = `Not saved: ${error.message}`;
    }
  }

  async function remove() {
    if (!current || !current.annotation) return;
    const { site_id: site, equipment_id: equipment, annotation } = current;
    try {
      await call("DELETE", `/v1/equipment/${encodeURIComponent(equipment)}/annotations/${annotation.annotation_id}`, { site });
      close();
      changed(`removed ${annotation.annotation_id}`);
    } catch (error) {
      $("stop-form-error").textContent = `Not removed: ${error.message}`;
    }
  }

  function clicked(event) {
    const chart = window.Chart && window.Chart.getChart ? window.Chart.getChart("timeline") : null;
    if (!chart) return;
    const hits = chart.getElementsAtEventForMode(event, "nearest", { intersect: true }, false);
    for (const hit of hits) {
      const point = chart.data.datasets[hit.datasetIndex].data[hit.index];
      const interval = point && point.interval;
      if (interval && STOPS.includes(interval.state)) { open(interval); return; }
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const canvas = $("timeline");
    const form = $("stop-form");
    if (!canvas || !form) return;
    canvas.addEventListener("click", clicked);
    form.addEventListener("submit", save);
    $("stop-form-cancel").addEventListener("click", close);
    $("stop-form-remove").addEventListener("click", remove);
  });
})();
