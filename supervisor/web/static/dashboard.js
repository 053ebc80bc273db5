// mlx-supervisor dashboard: keeps the server-rendered page live over Server-Sent Events and draws one SVG
// chart per job. Every value from the daemon goes into the page as text (textContent, attribute values),
// never as markup. No library, no build step.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const W = 800, H = 240, LEFT = 64, RIGHT = 96, TOP = 10, BOTTOM = 24;
  const SERIES = [["sampled", 1, "footprint (sampled)"], ["active", 2, "MLX active"], ["cache", 3, "MLX cache"]];
  const body = document.body;
  const token = body.dataset.token || "";
  const state = { status: null, rings: {}, markers: {}, decisions: {}, controls: [], live: 600,
                  view: "live", run: {} };

  function q(path) { return token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path; }

  function fmtBytes(n) {
    if (n === null || n === undefined || n === 0) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, v = Math.abs(n);
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function restartsText(row) {
    const reasons = Object.entries(row.restart_reasons || {}).sort();
    return String(row.restarts || 0) + (reasons.length ? " (" + reasons.map(([r, n]) => r + " " + n).join(", ") + ")" : "");
  }

  function leakText(row) {
    const leak = row.leak;
    if (!leak || typeof leak !== "object" || !leak.verdict) return "";
    return leak.meaning ? leak.verdict + ": " + leak.meaning : String(leak.verdict);
  }

  function jobRow(row) {
    const tr = el("tr", { "data-job": row.name });
    tr.append(el("th", { scope: "row" }, row.name));
    const cells = [["state", row.state], ["step", row.step === null ? "-" : row.step + "/" + (row.target_steps || "?")],
      ["rate", Number(row.steps_per_second || 0).toFixed(1)], ["memory", fmtBytes(row.sampled_bytes) + " / " + fmtBytes(row.budget_bytes)],
      ["leak", ((row.leak_bytes_per_step || 0) / 1048576).toFixed(2)], ["restarts", restartsText(row)],
      ["batch", row.batch === null ? "-" : row.batch + "×" + row.accum], ["verdict", leakText(row)]];
    for (const [field, value] of cells) tr.append(el("td", { "data-field": field }, value));
    if (state.controls.length) {
      const td = el("td", { "data-field": "control" });
      for (const command of state.controls) {
        const button = el("button", { type: "button", "data-command": command }, command);
        button.addEventListener("click", () => control(command, row.name, button));
        td.append(button);
      }
      tr.append(td);
    }
    return tr;
  }

  function rankRow(job, rank) {
    const tr = el("tr", { class: "rank", "data-job": job, "data-rank": rank.rank });
    tr.append(el("th", { scope: "row" }, "rank " + rank.rank + (rank.host ? "@" + rank.host : "")));
    for (const v of [rank.state, rank.step, "", fmtBytes(rank.sampled_bytes) + " / " + fmtBytes(rank.budget_bytes),
      "", "", "", rank.decision || ""]) tr.append(el("td", {}, v));
    return tr;
  }

  function renderTable() {
    const tbody = document.querySelector("#jobs tbody");
    const rows = [];
    for (const row of (state.status && state.status.jobs) || []) {
      rows.push(jobRow(row));
      for (const rank of row.ranks || []) rows.push(rankRow(row.name, rank));
    }
    tbody.replaceChildren(...rows);
    const head = document.querySelector("#jobs thead tr");
    if (state.controls.length && !head.querySelector("[data-field=control]")) head.append(el("th", { scope: "col", "data-field": "control" }, "control"));
  }

  function renderSystem() {
    const status = state.status || {};
    const system = status.system || {}, daemon = status.daemon || {};
    const pressure = { 1: "normal", 2: "warn", 4: "critical" }[system.pressure] || "n/a";
    const values = { "available": fmtBytes(system.available_bytes), "of total": fmtBytes(system.total_bytes),
      "system floor": system.floor_bytes ? fmtBytes(system.floor_bytes) : "off", "pressure": pressure,
      "daemon": (daemon.version || "?") + ", RSS " + fmtBytes(daemon.rss_bytes) };
    for (const [k, v] of Object.entries(values)) {
      const dd = document.querySelector('#system dd[data-field="' + k + '"]');
      if (dd) dd.textContent = v;
    }
    const client = document.getElementById("client");
    if (status.client) client.textContent = status.client.name + " (role " + status.client.role + ")";
  }

  function renderDecisions() {
    const all = [];
    for (const [job, list] of Object.entries(state.decisions)) for (const d of list) all.push([d.t, job, d]);
    all.sort((a, b) => b[0] - a[0]);
    const items = all.slice(0, 20).map(([t, job, d]) => {
      const li = el("li");
      li.append(el("time", {}, new Date(t * 1000).toLocaleTimeString()), " ", el("b", {}, job), " " + d.action + ": " + d.reason);
      return li;
    });
    document.getElementById("decisions").replaceChildren(...(items.length ? items : [el("li", {}, "none yet")]));
  }

  function chart(job, row, points, markers, span) {
    const now = Date.now() / 1000;
    // The live window grows to ``span`` seconds: a young dashboard fills its chart instead of a corner.
    const first = points.length ? points[0][0] : now - 60;
    const x0 = span === null ? first : Math.max(now - span, Math.min(first, now - 60));
    const x1 = span === null ? (points.length ? points[points.length - 1][0] : now) : now;
    let ymax = (row && row.kill_bytes) || 0;
    for (const p of points) for (const [, i] of SERIES) if (p[i] > ymax) ymax = p[i];
    ymax = (ymax || 1) * 1.05;
    const sx = (t) => LEFT + (W - LEFT - RIGHT) * (t - x0) / Math.max(1e-9, x1 - x0);
    const sy = (v) => TOP + (H - TOP - BOTTOM) * (1 - v / ymax);
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": "memory of " + job });
    root.append(svg("rect", { x: LEFT, y: TOP, width: W - LEFT - RIGHT, height: H - TOP - BOTTOM, class: "plot" }));
    for (const f of [0, 0.25, 0.5, 0.75, 1]) {
      const y = sy(ymax / 1.05 * f);
      root.append(svg("text", { x: LEFT - 6, y: y + 4, class: "tick", "text-anchor": "end" }, f === 0 ? "0" : fmtBytes(ymax / 1.05 * f)));
    }
    for (const name of ["warn", "budget", "kill"]) {
      const v = row && row[name + "_bytes"];
      if (!v) continue;
      root.append(svg("line", { x1: LEFT, x2: W - RIGHT, y1: sy(v), y2: sy(v), class: "limit " + name }));
      root.append(svg("text", { x: W - RIGHT + 4, y: sy(v) + 4, class: "limit-label " + name }, name + " " + fmtBytes(v)));
    }
    for (const m of markers) {
      if (m.t < x0 || m.t > x1) continue;
      const line = svg("line", { x1: sx(m.t), x2: sx(m.t), y1: TOP, y2: H - BOTTOM, class: "marker " + m.kind });
      line.append(svg("title", {}, m.text));
      root.append(line);
    }
    for (const [name, i] of SERIES) {
      const coords = points.filter((p) => p[i] !== null && p[i] !== undefined && p[0] >= x0)
        .map((p) => sx(p[0]).toFixed(1) + "," + sy(p[i]).toFixed(1));
      if (coords.length) root.append(svg("polyline", { class: "series " + name, points: coords.join(" ") }));
    }
    const ago = now - x0;
    const left = span === null ? new Date(x0 * 1000).toLocaleTimeString()
      : "-" + (ago >= 120 ? Math.round(ago / 60) + " min" : Math.round(ago) + " s");
    SERIES.concat([["restart", -1, "restart"]]).forEach(([name, , label], i) => {
      const y = H - 6, x = LEFT + 150 + 130 * i;  // the legend, along the time axis
      root.append(name === "restart" ? svg("line", { x1: x, x2: x, y1: y - 10, y2: y + 2, class: "key restart" })
        : svg("line", { x1: x - 8, x2: x + 8, y1: y - 4, y2: y - 4, class: "series " + name }));
      root.append(svg("text", { x: x + 12, y: y, class: "legend" }, label));
    });
    root.append(svg("text", { x: LEFT, y: H - 6, class: "tick" }, left));
    root.append(svg("text", { x: W - RIGHT, y: H - 6, class: "tick", "text-anchor": "end" },
      span === null ? new Date(x1 * 1000).toLocaleTimeString() : "now"));
    return root;
  }

  function renderCharts() {
    const figures = document.getElementById("figures");
    const rows = (state.status && state.status.jobs) || [];
    const out = [];
    for (const row of rows) {
      const run = state.view === "run" ? state.run[row.name] : null;
      const points = run ? run.points : state.rings[row.name] || [];
      const markers = run ? run.markers : state.markers[row.name] || [];
      const figure = el("figure", { "data-job": row.name });
      const last = points.length ? points[points.length - 1] : null;
      const restarts = markers.filter((m) => m.kind === "restart").length;
      figure.append(el("figcaption", {}, row.name + ": footprint " + fmtBytes(last && last[1]) + " of budget " +
        fmtBytes(row.budget_bytes) + "; MLX active " + fmtBytes(last && last[2]) + ", cache " + fmtBytes(last && last[3]) +
        "; " + restarts + " restart" + (restarts === 1 ? "" : "s") + " marked"));
      figure.append(chart(row.name, row, points, markers, run ? null : state.live));
      out.push(figure);
    }
    figures.replaceChildren(...out);
    document.getElementById("charts").hidden = false;
  }

  function render() { renderTable(); renderSystem(); renderDecisions(); renderCharts(); }

  function control(command, job, button) {
    if (command !== "checkpoint" && !window.confirm(command + " " + job + "?")) return;
    button.disabled = true;
    fetch("/api/control", { method: "POST", headers: { "Content-Type": "application/json", "X-Mlxsup-Token": token },
      body: JSON.stringify({ command: command, job: job }) })
      .then((r) => r.json().then((data) => setError(r.ok ? "" : job + ": " + command + " refused: " + data.error)))
      .catch((e) => setError(String(e))).finally(() => { button.disabled = false; });
  }

  function setError(text) { document.getElementById("error").textContent = text; }

  function loadRuns() {
    for (const row of (state.status && state.status.jobs) || []) {
      fetch(q("/api/history?job=" + encodeURIComponent(row.name)), { headers: { "X-Mlxsup-Token": token } })
        .then((r) => r.json()).then((data) => { if (data.points) { state.run[row.name] = data; renderCharts(); } })
        .catch((e) => setError(String(e)));
    }
  }

  for (const input of document.querySelectorAll('input[name="view"]')) {
    input.addEventListener("change", () => { state.view = input.value; if (state.view === "run") loadRuns(); renderCharts(); });
  }

  const connection = document.getElementById("connection");
  body.dataset.loadedAt = String(Date.now());
  body.dataset.updates = "0";
  const source = new EventSource(q("/events"));
  function counted() { body.dataset.updates = String(Number(body.dataset.updates) + 1); }
  source.addEventListener("open", () => { connection.textContent = "live"; });
  source.addEventListener("error", () => { connection.textContent = "reconnecting to the dashboard…"; });
  source.addEventListener("snapshot", (e) => {
    const s = JSON.parse(e.data);
    Object.assign(state, { status: s.status, rings: s.rings, markers: s.markers, decisions: s.decisions,
      controls: s.controls || [], live: s.live_seconds || 600 });
    setError(s.error || "");
    counted(); render();
  });
  source.addEventListener("tick", (e) => {
    const t = JSON.parse(e.data);
    state.status = t.status;
    const cap = Math.ceil(state.live * 2.5) + 10;
    for (const [job, p] of Object.entries(t.points)) {
      const ring = state.rings[job] || (state.rings[job] = []);
      ring.push(p);
      while (ring.length > cap || (ring.length && ring[0][0] < p[0] - state.live)) ring.shift();
    }
    for (const [job, m] of Object.entries(t.markers || {})) (state.markers[job] || (state.markers[job] = [])).push(m);
    setError("");
    connection.textContent = "live, updated " + new Date(t.t * 1000).toLocaleTimeString();
    counted(); render();
  });
  source.addEventListener("event", (e) => {
    const u = JSON.parse(e.data);
    if (u.decision) {
      const list = state.decisions[u.job] || (state.decisions[u.job] = []);
      list.push(u.decision);
      if (list.length > 20) list.shift();
    }
    if (u.marker) {
      const list = state.markers[u.job] || (state.markers[u.job] = []);
      list.push(u.marker);
      if (list.length > 200) list.shift();
    }
    if (u.state && state.status) for (const row of state.status.jobs) if (row.name === u.job) row.state = u.state;
    body.dataset.lastEvent = JSON.stringify({ job: u.job, kind: u.kind, text: u.text || u.state || (u.decision && u.decision.reason) || "", at: Date.now() });
    counted(); render();
  });
  source.addEventListener("problem", (e) => { setError("daemon: " + JSON.parse(e.data).error); counted(); });
})();
