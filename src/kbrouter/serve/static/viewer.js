// kbrouter trace viewer: plain JS, no build step. Asks questions through POST /v1/answer
// (multipart, streamed server-sent events) and renders each step as it arrives; compares two
// methods side by side; browses evaluation results served under /v1/results.
"use strict";

const $ = (id) => document.getElementById(id);
const kbInfo = {};
let results = { name: "", items: [] };

function headers() {
  const key = localStorage.getItem("kbrouterKey");
  return key ? { "X-API-Key": key } : {};
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: { ...headers(), ...(opts.headers || {}) } });
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${msg}`);
  }
  return r;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function status(text) { $("status").textContent = text; }

// An <img> cannot send the API key header: with a key, the image is fetched with it and shown
// from a blob URL (released once loaded).
function thumbnail(url, alt) {
  const img = el("img", { alt, loading: "lazy" });
  if (!localStorage.getItem("kbrouterKey")) {
    img.src = url;
    return img;
  }
  api(url).then((r) => r.blob()).then((blob) => {
    img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
    img.src = URL.createObjectURL(blob);
  }).catch((err) => { img.alt = `${alt} (${err.message || err})`; });
  return img;
}

// ------------------------------------------------------------------ rendering pieces

function evidenceItem(ev) {
  const li = el("li", { "data-modality": ev.modality });
  const head = `[${ev.kb}] ${ev.title || ev.id} · ${Number(ev.score).toFixed(3)}` +
    (ev.image_match ? " · image match" : "");
  li.append(el("div", { class: "meta", text: head }));
  if (ev.modality === "image" && ev.image_url) li.append(thumbnail(ev.image_url, ev.title || ev.id));
  if (ev.table) {
    const t = el("table");
    t.append(el("tr", {}, ...ev.table.header.map((h) => el("th", { text: h }))));
    for (const row of ev.table.rows.slice(0, 12)) {
      t.append(el("tr", {}, ...row.map((c) => el("td", { text: c }))));
    }
    li.append(t);
  } else {
    li.append(el("div", { text: ev.text.length > 400 ? ev.text.slice(0, 400) + " …" : ev.text }));
  }
  return li;
}

function routeBlock(data) {
  const box = el("div", { class: "route" });
  if (data.think) box.append(el("div", { class: "think", text: data.think }));
  if (data.stop) {
    box.append(el("div", { text: "router: enough information — answering" }));
  } else {
    box.append(el("div", { text: `sub-question: ${data.sub_question}` }));
    for (const kb of data.kbs) {
      const desc = kbInfo[kb] ? ` — ${kbInfo[kb].description}` : "";
      box.append(el("div", {}, el("span", { class: "kb", text: kb }),
        el("span", { class: "meta", text: desc })));
    }
  }
  box.append(el("div", { class: "who", text: `decided by: ${data.decided_by}` }));
  return box;
}

function retrievalBlock(data) {
  const box = el("div", { class: "retrieval" });
  if (data.error) box.append(el("div", { class: "error", text: `${data.kb}: ${data.error}` }));
  const ul = el("ul", { class: "evidence", "aria-label": `evidence from ${data.kb}` });
  for (const ev of data.evidence) ul.append(evidenceItem(ev));
  box.append(ul);
  return box;
}

function stepBox(index) {
  const box = el("div", { class: "step", "data-step": String(index) });
  box.append(el("h3", { text: `step ${index + 1}` }));
  return box;
}

function stepMeta(data) {
  const parts = [];
  if (data.tokens != null) parts.push(`${data.tokens} tokens`);
  if (data.seconds != null) parts.push(`${Number(data.seconds).toFixed(2)} s`);
  return el("div", { class: "meta", text: parts.join(" · ") });
}

function answerBlock(data) {
  const box = el("div", {});
  box.append(el("div", { class: "answer", "data-testid": "answer", text: data.answer || "(no answer)" }));
  const facts = [`stop: ${data.stop_reason}`];
  const n = Array.isArray(data.steps) ? data.steps.length : data.steps;
  if (n != null) facts.push(`${n} step(s)`);
  if (data.tokens != null) facts.push(`${data.tokens} tokens`);
  if (data.seconds != null) facts.push(`${Number(data.seconds).toFixed(1)} s`);
  box.append(el("div", { class: "meta", text: facts.join(" · ") }));
  if (data.error) box.append(el("div", { class: "error", text: data.error }));
  return box;
}

// A whole trajectory view (results browsing): the same blocks the live stream builds.
function renderTrajectory(container, view) {
  container.replaceChildren(el("h2", { text: view.question }));
  for (const s of view.steps) {
    const box = stepBox(s.index);
    if (s.route) box.append(routeBlock(s.route));
    for (const r of s.retrievals) box.append(retrievalBlock(r));
    if (s.sub_answer != null) box.append(el("div", { text: `sub-answer: ${s.sub_answer}` }));
    for (const n of s.notes) box.append(el("div", { class: "note", text: `note: ${n}` }));
    box.append(stepMeta(s));
    container.append(box);
  }
  container.append(answerBlock(view));
  if (view.golds) container.append(el("div", { class: "meta", text: `gold: ${view.golds.join(" | ")}` }));
}

// ------------------------------------------------------------------ live answering

async function streamAnswer(container, method) {
  const form = new FormData();
  form.append("question", $("question").value.trim());
  form.append("method", method);
  form.append("max_steps", $("max_steps").value);
  form.append("top_k", $("top_k").value);
  form.append("stream", "true");
  const file = $("image").files[0];
  if (file) form.append("image", file);
  container.replaceChildren(el("h2", { text: method }));
  let step = null;
  const handle = (event, data) => {
    if (event === "step_start") { step = stepBox(data.step); container.append(step); }
    else if (event === "route" && step) step.append(routeBlock(data));
    else if (event === "retrieval" && step) step.append(retrievalBlock(data));
    else if (event === "sub_answer" && step) step.append(el("div", { text: `sub-answer: ${data.sub_answer}` }));
    else if (event === "step_end" && step) { step.append(stepMeta(data)); step = null; }
    else if (event === "note") (step || container).append(el("div", { class: "note", text: `note: ${data.message}` }));
    else if (event === "final") container.append(answerBlock(data.view || data));
    else if (event === "error") container.append(el("div", { class: "error", text: data.message }));
  };
  const r = await api("/v1/answer", { method: "POST", body: form, headers: { Accept: "text/event-stream" } });
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) handle(event, JSON.parse(data.join("\n")));
    }
  }
}

async function ask(e) {
  if (e) e.preventDefault();
  if (!$("question").value.trim()) { $("question").focus(); return; }
  const methods = [$("method").value];
  if ($("method2").value && $("method2").value !== methods[0]) methods.push($("method2").value);
  const runs = $("runs");
  runs.replaceChildren();
  status("answering …");
  $("ask").disabled = true;
  try {
    // one after the other: the model serves one question at a time best on small machines
    for (const m of methods) {
      const box = el("div", { class: "run", "data-method": m, "aria-live": "polite" });
      runs.append(box);
      try { await streamAnswer(box, m); } catch (err) { box.append(el("div", { class: "error", text: String(err.message || err) })); }
    }
    status("done");
  } finally {
    $("ask").disabled = false;
  }
}

// ------------------------------------------------------------------ results browsing

function showResults() {
  const filter = $("results-filter").value;
  const kb = $("results-kb").value;
  const list = $("results-list");
  list.replaceChildren();
  let shown = 0;
  for (const item of results.items) {
    if (filter === "correct" && !item.correct) continue;
    if (filter === "incorrect" && item.correct) continue;
    if (kb && !item.kbs.includes(kb)) continue;
    shown += 1;
    const li = el("li", { tabindex: "0", role: "option", "aria-selected": "false", "data-id": item.id },
      el("span", { class: item.correct ? "ok" : "bad", text: item.correct ? "✓ " : "✗ " }),
      el("span", { text: item.question }),
      el("div", { class: "meta", text: `${item.prediction} · ${item.kbs.join(", ") || "no KB"} · ${item.stage || ""}` }));
    li.addEventListener("click", () => openItem(li, item.id));
    li.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); openItem(li, item.id); }
      else if (ev.key === "ArrowDown" && li.nextElementSibling) { ev.preventDefault(); li.nextElementSibling.focus(); }
      else if (ev.key === "ArrowUp" && li.previousElementSibling) { ev.preventDefault(); li.previousElementSibling.focus(); }
    });
    list.append(li);
  }
  $("results-summary").textContent = `${shown} of ${results.items.length} shown`;
}

async function openItem(li, id) {
  for (const other of $("results-list").children) other.setAttribute("aria-selected", "false");
  li.setAttribute("aria-selected", "true");
  const r = await api(`/v1/results/${encodeURIComponent(results.name)}/${encodeURIComponent(id)}`);
  renderTrajectory($("results-detail"), await r.json());
}

async function loadResults(name) {
  if (!name) return;
  const r = await api(`/v1/results/${encodeURIComponent(name)}`);
  results = await r.json();
  const kbs = new Set(results.items.flatMap((i) => i.kbs));
  $("results-kb").replaceChildren(el("option", { value: "", text: "any" }),
    ...[...kbs].sort().map((k) => el("option", { value: k, text: k })));
  showResults();
}

function tab(which) {
  const ask = which === "ask";
  $("view-ask").hidden = !ask;
  $("view-results").hidden = ask;
  $("tab-ask").setAttribute("aria-pressed", String(ask));
  $("tab-results").setAttribute("aria-pressed", String(!ask));
}

async function load() {
  try {
    const models = (await (await api("/v1/models")).json()).data.map((m) => m.id.replace(/^kbrouter\//, ""));
    $("method").replaceChildren(...models.map((m) => el("option", { value: m, text: m })));
    $("method2").replaceChildren(el("option", { value: "", text: "(none)" }),
      ...models.map((m) => el("option", { value: m, text: m })));
    for (const kb of (await (await api("/v1/kbs")).json()).kbs) kbInfo[kb.name] = kb;
    const dirs = (await (await api("/v1/results")).json()).results;
    $("results-dir").replaceChildren(...dirs.map((d) =>
      el("option", { value: d.name, text: `${d.name} (${d.method || "?"}, ${d.questions} q)` })));
    if (dirs.length) await loadResults(dirs[0].name);
    status("ready");
  } catch (err) {
    status(String(err.message || err));
  }
}

function init() {
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ask(e); });
  $("tab-ask").addEventListener("click", () => tab("ask"));
  $("tab-results").addEventListener("click", () => tab("results"));
  $("results-filter").addEventListener("change", showResults);
  $("results-kb").addEventListener("change", showResults);
  $("results-dir").addEventListener("change", (e) => loadResults(e.target.value));
  // the API key (servers started with --api-key-env) stays in this browser's local storage
  $("api-key").value = localStorage.getItem("kbrouterKey") || "";
  $("api-key").addEventListener("change", (e) => {
    const key = e.target.value.trim();
    if (key) localStorage.setItem("kbrouterKey", key);
    else localStorage.removeItem("kbrouterKey");
    load();
  });
  load();
}

init();
