/* The live status page (served at / by services/status.py, files in services/page.py).
 *
 * Polls ./status (the JobStatus snapshot) every POLL_MS and redraws: progress, the loss terms,
 * learning rate and grad norm, the evaluation score over steps, throughput over time and each
 * actor's health. Snapshot fields may be missing or null (older drivers, a job still starting):
 * whatever is absent is drawn as nothing rather than failing.
 *
 * What was drawn is also written to the DOM so that a headless browser can check it
 * (tests/integration/test_status_page.py): every chart's canvas carries data-points (points it
 * holds, all series) and data-series (JSON {label: points}); the actors' table carries data-rows;
 * <body> carries data-step (the step last shown) and data-polls (snapshots drawn).
 */
"use strict";

const POLL_MS = 2000;
const LOSS_TERMS = ["loss", "d_on", "d_off", "adversary_loss"];  // as cluster/report.py CURVES
const THROUGHPUT_TERMS = ["learner_tokens_per_s", "rollout_tokens_per_s"];
const COLORS = ["#222222", "#c0392b", "#2471a3", "#27ae60", "#8e44ad", "#d68910"];
const KIND_ORDER = ["learner", "student", "teacher", "buffer"];

const $ = (id) => document.getElementById(id);
const charts = {};

function isNumber(v) { return typeof v === "number" && Number.isFinite(v); }

/** A short label for a number: 1.2e-5, 0.034, 12.5, 1234. */
function short(v) {
  if (!isNumber(v)) return "—";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : String(Number(v.toPrecision(3)));
}

/** A duration in seconds as "1h 02m", "3m 05s" or "12.3 s". */
function duration(s) {
  if (!isNumber(s)) return "—";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  return h ? `${h}h ${String(m % 60).padStart(2, "0")}m` : `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
}

/** A line chart on linear x and y axes; axes: [[id, title, "left"|"right"], ...]. */
function makeChart(id, xTitle, axes) {
  if (!window.Chart) return null;  // the library did not load: the text and table still update
  const scales = { x: { type: "linear", title: { display: true, text: xTitle } } };
  for (const [axis, title, side] of axes) {
    scales[axis] = { type: "linear", position: side, title: { display: true, text: title },
                     ticks: { callback: short }, grid: { drawOnChartArea: side === "left" } };
  }
  return new Chart($(id), {
    type: "line", data: { datasets: [] },
    // No animation: a redraw every 2 s would never settle, and a test reads the chart at once.
    options: { animation: false, maintainAspectRatio: false, parsing: false, spanGaps: true,
               interaction: { mode: "nearest", axis: "x", intersect: false },
               elements: { point: { radius: 0 }, line: { borderWidth: 1.5 } },
               plugins: { legend: { position: "bottom" } }, scales },
  });
}

/** Replace the chart's series ([{label, data: [{x, y}], color, axis?, radius?}]) and record
 *  in the canvas's data-points and data-series how many points the chart now holds. */
function setSeries(id, series) {
  const chart = charts[id], counts = {};
  if (chart) {
    // The same dataset object per label, so a series hidden from the legend stays hidden.
    const old = new Map(chart.data.datasets.map((d) => [d.label, d]));
    chart.data.datasets = series.map((s) => Object.assign(old.get(s.label) || {
      label: s.label, borderColor: s.color, backgroundColor: s.color, yAxisID: s.axis || "y",
      pointRadius: s.radius || 0,
    }, { data: s.data }));
    chart.update("none");
    for (const d of chart.data.datasets) counts[d.label] = d.data.length;
  }
  const canvas = $(id);
  canvas.dataset.points = String(Object.values(counts).reduce((a, b) => a + b, 0));
  canvas.dataset.series = JSON.stringify(counts);
}

/** The points {x: row[xKey], y: row[key]} of the rows where both are numbers. */
function points(rows, xKey, key) {
  return (Array.isArray(rows) ? rows : [])
    .filter((r) => r && isNumber(r[xKey]) && isNumber(r[key]))
    .map((r) => ({ x: r[xKey], y: r[key] }));
}

/** One series per term that has at least one point, colored by the term's place in terms. */
function seriesOf(rows, xKey, terms, extra = {}) {
  return terms.map((term, i) => ({ label: term, data: points(rows, xKey, term), color: COLORS[i % COLORS.length],
                                   ...(extra[term] || {}) }))
    .filter((s) => s.data.length > 0);
}

function drawCharts(s) {
  setSeries("chart-loss", seriesOf(s.history, "step", LOSS_TERMS));
  setSeries("chart-optim", seriesOf(s.history, "step", ["lr", "grad_norm"], { grad_norm: { axis: "y2" } }));
  setSeries("chart-eval", seriesOf(s.evals, "step", ["score"], { score: { radius: 3 } }));
  setSeries("chart-throughput", seriesOf(s.throughput, "t", THROUGHPUT_TERMS));
}

function setState(el, state) {
  el.textContent = state || "unknown";
  el.className = `state ${state || ""}`;
}

function drawProgress(s) {
  $("name").textContent = s.name || "";
  setState($("state"), s.state);
  const step = isNumber(s.step) ? s.step : 0, total = isNumber(s.total_steps) ? s.total_steps : 0;
  $("progress").max = Math.max(total, 1);
  $("progress").value = step;
  const pct = total ? ` (${Math.floor((100 * step) / total)}%)` : "";
  const elapsed = isNumber(s.updated_at) && isNumber(s.started_at) ? s.updated_at - s.started_at : null;
  $("progress-text").textContent = `step ${step} / ${total}${pct} · weight version ${s.weight_version ?? "—"}` +
    ` · running ${duration(elapsed)}`;
  const parts = [`learner ${short(s.learner_tokens_per_s)} tokens/s`, `rollouts ${short(s.rollout_tokens_per_s)} tokens/s`];
  const rows = (s.buffer && s.buffer.rows_by_source) || {};
  if (Object.keys(rows).length) {
    parts.push("buffer rows: " + Object.entries(rows).map(([src, n]) => `${src} ${n}`).join(", "));
  }
  const last = Array.isArray(s.evals) && s.evals.length ? s.evals[s.evals.length - 1] : null;
  if (last) parts.push(`last eval ${short(last.score)} at step ${last.step}`);
  if (isNumber(s.weight_push_seconds)) {
    parts.push(`last weight push ${short(s.weight_push_seconds)} s` +
               (isNumber(s.weight_pushes) ? ` (${s.weight_pushes} pushes)` : ""));
  }
  if (s.sampled_age && isNumber(s.sampled_age.mean)) {
    parts.push(`on-policy rows ${short(s.sampled_age.mean)} versions old (max ${s.sampled_age.max})`);
  }
  $("summary").textContent = parts.join(" · ");
  $("error").hidden = !s.error;
  $("error").textContent = s.error ? `error: ${s.error}` : "";
  document.body.dataset.step = String(step);
}

function actorKind(name, info) {
  if (typeof info.kind === "string" && info.kind) return info.kind;
  const prefix = name.split("-")[0];
  return KIND_ORDER.includes(prefix) ? prefix : "unknown";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;  // never innerHTML: last_error is arbitrary text
  if (cls) td.className = cls;
  return td;
}

function drawActors(s) {
  const actors = s.actors && typeof s.actors === "object" ? s.actors : {};
  const rank = (name) => { const k = KIND_ORDER.indexOf(actorKind(name, actors[name] || {})); return k < 0 ? 99 : k; };
  const names = Object.keys(actors).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  const body = $("actors").tBodies[0];
  body.replaceChildren();
  for (const name of names) {
    const info = actors[name] && typeof actors[name] === "object" ? actors[name] : {};
    const row = body.insertRow();
    row.dataset.actor = name;
    cell(row, name);
    cell(row, actorKind(name, info));
    const state = document.createElement("span");
    setState(state, info.state);
    cell(row, "").appendChild(state);
    cell(row, isNumber(info.restarts) ? String(info.restarts) : "0", "num");
    cell(row, isNumber(info.last_seen_s) ? `${duration(info.last_seen_s)} ago` : "not yet", "num");
    cell(row, isNumber(info.tokens_per_s) ? short(info.tokens_per_s) : "—", "num");
    cell(row, info.pid != null ? String(info.pid) : "—", "num");
    cell(row, info.last_error || "");
  }
  $("actors").dataset.rows = String(names.length);
}

function draw(s) {
  drawProgress(s);
  drawCharts(s);
  drawActors(s);
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

let lastAnswer = null;

async function poll() {
  try {
    const answer = await fetch("status", { cache: "no-store" });
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    draw(await answer.json());
    lastAnswer = new Date();
    $("connection").hidden = true;
  } catch (err) {
    // The job ended or the network dropped: keep the last picture and say since when.
    const since = lastAnswer ? ` since ${lastAnswer.toLocaleTimeString()}` : "";
    $("connection").textContent = `no answer from /status${since} (${err.message}); showing the last data`;
    $("connection").hidden = false;
  } finally {
    setTimeout(poll, POLL_MS);  // after the answer, so slow answers never pile up
  }
}

charts["chart-loss"] = makeChart("chart-loss", "step", [["y", "loss", "left"]]);
charts["chart-optim"] = makeChart("chart-optim", "step", [["y", "lr", "left"], ["y2", "grad norm", "right"]]);
charts["chart-eval"] = makeChart("chart-eval", "step", [["y", "score", "left"]]);
charts["chart-throughput"] = makeChart("chart-throughput", "seconds since start", [["y", "tokens/s", "left"]]);
poll();
