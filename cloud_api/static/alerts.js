/* The dashboard's alerts panel: the newest alerts (open first) from GET /v1/alerts, with the
 * same token as the rest of the page (sessionStorage or localStorage), refreshed every 30 s.
 * Kept apart from dashboard.js: it needs nothing of it but the panel's table in index.html.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "edge-gateway-token";
  const $ = (id) => document.getElementById(id);

  function cell(text) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    return td;
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "–";
  }

  async function load() {
    const table = $("alerts");
    const note = $("alerts-note");
    if (!table || !note) return;
    const token = sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
    if (!token) { note.textContent = "Paste an API token to see alerts."; return; }
    try {
      const url = new URL("/v1/alerts", window.location.origin);
      url.searchParams.set("state", "all");
      url.searchParams.set("limit", "20");
      const response = await fetch(url, {
        headers: { Accept: "application/json", Authorization: `Bearer ${token}` },
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const alerts = (await response.json()).alerts || [];
      alerts.sort((a, b) => (a.resolved_at === null) === (b.resolved_at === null) ? 0 : a.resolved_at === null ? -1 : 1);
      const body = table.querySelector("tbody");
      body.replaceChildren();
      for (const a of alerts) {
        const row = document.createElement("tr");
        row.append(cell(a.resolved_at ? "resolved" : "OPEN"), cell(a.rule_id), cell(a.summary),
          cell(when(a.opened_at)), cell(when(a.resolved_at)));
        body.append(row);
      }
      note.textContent = alerts.length ? "" : "No alerts.";
    } catch (err) {
      note.textContent = `Alerts unavailable: ${err.message}`;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    load();
    setInterval(load, 30000);
    const form = $("token-form");
    if (form) form.addEventListener("submit", () => setTimeout(load, 0));
  });
})();
