// qiusuo deployment dashboard: polls <root>/api/status every second and renders one panel per
// application (Serve status, replicas, request rate, TTFT/TPOT, tokens/s) with a live chart
// drawn on a plain <canvas>. No framework, no build step, no network beyond this server.
"use strict";

const ROOT = document.body.dataset.root || "";
const POLL_MS = 1000;
const COLORS = { tokens_per_s: "#2563eb", request_rate: "#16a34a", ttft_ms: "#dc2626" };

function fmt(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toFixed(digits);
}

function ms(x) { return x === null || x === undefined ? "–" : fmt(x * 1000, 1) + " ms"; }

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function card(label, value, key) {
  return el("div", { class: "card", "data-key": key }, el("div", { class: "k" }, label), el("div", { class: "v" }, value));
}

// One chart: tokens/s and requests/s on their own scales (each series normalised to its max,
// which the legend prints), TTFT as a third line: the shape over time is what a glance needs.
function drawChart(canvas, series) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 160;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pad = { l: 8, r: 8, t: 8, b: 18 };
  g.strokeStyle = "#e5e7eb"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (h - pad.t - pad.b) * i / 4;
    g.beginPath(); g.moveTo(pad.l, y); g.lineTo(w - pad.r, y); g.stroke();
  }
  if (!series.length) {
    g.fillStyle = "#6b7280"; g.font = "12px sans-serif"; g.fillText("no traffic yet", pad.l + 4, h / 2);
    return {};
  }
  const t0 = series[0].t, t1 = Math.max(series[series.length - 1].t, t0 + 1);
  const x = t => pad.l + (w - pad.l - pad.r) * (t - t0) / (t1 - t0);
  const maxes = {};
  for (const key of Object.keys(COLORS)) {
    const values = series.map(p => key === "ttft_ms" ? (p.ttft_s === null ? null : p.ttft_s * 1000) : p[key]);
    const max = Math.max(1e-9, ...values.filter(v => v !== null));
    maxes[key] = max;
    const y = v => h - pad.b - (h - pad.t - pad.b) * v / max;
    if (key === "tokens_per_s") {  // the headline figure as a filled area; the others as lines over it
      g.fillStyle = COLORS[key] + "33"; g.beginPath(); g.moveTo(x(series[0].t), y(0));
      series.forEach((p, i) => g.lineTo(x(p.t), y(values[i] ?? 0)));
      g.lineTo(x(series[series.length - 1].t), y(0)); g.closePath(); g.fill();
    }
    g.strokeStyle = COLORS[key]; g.lineWidth = 2; g.setLineDash(key === "request_rate" ? [6, 4] : []);
    g.beginPath();
    let started = false;
    series.forEach((p, i) => {
      const v = values[i];
      if (v === null) { started = false; return; }
      if (started) g.lineTo(x(p.t), y(v)); else { g.moveTo(x(p.t), y(v)); started = true; }
    });
    g.stroke();
    g.setLineDash([]);
  }
  g.fillStyle = "#6b7280"; g.font = "11px sans-serif";
  g.fillText(`${Math.round(t1 - t0)} s`, w - pad.r - 30, h - 4);
  return maxes;
}

function legend(maxes) {
  const parts = [["tokens_per_s", "tokens/s", 1], ["request_rate", "requests/s", 2], ["ttft_ms", "TTFT ms", 0]];
  const div = el("div", { class: "legend" });
  for (const [key, label, digits] of parts) {
    const sw = el("span"); sw.style.background = COLORS[key];
    div.append(sw, `${label} (max ${fmt(maxes[key] || 0, digits)})`);
  }
  return div;
}

function replicaTable(replicas) {
  const head = el("tr", {}, ...["replica", "pid", "health", "report", "requests", "running", "waiting", "KV"].map(h => el("th", {}, h)));
  const rows = replicas.map(r => el("tr", { class: "replica" },
    el("td", {}, r.replica_id), el("td", {}, r.pid ?? "–"),
    el("td", { class: r.healthy ? "healthy" : "unhealthy" }, r.healthy ? "healthy" : r.state),
    el("td", {}, `${fmt(r.last_report_s, 1)} s ago`), el("td", {}, fmt(r.requests, 0)),
    el("td", {}, fmt(r.running, 0)), el("td", {}, fmt(r.waiting, 0)), el("td", {}, fmt((r.kv_cache_usage || 0) * 100, 0) + "%")));
  return el("table", {}, head, ...rows);
}

function panel(app) {
  const a = app.autoscaling || {};
  const states = Object.entries(app.replica_states || {}).map(([k, v]) => `${v} ${k}`).join(", ") || "no replicas";
  const totals = app.totals || {};
  const div = el("section", { class: "app", "data-app": app.app },
    el("h2", {}, el("span", { class: "name" }, app.model || app.app), el("span", { class: `status ${app.status}` }, app.status)),
    el("div", { class: "sub" }, `application ${app.app} at ${app.route_prefix || "?"}/v1 · replicas: ${states}`
      + (a.max_replicas ? ` · autoscaling ${a.min_replicas}–${a.max_replicas}, target ${a.target_ongoing_requests} ongoing/replica` : "")
      + (app.message ? ` · ${app.message}` : "")),
    el("div", { class: "cards" },
      card("replicas", String(app.num_replicas ?? 0), "replicas"),
      card("requests", fmt(totals.requests || 0, 0), "requests"),
      card("requests/s", fmt(app.request_rate, 2), "request_rate"),
      card("tokens/s", fmt(app.tokens_per_s, 1), "tokens_per_s"),
      card("TTFT", ms(app.ttft_s), "ttft"),
      card("TPOT", ms(app.tpot_s), "tpot"),
      card("in flight", fmt((app.running || 0) + (app.waiting || 0), 0), "in_flight")));
  const canvas = el("canvas", { class: "chart" });
  div.append(canvas);
  div.append(replicaTable(app.replicas || []));
  return { div, canvas };
}

async function refresh() {
  const err = document.getElementById("error");
  try {
    const r = await fetch(`${ROOT}/api/status`, { cache: "no-store" });
    if (!r.ok) throw new Error(`status ${r.status}`);
    const s = await r.json();
    const apps = s.applications || [];
    const root = document.getElementById("apps");
    root.replaceChildren();
    if (!apps.length) root.append(el("div", { class: "empty" }, "no models deployed: run `qiusuo deploy NAME`"));
    for (const app of apps) {
      const { div, canvas } = panel(app);
      root.append(div);
      const maxes = drawChart(canvas, app.series || []);
      canvas.after(legend(maxes));
    }
    const replicas = apps.reduce((n, a) => n + (a.num_replicas || 0), 0);
    document.getElementById("summary").textContent =
      `${apps.length} model(s) · ${replicas} replica(s) · port ${s.http_port} · updated ${new Date(s.time * 1000).toLocaleTimeString()}`;
    document.body.dataset.loaded = "1";
    err.textContent = "";
  } catch (e) {
    err.textContent = `cannot read the status: ${e.message}`;
  }
}

refresh();
setInterval(refresh, POLL_MS);
