// The Whittle dashboard: jobs (live), a job's steps, curves, per-layer charts, summary,
// artifacts and log; models and datasets. Plain JavaScript, no build step; charts by uPlot.
"use strict";

const $main = document.getElementById("main");
let cleanup = []; // what the current page must stop (streams, timers, charts)

// ---------------------------------------------------------------------------- API access

function apiKey() { return sessionStorage.getItem("whittle.apiKey") || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({ accept: "application/json" }, opts.headers || {});
  if (apiKey()) headers.authorization = "Bearer " + apiKey();
  const res = await fetch(path, Object.assign({}, opts, { headers }));
  if (!res.ok) {
    let detail = res.statusText;
    try { const p = await res.json(); detail = `${p.code}: ${p.detail}`; } catch (_) { /* not JSON */ }
    throw new Error(`${res.status} ${detail}`);
  }
  const type = res.headers.get("content-type") || "";
  return type.includes("json") ? res.json() : res.text();
}

// A job's event stream through fetch (EventSource cannot send an API key): calls onEvent
// with {id, event, data} until the stream ends or `signal` aborts.
async function followEvents(jobId, onEvent, signal) {
  const headers = { accept: "text/event-stream" };
  if (apiKey()) headers.authorization = "Bearer " + apiKey();
  const res = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal });
  if (!res.ok || !res.body) throw new Error(`events: ${res.status}`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", cur = { data: "" };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let at;
    while ((at = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, at).replace(/\r$/, "");
      buf = buf.slice(at + 1);
      if (line === "") {
        if (cur.data || cur.event) {
          let data = cur.data;
          try { data = JSON.parse(cur.data); } catch (_) { /* plain text */ }
          onEvent({ id: cur.id, event: cur.event || "message", data });
        }
        cur = { data: "" };
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") cur.data = cur.data ? cur.data + "\n" + val : val;
        else if (field === "event") cur.event = val;
        else if (field === "id") cur.id = val;
      }
    }
  }
}

// ---------------------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c == null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fmt(v) {
  if (v == null) return "–";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return v.toLocaleString("en");
    return Math.abs(v) >= 1000 ? v.toFixed(1) : v.toPrecision(5);
  }
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, x = n;
  while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
  return i === 0 ? `${n} B` : `${x.toFixed(1)} ${u[i]}`;
}

function when(ts) { return ts ? new Date(ts).toLocaleString() : "–"; }
function state(s) { return el("span", { class: `state ${s}` }, s); }
function link(href, text) { return el("a", { href }, text); }
function short(id) { return id ? id.slice(0, 8) + "…" + id.slice(-4) : "–"; }
function ops(job) { return (job.steps || []).map((s) => s.op + (s.method ? `:${s.method}` : "")).join(" → "); }

function progressBar(fraction) {
  const pct = Math.round((fraction || 0) * 100);
  return el("div", { class: "progress", role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
    el("span", { style: `width:${pct}%` }));
}

function table(headers, rows, numeric = []) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) => el("td", numeric.includes(i) ? { class: "num" } : {}, c))))));
}

function showError(e) {
  const msg = String(e.message || e);
  const hint = msg.startsWith("401") ? (apiKey() ? "This API key is not accepted (unknown or revoked): enter another above." :
    "This server needs an API key: enter one above (an administrator makes them with `whittle keys create`).") : null;
  $main.replaceChildren(el("p", { class: "error", role: "alert" }, msg), hint ? el("p", {}, hint) : null);
  if (hint) document.getElementById("api-key").focus();
}

// A download link that sends the API key: plain links cannot carry an Authorization header,
// so with a key the file is fetched and handed to the browser as a blob.
function download(href, filename, label) {
  return el("a", { href, download: filename, onclick: async (ev) => {
    if (!apiKey()) return; // the browser downloads it directly
    ev.preventDefault();
    try {
      const res = await fetch(href, { headers: { authorization: "Bearer " + apiKey() } });
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const url = URL.createObjectURL(await res.blob());
      const a = el("a", { href: url, download: filename });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) { showError(e); }
  } }, label);
}

function chart(container, title, labels, series, opts = {}) {
  if (!window.uPlot || !labels.length) return null;
  const width = Math.max(320, Math.min(container.clientWidth || 520, 560));
  const palette = ["#2450b8", "#c2410c", "#15803d", "#7c3aed"];
  const u = new uPlot({
    title, width, height: 220,
    // Bars start at zero (a sparsity of 0.70 next to 0.71 must not look like 0 next to 1).
    scales: { x: { time: false }, y: opts.bars ? { range: (u, min, max) => [0, max > 0 ? max * 1.05 : 1] } : {} },
    // Whole epochs and tensor numbers on the x axis; four significant digits on the y axis.
    axes: [{ label: opts.xLabel || "", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] },
      { values: (u, ticks) => ticks.map((v) => (v == null ? "" : String(Number(v.toPrecision(4))))) }],
    series: [{ label: opts.xLabel || "x" }].concat(series.map((s, i) => ({
      label: s.label, stroke: palette[i % palette.length],
      fill: opts.bars ? palette[i % palette.length] + "55" : undefined,
      paths: opts.bars ? uPlot.paths.bars({ size: [0.8, 40] }) : undefined,
      points: { show: !opts.bars },
    }))),
  }, [labels].concat(series.map((s) => s.values)), container);
  cleanup.push(() => u.destroy());
  return u;
}

// ---------------------------------------------------------------------------- pages

async function jobsPage(params) {
  const form = el("form", { class: "filters", role: "search" },
    el("label", {}, "State", el("select", { name: "state" },
      ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) =>
        el("option", { value: s, selected: params.get("state") === s ? "" : null }, s || "any")))),
    el("label", {}, "Label (key:value)", el("input", { name: "label", value: params.get("label") || "" })),
    el("label", {}, "Model id", el("input", { name: "model_id", value: params.get("model_id") || "", size: 38 })),
    el("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = "#/jobs" + (q.toString() ? "?" + q : "");
  });
  const body = el("div", {}, el("p", { class: "muted" }, "Loading…"));
  $main.replaceChildren(el("h1", {}, "Jobs"), form, body);
  const q = new URLSearchParams(params);
  q.set("limit", "100");
  const render = async () => {
    const page = await api(`/v1/jobs?${q}`);
    body.replaceChildren(page.items.length === 0 ? el("p", { class: "muted" }, "No jobs.") :
      table(["Job", "State", "Steps", "Progress", "Model", "Labels", "Created"], page.items.map((j) => [
        link(`#/jobs/${j.id}`, el("span", { class: "id" }, short(j.id))),
        state(j.state),
        ops(j),
        j.state === "running" ? progressBar(j.progress && j.progress.fraction) : "",
        link(`#/models/${j.model_id}`, el("span", { class: "id" }, short(j.model_id))),
        Object.entries(j.labels || {}).map(([k, v]) => `${k}:${v}`).join(", "),
        when(j.created_at),
      ])));
  };
  await render();
  // Live: refresh while any job is unfinished (every 2 s; cheap, the list is one query).
  const timer = setInterval(() => render().catch(() => {}), 2000);
  cleanup.push(() => clearInterval(timer));
}

async function jobPage(id) {
  let job = await api(`/v1/jobs/${id}`);
  const head = el("div");
  const progress = el("div");
  const curves = el("div", { class: "card", id: "epoch-chart" });
  const layers = el("div");
  const summary = el("div");
  const artifacts = el("div");
  const log = el("pre", { class: "log", "aria-label": "Log" });
  $main.replaceChildren(
    el("h1", {}, "Job ", el("span", { class: "id" }, id)), head, progress,
    el("h2", {}, "Steps"), table(["#", "Op", "Parameters"], job.steps.map((s, i) => [i + 1, s.op,
      el("code", {}, JSON.stringify(Object.fromEntries(Object.entries(s).filter(([k]) => k !== "op"))))])),
    el("h2", {}, "Training"), curves,
    el("h2", {}, "Summary"), summary,
    el("h2", {}, "Layers"), layers,
    el("h2", {}, "Artifacts"), artifacts,
    el("h2", {}, "Log"), log);

  const renderHead = () => head.replaceChildren(table(["State", "Model", "Attempt", "Created", "Finished", "Error"], [[
    el("span", { id: "job-state" }, state(job.state)),
    link(`#/models/${job.model_id}`, el("span", { class: "id" }, short(job.model_id))),
    `${job.attempt}/${job.max_attempts}`, when(job.created_at), when(job.finished_at),
    job.error ? `${job.error.code}: ${job.error.message}` : "",
  ]]));
  renderHead();

  const epochs = [];
  let chartObj = null;
  const drawCurves = () => {
    if (!epochs.length) { curves.replaceChildren(el("p", { class: "muted" }, "No training epochs (yet).")); return; }
    if (chartObj) { chartObj.destroy(); chartObj = null; }
    curves.replaceChildren();
    const x = epochs.map((_, i) => i + 1);
    const series = [{ label: "train loss", values: epochs.map((e) => e.train_loss) }];
    if (epochs.some((e) => e.val_loss != null)) series.push({ label: "val loss", values: epochs.map((e) => e.val_loss) });
    if (epochs.some((e) => e.val_accuracy != null)) series.push({ label: "val accuracy", values: epochs.map((e) => e.val_accuracy) });
    chartObj = chart(curves, "Per epoch", x, series, { xLabel: "epoch" });
  };
  drawCurves();

  const renderFinished = async () => {
    const m = await api(`/v1/jobs/${id}/metrics`);
    renderSummary(summary, m);
    renderLayers(layers, m);
    const arts = (job.result && job.result.artifacts) || [];
    artifacts.replaceChildren(arts.length ? table(["Kind", "Format", "Size", "sha256", ""], arts.map((a) => [
      a.kind, a.format, bytes(a.size_bytes), el("code", {}, a.sha256.slice(0, 16) + "…"),
      download(`/v1/artifacts/${a.id}/content`, `${a.kind}-${a.id}.${a.format === "json" ? "json" : a.format}`, "download"),
    ]), [2]) : el("p", { class: "muted" }, "None yet."));
    log.textContent = await api(`/v1/jobs/${id}/logs`).catch(() => "");
  };

  const abort = new AbortController();
  cleanup.push(() => abort.abort());
  const logLines = [];
  followEvents(id, (ev) => {
    if (ev.event === "state") {
      job.state = ev.data.state;
      renderHead();
      if (["succeeded", "failed", "cancelled"].includes(job.state)) {
        progress.replaceChildren(el("p", { class: "muted" }, `finished: ${job.state}`));
        api(`/v1/jobs/${id}`).then((j) => { job = j; renderHead(); return renderFinished(); }).catch(showError);
      }
    } else if (ev.event === "progress") {
      progress.replaceChildren(el("p", {}, `step ${ev.data.step + 1}/${job.steps.length} ${ev.data.op} · ${ev.data.message || ""}`),
        progressBar(ev.data.fraction));
    } else if (ev.event === "metrics" && ev.data.epoch != null) {
      epochs.push(ev.data);
      drawCurves();
    } else if (ev.event === "log") {
      logLines.push(ev.data.message);
      log.textContent = logLines.join("\n");
    }
  }, abort.signal).catch((e) => { if (e.name !== "AbortError") console.warn("event stream ended", e.message); });
  if (["succeeded", "failed", "cancelled"].includes(job.state)) await renderFinished();
}

function renderSummary(container, m) {
  const b = m.baseline || {}, f = m.final || {};
  const rows = [["size", "size_bytes", bytes], ["parameters", "parameters"], ["non-zero", "nonzero"],
    ["bits per weight", "bits_per_weight"], ["encoded size", "packed_size_bytes", bytes], ["compression ratio", "compression_ratio"],
    ["accuracy", "accuracy"], ["loss", "loss"], ["perplexity", "perplexity"], ["KL divergence (mean)", (x) => x.kl_divergence && x.kl_divergence.mean],
    ["top-1 agreement", "top1_agreement"], ["embedding cosine (min)", (x) => x.embedding_cosine && x.embedding_cosine.min],
    ["agreement", "agreement"]];
  const out = [];
  for (const [label, key, f2] of rows) {
    const get = (x) => (typeof key === "function" ? key(x) : x[key]);
    const [vb, vf] = [get(b), get(f)];
    if (vb == null && vf == null) continue;
    const show = f2 || fmt;
    out.push([label, typeof vb === "object" && vb !== null ? fmt(vb) : show(vb), typeof vf === "object" && vf !== null ? fmt(vf) : show(vf)]);
  }
  container.replaceChildren(out.length ? table(["", "Input", "Output"], out, [1, 2]) : el("p", { class: "muted" }, "No figures."));
}

function renderLayers(container, m) {
  container.replaceChildren();
  (m.steps || []).forEach((s, i) => {
    const layers = s.layers || [];
    if (!layers.length) return;
    const card = el("div", { class: "card layer-chart" });
    const names = layers.map((l) => l.tensor);
    const x = names.map((_, k) => k + 1);
    const series = [];
    if (layers.some((l) => l.sparsity != null)) series.push({ label: "sparsity", values: layers.map((l) => l.sparsity) });
    if (layers.some((l) => l.bits_per_weight != null)) series.push({ label: "bits per weight", values: layers.map((l) => l.bits_per_weight) });
    if (layers.some((l) => l.sqnr_db != null)) series.push({ label: "SQNR dB", values: layers.map((l) => l.sqnr_db) });
    container.append(el("h3", {}, `Step ${i + 1}: ${s.op}`), card);
    chart(card, `Per tensor (1…${names.length})`, x, series, { bars: true, xLabel: "tensor" });
    card.append(el("details", {}, el("summary", {}, "Table"),
      table(["#", "Tensor", "Sparsity", "Bits/weight", "SQNR dB", "MSE"], layers.map((l, k) =>
        [k + 1, l.tensor, fmt(l.sparsity), fmt(l.bits_per_weight), fmt(l.sqnr_db), fmt(l.mse)]), [0, 2, 3, 4, 5])));
  });
  if (!container.childElementCount) container.append(el("p", { class: "muted" }, "No per-tensor figures."));
}

async function modelsPage() {
  const page = await api("/v1/models?limit=100");
  $main.replaceChildren(el("h1", {}, "Models"), page.items.length === 0 ? el("p", { class: "muted" }, "No models.") :
    table(["Model", "Name", "Family", "Parameters", "Size", "Made by", "Created"], page.items.map((m) => [
      link(`#/models/${m.id}`, el("span", { class: "id" }, short(m.id))), m.name, m.family || "–",
      fmt(m.parameters), bytes(m.size_bytes),
      m.source ? link(`#/jobs/${m.source.job_id}`, `job ${short(m.source.job_id)}`) : "upload", when(m.created_at),
    ]), [3, 4]));
}

async function modelPage(id) {
  const m = await api(`/v1/models/${id}`);
  const jobs = await api(`/v1/jobs?model_id=${id}&limit=50`);
  $main.replaceChildren(
    el("h1", {}, m.name, " ", el("span", { class: "id muted" }, id)),
    table(["Family", "Parameters", "Size", "sha256", "Provenance"], [[m.family || "–", fmt(m.parameters), bytes(m.size_bytes),
      el("code", {}, m.sha256.slice(0, 16) + "…"),
      m.source ? el("span", {}, "made by ", link(`#/jobs/${m.source.job_id}`, `job ${short(m.source.job_id)}`), ` (step ${m.source.step})`) : "uploaded"]]),
    el("p", {}, download(`/v1/models/${id}/content`, `${m.name}.safetensors`, "Download weights"),
      (m.files || []).length > 1 ? [" · ", download(`/v1/models/${id}/archive`, `${m.name}.tar`, "Download folder (tar)")] : []),
    el("h2", {}, "Files"), table(["Path", "Size", "sha256"], (m.files || []).map((f) => [f.path, bytes(f.size_bytes), el("code", {}, f.sha256.slice(0, 16) + "…")]), [1]),
    el("h2", {}, `Tensors (${m.tensors.length})`), table(["Name", "dtype", "Shape"], m.tensors.map((t) => [t.name, t.dtype, JSON.stringify(t.shape)])),
    el("h2", {}, "Jobs on this model"), jobs.items.length ? table(["Job", "State", "Steps", "Created"], jobs.items.map((j) => [
      link(`#/jobs/${j.id}`, el("span", { class: "id" }, short(j.id))), state(j.state), ops(j), when(j.created_at)])) : el("p", { class: "muted" }, "None."));
}

async function datasetsPage() {
  const page = await api("/v1/datasets?limit=100");
  $main.replaceChildren(el("h1", {}, "Datasets"), page.items.length === 0 ? el("p", { class: "muted" }, "No datasets.") :
    table(["Dataset", "Name", "Format", "Samples", "Sample shape", "Classes", "Size", "Created"], page.items.map((d) => [
      el("span", { class: "id" }, short(d.id)), d.name, d.format, fmt(d.samples),
      d.documents != null ? "text" : JSON.stringify(d.feature_shape), fmt(d.num_classes), bytes(d.size_bytes), when(d.created_at),
    ]), [3, 6]));
}

// ---------------------------------------------------------------------------- routing

async function route() {
  cleanup.forEach((f) => { try { f(); } catch (_) { /* already gone */ } });
  cleanup = [];
  const hash = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === `#/${parts[0]}`) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (parts[0] === "models" && parts[1]) await modelPage(parts[1]);
    else if (parts[0] === "models") await modelsPage();
    else if (parts[0] === "datasets") await datasetsPage();
    else await jobsPage(new URLSearchParams(query || ""));
  } catch (e) {
    showError(e);
  }
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = document.getElementById("api-key").value.trim();
  if (v) sessionStorage.setItem("whittle.apiKey", v); else sessionStorage.removeItem("whittle.apiKey");
  route();
});
document.getElementById("api-key").value = apiKey();
window.addEventListener("hashchange", route);
route();
