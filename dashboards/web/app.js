// strangler's dashboard: plain JavaScript, no build step. Pages are hash routes:
//   #/                  every route (overview)
//   #/route/NAME        one route: series, markers, diffs, samples
//   #/trace/ID          one trace as a waterfall
// All numbers come from the collector's JSON API, which runs the named queries in
// dashboards/sql/ (the same SQL as the Grafana dashboard).
"use strict";

const page = document.getElementById("page");
const crumbs = document.getElementById("crumbs");
const sinceSel = document.getElementById("since");
const autoBox = document.getElementById("auto");
const updated = document.getElementById("updated");
const REFRESH_MS = 30000;
const COLORS = { legacy: "#8a63d2", new: "#1f9d6b", shadow: "#c98a1b" };
let charts = [];
let timer = null;
let overviewSort = { key: "route", asc: true };

sinceSel.value = localStorage.getItem("strangler.since") || "1h";
sinceSel.addEventListener("change", () => {
  localStorage.setItem("strangler.since", sinceSel.value);
  render();
});
autoBox.addEventListener("change", schedule);
window.addEventListener("hashchange", render);
window.addEventListener("resize", () => charts.forEach((c) => c.fit && c.fit()));

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function num(v) {
  if (v === null || v === undefined || v === "") return null;
  const n = Number(v);
  return Number.isFinite(n) ? n : null;
}
function pct(v, digits = 1) {
  const n = num(v);
  return n === null ? "–" : (100 * n).toFixed(digits) + " %";
}
function ms(v) {
  const n = num(v);
  if (n === null) return "–";
  return n >= 100 ? n.toFixed(0) + " ms" : n.toFixed(1) + " ms";
}
function count(v) {
  const n = num(v) || 0;
  return n >= 10000 ? (n / 1000).toFixed(1) + "k" : String(Math.round(n));
}
// The queries return DateTime('UTC') as "YYYY-MM-DD hh:mm:ss".
function epoch(v) {
  if (typeof v === "number") return v;
  const t = Date.parse(String(v).replace(" ", "T") + "Z");
  return Number.isFinite(t) ? t / 1000 : null;
}
function when(v) {
  const t = epoch(v);
  return t === null ? "" : new Date(t * 1000).toLocaleString();
}

function token() {
  return sessionStorage.getItem("strangler.token") || "";
}
class Unauthorized extends Error {}
async function api(path) {
  const headers = {};
  if (token()) headers.Authorization = "Bearer " + token();
  const r = await fetch(path, { headers });
  if (r.status === 401) throw new Unauthorized();
  let body;
  try {
    body = await r.json();
  } catch (e) {
    throw new Error(`${path}: ${r.status} ${r.statusText}`);
  }
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function schedule() {
  clearTimeout(timer);
  if (autoBox.checked) timer = setTimeout(() => render(true), REFRESH_MS);
}

async function render(quiet) {
  const hash = location.hash.replace(/^#/, "") || "/";
  const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
  const since = encodeURIComponent(sinceSel.value);
  if (!quiet) page.setAttribute("aria-busy", "true");
  try {
    if (parts[0] === "route" && parts[1]) {
      crumbs.innerHTML = `<a href="#/">Overview</a> / route <b>${esc(parts[1])}</b>`;
      const doc = await api(`/api/route?route=${encodeURIComponent(parts[1])}&since=${since}`);
      routePage(doc);
    } else if (parts[0] === "trace" && parts[1]) {
      crumbs.innerHTML = `<a href="#/">Overview</a> / trace <code>${esc(parts[1])}</code>`;
      const doc = await api(`/api/trace/${encodeURIComponent(parts[1])}`);
      tracePage(doc);
    } else {
      crumbs.innerHTML = "Overview";
      const doc = await api(`/api/overview?since=${since}`);
      overviewPage(doc);
    }
    updated.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    clearCharts();
    if (e instanceof Unauthorized) {
      tokenForm();
    } else {
      page.innerHTML = `<div class="error-box" role="alert">Cannot load this page: ${esc(e.message)}</div>`;
    }
  } finally {
    page.removeAttribute("aria-busy");
    schedule();
  }
}

function tokenForm() {
  page.innerHTML = `<div class="card"><p>This collector needs its bearer token (<code>STRANGLER_COLLECTOR_TOKEN</code>).</p>
    <form class="token"><input type="password" name="t" placeholder="token" autocomplete="off" required>
    <button>Use token</button></form></div>`;
  page.querySelector("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("strangler.token", ev.target.t.value.trim());
    render();
  });
}

function clearCharts() {
  charts.forEach((c) => c.destroy && c.destroy());
  charts = [];
}

// ---------- overview ----------

function stateClass(s) {
  if (!s) return "";
  if (s.startsWith("shadow")) return "shadow";
  if (s.startsWith("canary") || s.startsWith("promoted") || s === "new") return "new-side";
  return "";
}

function sparkline(points, from, to) {
  if (!points.length) return `<span class="muted">–</span>`;
  const w = 120, h = 28;
  const max = Math.max(...points.map((p) => p.v), 1);
  const span = Math.max(to - from, 1);
  const xy = points.map((p) => `${(((p.t - from) / span) * w).toFixed(1)},${(h - 2 - (p.v / max) * (h - 4)).toFixed(1)}`);
  return `<svg class="spark" viewBox="0 0 ${w} ${h}" role="img" aria-label="requests over time"><polyline points="${xy.join(" ")}"/></svg>`;
}

const OVERVIEW_COLUMNS = [
  ["route", "Route", false],
  ["state", "State", false],
  ["new_share", "Traffic legacy / new", true],
  ["legacy_error_rate", "Errors legacy", true],
  ["new_error_rate", "Errors new", true],
  ["legacy_p99_ms", "p99 legacy", true],
  ["new_p99_ms", "p99 new", true],
  ["match_rate", "Diff match", true],
  ["requests", "Requests", true],
];

function overviewPage(doc) {
  clearCharts();
  const states = new Map((doc.route_states || []).map((s) => [s.route, s]));
  const rows = (doc.overview_routes || []).map((r) => ({
    ...r,
    state: r.state || (states.get(r.route) || {}).state || "",
    requests: (num(r.legacy_requests) || 0) + (num(r.new_requests) || 0),
  }));
  for (const [route, s] of states) {
    if (!rows.some((r) => r.route === route)) rows.push({ route, state: s.state, requests: 0, idle: true });
  }
  const spark = new Map();
  for (const p of doc.overview_sparklines || []) {
    if (!spark.has(p.route)) spark.set(p.route, []);
    spark.get(p.route).push({ t: epoch(p.time), v: num(p.requests) || 0 });
  }
  const { key, asc } = overviewSort;
  rows.sort((a, b) => {
    const x = a[key], y = b[key];
    const nx = num(x), ny = num(y);
    const c = nx !== null || ny !== null ? (nx ?? -1) - (ny ?? -1) : String(x ?? "").localeCompare(String(y ?? ""));
    return asc ? c : -c;
  });

  let html = `<h1>Routes</h1>`;
  html += `<section class="card"><h2>Migration burndown: share of all traffic still on legacy</h2><div id="burndown" class="chart"></div></section>`;
  if (!rows.length) {
    html += `<div class="empty" id="no-routes">No traffic recorded in this window yet. Point the router's <code>[telemetry] otlp_endpoint</code> at this collector and send some requests.</div>`;
  } else {
    html += `<section class="card scroll"><table id="routes"><thead><tr>`;
    for (const [k, label, numeric] of OVERVIEW_COLUMNS) {
      const sorted = k === key ? ` sorted${asc ? " asc" : ""}` : "";
      html += `<th class="sortable${numeric ? " num" : ""}${sorted}" data-key="${k}" tabindex="0">${esc(label)}</th>`;
    }
    html += `<th>Requests over time</th></tr></thead><tbody>`;
    for (const r of rows) {
      const share = num(r.new_share);
      const err = (v, other) => {
        const n = num(v), o = num(other);
        const cls = n !== null && o !== null && n > o + 0.01 ? "bad" : "";
        return `<span class="${cls}">${pct(v, 2)}</span>`;
      };
      html += `<tr data-route="${esc(r.route)}">
        <td data-col="route"><a href="#/route/${encodeURIComponent(r.route)}">${esc(r.route)}</a></td>
        <td data-col="state"><span class="state ${stateClass(r.state)}">${esc(r.state || "not recorded")}</span></td>
        <td data-col="new_share" class="num">${r.idle ? `<span class="muted">no traffic in this window</span>` :
          `<span class="legacy">${count(r.legacy_requests)}</span> / <span class="new">${count(r.new_requests)}</span>
           <span class="share" title="share on new"><i style="width:${((share || 0) * 100).toFixed(1)}%"></i></span> ${pct(share, 0)}`}</td>
        <td data-col="legacy_error_rate" class="num">${err(r.legacy_error_rate, null)}</td>
        <td data-col="new_error_rate" class="num" title="${num(r.new_fallbacks) ? `includes ${count(r.new_fallbacks)} requests the new side failed and legacy answered (fallbacks)` : ""}">${err(r.new_error_rate, r.legacy_error_rate)}</td>
        <td data-col="legacy_p99_ms" class="num">${ms(r.legacy_p99_ms)}</td>
        <td data-col="new_p99_ms" class="num">${ms(r.new_p99_ms)}</td>
        <td data-col="match_rate" class="num">${pct(r.match_rate)}</td>
        <td data-col="requests" class="num">${count(r.requests)}</td>
        <td>${sparkline(spark.get(r.route) || [], doc.from, doc.to)}</td>
      </tr>`;
    }
    html += `</tbody></table></section>`;
  }
  // Which route next: the traffic legacy still serves, by endpoint template.
  const endpoints = doc.legacy_endpoints || [];
  html += `<section class="card scroll"><h2>Which route next? Legacy traffic by endpoint</h2>`;
  if (!endpoints.length) html += `<p class="muted">No legacy traffic with a path in this window.</p>`;
  else {
    const minutes = Math.max(1, (num(doc.to) - num(doc.from)) / 60);
    html += `<table id="legacy-endpoints"><thead><tr><th>Endpoint</th><th>Methods</th><th class="num">Req/min</th><th class="num">Share</th><th class="num">Errors</th><th class="num">p50</th><th class="num">p99</th><th>Route</th></tr></thead><tbody>`;
    for (const e of endpoints) {
      const n = num(e.requests) || 0;
      html += `<tr><td><code>${esc(e.template)}</code></td><td>${esc(e.methods)}</td><td class="num">${(n / minutes).toFixed(1)}</td>
        <td class="num">${pct(e.share, 1)}</td><td class="num">${pct(n ? num(e.errors) / n : null, 2)}</td>
        <td class="num">${ms(e.p50_ms)}</td><td class="num">${ms(e.p99_ms)}</td>
        <td>${e.routes ? `${esc(e.routes)} <span class="muted">(on legacy)</span>` : `<span class="muted">none yet</span>`}</td></tr>`;
    }
    html += `</tbody></table>`;
  }
  html += `</section>`;
  page.innerHTML = html;
  page.querySelectorAll("th.sortable").forEach((th) => {
    const sort = () => {
      const k = th.dataset.key;
      overviewSort = { key: k, asc: overviewSort.key === k ? !overviewSort.asc : k === "route" || k === "state" };
      overviewPage(doc);
    };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (ev) => ev.key === "Enter" && sort());
  });
  const burn = columns(doc.overview_burndown || [], ["legacy_share"]);
  chart(document.getElementById("burndown"), doc, burn, [
    { key: "legacy", label: "on legacy", stroke: COLORS.legacy, fill: "rgba(138,99,210,.12)", value: (u, v) => pct(v) },
  ], { yRange: [0, 1], yFormat: (v) => (100 * v).toFixed(0) + " %", empty: "No traffic through the router in this window yet." });
}

// ---------- charts ----------

// Wide rows -> uPlot columns: [times, series...]. Missing buckets stay null (gaps).
function columns(rows, keys) {
  const t = rows.map((r) => epoch(r.time));
  return [t, ...keys.map((k) => rows.map((r) => num(r[k])))];
}

// Draws `cols` ([times, series…]) into `el`; each series' count of points is kept in
// data-points-KEY for people and tests.
function chart(el, doc, cols, series, opts = {}) {
  for (let i = 0; i < series.length; i++) {
    el.setAttribute("data-points-" + series[i].key.toLowerCase(), String(cols[i + 1].filter((v) => v !== null).length));
  }
  if (!cols[0].length) {
    el.innerHTML = `<div class="empty">${esc(opts.empty || "No data in this window.")}</div>`;
    return;
  }
  el.innerHTML = "";
  const width = Math.max(el.clientWidth || 300, 260);
  const u = new uPlot(
    {
      width,
      height: 220,
      scales: { x: { time: true, range: [doc.from, doc.to] }, y: opts.yRange ? { range: opts.yRange } : { range: (u, min, max) => [0, Math.max(max || 0, 1e-9) * 1.1] } },
      axes: [{}, { values: (u, vals) => vals.map((v) => (opts.yFormat ? opts.yFormat(v) : v)), size: 60 }],
      series: [{}, ...series.map((s) => ({ label: s.label, stroke: s.stroke, fill: s.fill, width: 2, dash: s.dash, spanGaps: false, value: s.value }))],
      hooks: { draw: [(u) => drawMarkers(u, el, opts.markers || [])] },
    },
    cols,
    el,
  );
  u.fit = () => u.setSize({ width: Math.max(el.clientWidth || 300, 260), height: 220 });
  charts.push(u);
}

// Flips and rollbacks as DOM markers over the plot (readable, hoverable, testable).
function drawMarkers(u, el, markers) {
  el.querySelectorAll(".marker").forEach((m) => m.remove());
  const over = u.over;
  const left = over.offsetLeft, top = over.offsetTop, height = over.clientHeight;
  for (const m of markers) {
    const x = u.valToPos(m.t, "x");
    if (!Number.isFinite(x) || x < 0 || x > over.clientWidth) continue;
    const div = document.createElement("div");
    // Labels near the right edge open to the left, so they stay inside the chart.
    div.className = x > over.clientWidth * 0.6 ? "marker flip" : "marker";
    div.style.left = left + x + "px";
    div.style.top = top + "px";
    div.style.height = height + "px";
    div.title = m.title;
    div.innerHTML = `<span>${esc(m.label)}</span>`;
    el.appendChild(div);
  }
}

// ---------- route ----------

function routePage(doc) {
  clearCharts();
  const sides = doc.route_sides || [];
  const changes = doc.route_changes || [];
  const markers = changes.map((c) => ({
    t: epoch(c.time),
    label: c.to_state,
    title: `${when(c.time)}: ${c.text} by ${c.actor}${c.reason ? ": " + c.reason : ""}`,
  }));
  let html = `<h1>Route ${esc(doc.route)}</h1>`;
  if (!sides.length) {
    html += `<div class="empty" id="no-traffic">No traffic on this route in this window yet.</div>`;
  } else {
    html += `<section class="card scroll"><table id="sides"><thead><tr><th>Side</th><th>Traffic</th><th class="num">Requests</th><th class="num">Errors</th><th class="num">p50</th><th class="num">p95</th><th class="num">p99</th></tr></thead><tbody>`;
    for (const s of sides) {
      const n = num(s.requests) || 0, e = num(s.errors) || 0;
      html += `<tr data-backend="${esc(s.backend)}" data-shadow="${num(s.shadow) ? 1 : 0}"><td class="${esc(s.backend)}">${esc(s.backend)}</td><td>${num(s.shadow) ? "shadow copies" : "served"}</td>
        <td class="num">${count(n)}</td><td class="num">${n ? pct(e / n, 2) : "–"}</td>
        <td class="num">${ms(s.p50_ms)}</td><td class="num">${ms(s.p95_ms)}</td><td class="num">${ms(s.p99_ms)}</td></tr>`;
    }
    html += `</tbody></table>`;
    const m = sides.reduce((a, s) => a + (num(s.diff_match) || 0), 0);
    const x = sides.reduce((a, s) => a + (num(s.diff_mismatch) || 0), 0);
    html += m + x > 0
      ? `<p id="match-rate">Shadow pairs: ${m + x} compared, <b>${pct(m / (m + x))}</b> match, ${x} differ.</p>`
      : `<p id="match-rate" class="muted">No shadow pairs in this window.</p>`;
    html += `</section>`;
  }
  html += `<div class="grid">
    <section class="card"><h2>Requests per second</h2><div id="c-traffic" class="chart"></div></section>
    <section class="card"><h2>Error rate</h2><div id="c-errors" class="chart"></div></section>
    <section class="card"><h2>Latency p50 / p95 / p99</h2><div id="c-latency" class="chart"></div></section>
  </div>`;
  const paths = doc.route_diff_paths || [];
  html += `<section class="card scroll"><h2>Differences by JSON path</h2>`;
  if (!paths.length) {
    html += `<p class="muted">No differing answers in this window.</p>`;
  } else {
    const top = Math.max(...paths.map((p) => num(p.mismatches) || 0), 1);
    html += `<table id="diff-paths"><thead><tr><th>Path</th><th class="num">Mismatches</th><th></th></tr></thead><tbody>`;
    for (const p of paths) {
      html += `<tr><td><code>${esc(p.path)}</code></td><td class="num">${count(p.mismatches)}</td><td><span class="bar" style="width:${(100 * (num(p.mismatches) || 0)) / top}px"></span></td></tr>`;
    }
    html += `</tbody></table>`;
  }
  html += `</section>`;
  // A JSON body re-rendered with every value at a differing path in <mark>; a body
  // that is not (whole) JSON is shown as it came.
  const pointerPart = (k) => String(k).replace(/~/g, "~0").replace(/\//g, "~1");
  const renderJson = (value, pointer, marks) => {
    let out;
    if (Array.isArray(value)) out = "[" + value.map((v, i) => renderJson(v, pointer + "/" + i, marks)).join(",") + "]";
    else if (value && typeof value === "object")
      out = "{" + Object.entries(value).map(([k, v]) => esc(JSON.stringify(k)) + ":" + renderJson(v, pointer + "/" + pointerPart(k), marks)).join(",") + "}";
    else out = esc(JSON.stringify(value));
    return marks.has(pointer) ? `<mark class="diff">${out}</mark>` : out;
  };
  const bodyHtml = (text, marks) => {
    try {
      return renderJson(JSON.parse(text), "", marks);
    } catch (_) {
      return esc(text);
    }
  };
  const samples = doc.route_mismatches || [];
  html += `<section class="card"><h2>Sample mismatches</h2>`;
  if (!samples.length) html += `<p class="muted">None in this window.</p>`;
  for (const s of samples) {
    const primary = s.primary_backend || "primary";
    const other = primary === "new" ? "legacy" : "new";
    const marks = new Set(String(s.diff_paths || "").split(",").filter((p) => p.startsWith("/")));
    let differences = [];
    try {
      differences = JSON.parse(s.differences || "[]");
    } catch (_) {}
    // Legacy's value first, whichever side answered.
    const values = differences
      .map((d) => {
        const [legacy, fresh] = primary === "new" ? [d.shadow, d.primary] : [d.primary, d.shadow];
        return `<li><code>${esc(d.path)}</code>: <span class="legacy">${esc(legacy)}</span> → <span class="new">${esc(fresh)}</span></li>`;
      })
      .join("");
    html += `<div class="sample"><div><b>${esc(s.request)}</b> · ${esc(when(s.time))} · differs at <code>${esc(s.diff_paths)}</code> ·
      <a href="#/trace/${esc(s.trace_id)}">trace</a></div>
      ${values ? `<ul class="differences">${values}</ul>` : ""}
      <div class="pair"><div><div class="${esc(primary)}">${esc(primary)} (answered) ${esc(s.primary_status)}</div><pre>${bodyHtml(s.primary_body, marks)}</pre></div>
      <div><div class="${esc(other)}">${esc(other)} (shadow) ${esc(s.shadow_status)}</div><pre>${bodyHtml(s.shadow_body, marks)}</pre></div></div></div>`;
  }
  html += `</section>`;
  html += `<section class="card scroll"><h2>Flips and rollbacks</h2>`;
  if (!changes.length) html += `<p class="muted">No changes recorded in this window.</p>`;
  else {
    html += `<table id="changes"><thead><tr><th>When</th><th>Change</th><th>By</th><th>Why</th></tr></thead><tbody>`;
    for (const c of changes) html += `<tr><td>${esc(when(c.time))}</td><td>${esc(c.text)}</td><td>${esc(c.actor)}</td><td>${esc(c.reason)}</td></tr>`;
    html += `</tbody></table>`;
  }
  html += `</section>`;
  page.innerHTML = html;

  const empty = "No traffic on this route in this window yet.";
  chart(document.getElementById("c-traffic"), doc, columns(doc.route_traffic || [], ["legacy_rps", "new_rps", "shadow_rps"]), [
    { key: "legacy", label: "legacy", stroke: COLORS.legacy },
    { key: "new", label: "new", stroke: COLORS.new },
    { key: "shadow", label: "shadow copies", stroke: COLORS.shadow, dash: [4, 4] },
  ], { markers, empty, yFormat: (v) => v.toFixed(v < 10 ? 1 : 0) });
  chart(document.getElementById("c-errors"), doc, columns(doc.route_errors || [], ["legacy_error_rate", "new_error_rate"]), [
    { key: "legacy", label: "legacy", stroke: COLORS.legacy, value: (u, v) => pct(v, 2) },
    { key: "new", label: "new", stroke: COLORS.new, value: (u, v) => pct(v, 2) },
  ], { markers, empty, yFormat: (v) => (100 * v).toFixed(1) + " %" });
  chart(document.getElementById("c-latency"), doc, columns(doc.route_latency || [], ["legacy_p50_ms", "legacy_p95_ms", "legacy_p99_ms", "new_p50_ms", "new_p95_ms", "new_p99_ms"]), [
    { key: "legacyP50", label: "legacy p50", stroke: COLORS.legacy, dash: [2, 3] },
    { key: "legacyP95", label: "legacy p95", stroke: COLORS.legacy, dash: [6, 3] },
    { key: "legacy", label: "legacy p99", stroke: COLORS.legacy },
    { key: "newP50", label: "new p50", stroke: COLORS.new, dash: [2, 3] },
    { key: "newP95", label: "new p95", stroke: COLORS.new, dash: [6, 3] },
    { key: "new", label: "new p99", stroke: COLORS.new },
  ], { markers, empty, yFormat: (v) => v.toFixed(0) + " ms" });
}

// ---------- trace ----------

function tracePage(doc) {
  clearCharts();
  const spans = doc.spans || [];
  if (!spans.length) {
    page.innerHTML = `<div class="empty">No spans stored for this trace.</div>`;
    return;
  }
  const start = Math.min(...spans.map((s) => num(s.start_ns)));
  const end = Math.max(...spans.map((s) => num(s.start_ns) + num(s.duration_ns)));
  const total = Math.max(end - start, 1);
  // Depth-first order under each parent, so children sit under their parent.
  const byParent = new Map();
  for (const s of spans) {
    const p = spans.some((o) => o.span_id === s.parent_span_id) ? s.parent_span_id : "";
    if (!byParent.has(p)) byParent.set(p, []);
    byParent.get(p).push(s);
  }
  const ordered = [];
  const walk = (id, depth) => (byParent.get(id) || []).forEach((s) => { ordered.push([s, depth]); walk(s.span_id, depth + 1); });
  walk("", 0);
  let html = `<h1>Trace <code>${esc(doc.trace_id)}</code></h1><p class="muted">${spans.length} spans over ${ms(total / 1e6)}</p><section class="card waterfall" id="waterfall">`;
  for (const [s, depth] of ordered) {
    const left = ((num(s.start_ns) - start) / total) * 100;
    const width = (num(s.duration_ns) / total) * 100;
    const cls = [s.backend === "new" ? "new" : "", s.status_code === "error" || num(s.http_status) >= 500 ? "error" : "", num(s.shadow) ? "shadow" : ""].join(" ");
    const info = `${s.name} · ${s.service} · ${s.backend || "–"}${num(s.shadow) ? " (shadow)" : ""} · ${ms(num(s.duration_ns) / 1e6)} · ${s.http_status || ""} ${s.diff ? "· diff " + s.diff : ""}`;
    html += `<div class="row" data-span="${esc(s.span_id)}"><div class="label" style="padding-left:${depth}rem" title="${esc(info)}">${esc(s.name)} <span class="muted">${esc([s.backend + (num(s.shadow) ? " shadow" : ""), s.http_status || "", ms(num(s.duration_ns) / 1e6)].filter(Boolean).join(" · "))}</span></div>
      <div class="track"><div class="span ${cls}" style="left:${left.toFixed(2)}%;width:${width.toFixed(2)}%" title="${esc(info)}"></div></div></div>`;
  }
  html += `</section>`;
  page.innerHTML = html;
}

render();
