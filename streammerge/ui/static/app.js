"use strict";
// The streammerge page: the form, the plan, one job watched live (server-sent events), the history.
const $ = (id) => document.getElementById(id);
const FIELDS = ["base", "adapters", "output", "format", "dtype", "device", "max_mem", "tokenizer", "include", "exclude"];
let info = { dtypes: ["auto", "bf16", "fp16", "fp32"], gguf_types: ["auto", "f32", "f16", "bf16", "q8_0"] };
let watched = null, source = null, progress = null;

function size(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 2 : 0)} ${units[i]}`;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: { "Content-Type": "application/json" },
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  let doc = null;
  try { doc = await response.json(); } catch (e) { doc = { error: `HTTP ${response.status}` }; }
  return { ok: response.ok, doc };
}

function readForm() {
  const form = {};
  for (const name of FIELDS) form[name] = $(name).value;
  form.overwrite = $("overwrite").checked;
  return form;
}

function clearErrors() {
  document.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  $("message").textContent = ""; $("message").className = "";
}

function showError(doc) {
  const where = document.querySelector(`.error[data-for="${doc.field}"]`);
  if (where) where.textContent = doc.error; else { $("message").textContent = doc.error; $("message").className = "bad"; }
}

function fillDtypes() {
  const list = $("format").value === "gguf" ? info.gguf_types : info.dtypes;
  const keep = $("dtype").value;
  $("dtype").innerHTML = list.map((d) => `<option>${d}</option>`).join("");
  if (list.includes(keep)) $("dtype").value = keep;
}

function planText(doc) {
  const lines = [];
  for (const g of doc.groups) lines.push(`${g.adapter}: ${g.tensors}  x${g.count}  [${g.method}, r=${g.r} scale=${g.scale}; ${g.rule}]`);
  for (const w of doc.warnings || []) lines.push(`warning: ${w}`);
  for (const n of doc.notes || []) lines.push(`note: ${n}`);
  const m = doc.memory;
  lines.push(`${doc.tensors_merged} of ${doc.tensors_total} tensors change; output ${size(doc.output_bytes)} ` +
             `(${doc.out_dtype}); working set ${size(m.working_set_bytes)} of ${size(m.max_mem)}`);
  if (doc.output) lines.push(`output ${doc.output.path}: ${size(doc.output.free_bytes)} free, ${size(doc.output.needed_bytes)} needed`);
  if (doc.gguf) {
    const types = Object.entries(doc.gguf.types).map(([t, n]) => `${n} ${t}`).join(", ");
    lines.push(`gguf ${doc.gguf.path}: ${doc.gguf.architecture} ${doc.gguf.file_type}, ${doc.gguf.tensors.length} tensors ` +
               `(${types}); ${size(doc.gguf.bytes)}, ${size(doc.gguf.free_bytes)} free`);
  }
  return lines.join("\n");
}

async function plan() {
  clearErrors();
  $("message").textContent = "planning...";
  const { ok, doc } = await api("POST", "/api/plan", readForm());
  $("message").textContent = "";
  $("plan-out").hidden = !ok;
  if (!ok) { showError(doc); return null; }
  $("plan-out").textContent = planText(doc);
  return doc;
}

async function start() {
  clearErrors();
  $("message").textContent = "planning, then starting...";
  const { ok, doc } = await api("POST", "/api/jobs", readForm());
  $("message").textContent = "";
  if (!ok) { showError(doc); return; }
  $("plan-out").hidden = false;
  $("plan-out").textContent = planText(doc.plan);
  watch(doc.id);
  history();
}

function logLine(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("log").appendChild(li);
  $("log").scrollTop = $("log").scrollHeight;
}

function setState(state, error) {
  $("job-state").textContent = state;
  $("job-state").className = `state ${state}`;
  const live = state === "running" || state === "queued";
  $("cancel").disabled = !live;
  $("resume").hidden = !(state === "failed" || state === "cancelled");
  $("verify").hidden = state !== "finished";
  if (error) logLine(`error: ${error}`);
}

function onEvent(e) {
  const p = progress;
  if (e.event === "plan") {
    Object.assign(p, { total: e.bytes, done: e.bytes_done, start: e.time, startDone: e.bytes_done, shards: e.shards,
                       kept: Object.values(e.resumed || {}).reduce((a, r) => Math.max(a, r.length), 0), written: 0 });
    logLine(`plan: ${size(e.bytes_out)} to write in ${e.shards} shard(s)` + (e.bytes_done ? `, ${size(e.bytes_done)} already done` : ""));
  } else if (e.event === "shard_started") {
    p.shard = e.shard;
  } else if (e.event === "tensor") {
    p.done += e.bytes; p.tensor = `${e.name} (${e.kind})`; p.now = e.time;
  } else if (e.event === "shard_done") {
    p.written += 1; logLine(`shard done: ${e.shard}`);
  } else if (e.event === "memory") {
    p.peak = Math.max(p.peak || 0, e.peak);
  } else if (e.event === "note" || e.event === "log") {
    logLine(e.text);
  } else if (e.event === "failed") {
    logLine(`failed: ${e.error}`);
  } else if (e.event === "state") {
    setState(e.state, e.error);
  } else if (e.event === "finished") {
    p.done = p.total;
  }
  render();
}

function render() {
  const p = progress;
  if (!p.total) return;
  const fraction = Math.min(1, p.done / p.total);
  $("bar-fill").style.width = `${(100 * fraction).toFixed(1)}%`;
  const seconds = Math.max(1e-3, (p.now || p.start) - p.start);
  const rate = (p.done - p.startDone) / seconds;
  const eta = rate > 0 ? (p.total - p.done) / rate : 0;
  $("numbers").textContent = `${size(p.done)} of ${size(p.total)} (${(100 * fraction).toFixed(0)}%) · ` +
    `${rate >= 1e9 ? (rate / 1e9).toFixed(2) + " GB/s" : (rate / 1e6).toFixed(1) + " MB/s"} · ETA ${eta.toFixed(0)} s · peak memory ${p.peak ? size(p.peak) : "-"}`;
  $("current").textContent = p.shard ? `${p.shard}: ${p.tensor || ""}` : "";
  $("kept").textContent = `${p.kept + p.written} of ${p.shards} shards on disk`;
}

function watch(id) {
  if (source) source.close();
  watched = id;
  progress = { total: 0, done: 0, peak: 0, written: 0, kept: 0 };
  $("progress").hidden = false;
  $("job-id").textContent = id;
  $("log").innerHTML = ""; $("verify-out").hidden = true; $("report").textContent = "";
  source = new EventSource(`/api/jobs/${id}/events`);
  source.onmessage = (m) => onEvent(JSON.parse(m.data));
  source.addEventListener("end", (m) => {
    const job = JSON.parse(m.data);
    source.close(); source = null;
    setState(job.state);
    $("command").textContent = job.command;
    $("report").textContent = JSON.stringify(job.report || { error: job.error }, null, 1);
    if (job.state !== "finished" && job.form.format !== "gguf") $("kept").textContent += " (kept: Resume continues from them)";
    if (job.state !== "finished" && job.form.format === "gguf") $("kept").textContent = "a GGUF is written again from its start";
    history();
  });
  api("GET", `/api/jobs/${id}`).then(({ doc }) => { $("command").textContent = doc.command; });
}

async function action(name) {
  if (!watched) return;
  const { ok, doc } = await api("POST", `/api/jobs/${watched}/${name}`);
  if (!ok) { $("message").textContent = doc.error || doc.detail; $("message").className = "bad"; return null; }
  return doc;
}

async function verify() {
  $("verify-out").hidden = false;
  $("verify-out").textContent = "verifying...";
  const doc = await action("verify");
  if (!doc) return;
  const lines = [`${doc.ok ? "verified" : "NOT verified"}: ${doc.output}`, ...(doc.problems || []).map((p) => `DIFFERS: ${p}`),
                 ...(doc.notes || []).map((n) => `note: ${n}`),
                 `${doc.tensors_compared || 0} tensors compared, ${doc.tensors_sampled} sampled (${doc.rows_sampled} rows, ` +
                 `worst ${Number(doc.max_error_ratio).toFixed(2)} of the bound)`];
  $("verify-out").textContent = doc.error ? doc.error : lines.join("\n");
}

async function history() {
  const { ok, doc } = await api("GET", "/api/jobs");
  if (!ok) return [];
  $("jobs").innerHTML = "";
  for (const job of doc) {
    const tr = document.createElement("tr");
    const took = job.ended && job.started ? `${(job.ended - job.started).toFixed(1)} s` : "";
    const when = job.started ? new Date(job.started * 1000).toLocaleTimeString() : "";
    for (const text of [job.id, job.state, job.form.output, when, took]) {
      const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
    }
    tr.addEventListener("click", () => watch(job.id));
    $("jobs").appendChild(tr);
  }
  return doc;
}

async function init() {
  fillDtypes();  // (the buttons work at once; the devices list arrives when the server has asked torch)
  $("format").addEventListener("change", fillDtypes);
  $("plan").addEventListener("click", plan);
  $("start").addEventListener("click", start);
  $("cancel").addEventListener("click", () => action("cancel"));
  $("resume").addEventListener("click", async () => { if (await action("resume")) watch(watched); });
  $("verify").addEventListener("click", verify);
  history().then((jobs) => {
    const live = jobs.find((j) => j.state === "running" || j.state === "queued");
    if (live) watch(live.id);
  });
  const got = await api("GET", "/api/info");
  if (got.ok) info = got.doc;
  $("version").textContent = `v${info.version || ""}`;
  const device = $("device").value;
  $("device").innerHTML = (info.devices || ["auto", "cpu"]).map((d) => `<option>${d}</option>`).join("");
  $("device").value = device;
  fillDtypes();
}

init();
