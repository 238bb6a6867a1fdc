// The search page: plain JS over the gateway's JSON API. No build step, nothing from another origin.
// The page's state lives in the URL (view, collection, model, query, k, labels, near-duplicate
// threshold, open report), so a search can be shared and a reload shows the same results.
"use strict";

const PAGE = 24;          // results fetched per page while scrolling
const PREVIEW_MAX = 1.5e6; // uploaded images kept in session storage (for reload) up to this size, bytes
const TOKEN_KEY = "retrieval_token";

const $ = (id) => document.getElementById(id);
const state = { view: "search", c: "", m: "", q: "", k: 48, labels: "", dup: "", report: "" };
const live = { collections: [], models: [], health: null, page: null, loaded: 0, loading: false,
               encoderUp: true, watching: null, runId: "", observer: null, generation: 0 };

// -- URL state ---------------------------------------------------------------------------------------

function readUrl() {
  const p = new URLSearchParams(location.search);
  state.view = p.get("view") === "reports" ? "reports" : "search";
  state.c = p.get("c") || "";
  state.m = p.get("m") || "";
  state.q = p.get("q") || "";
  state.k = clampK(parseInt(p.get("k") || "48", 10));
  state.labels = p.get("labels") || "";
  state.dup = p.get("dup") || "";
  state.report = p.get("report") || "";
}

function writeUrl(push) {
  const p = new URLSearchParams();
  if (state.view === "reports") {
    p.set("view", "reports");
    if (state.report) p.set("report", state.report);
  } else {
    for (const key of ["c", "m", "q"]) if (state[key]) p.set(key, state[key]);
    if (state.k !== 48) p.set("k", String(state.k));
    if (state.labels) p.set("labels", state.labels);
    if (state.dup) p.set("dup", state.dup);
  }
  const url = `${location.pathname}?${p.toString()}`;
  if (url !== location.pathname + location.search) {
    (push ? history.pushState : history.replaceState).call(history, null, "", url);
  }
}

function clampK(k) {
  const max = live.health ? live.health.max_k : 500;
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), max) : 48;
}

// -- talking to the gateway ----------------------------------------------------------------------

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function setTokenCookie(value) {
  // The browser fetches images and report frames by itself, without our header: a session cookie
  // (this site only) carries the token for those GET requests.
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = value
    ? `${TOKEN_KEY}=${encodeURIComponent(value)}; path=/; SameSite=Strict${secure}`
    : `${TOKEN_KEY}=; path=/; max-age=0; SameSite=Strict${secure}`;
}

class ApiError extends Error {
  constructor(message, status, code) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError("The gateway is not reachable: check the connection and reload the page.", 0, "UNAVAILABLE");
  }
  if (options.raw && response.ok) return response;
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `The gateway answered ${response.status} ${response.statusText}.`;
    if (response.status === 401) $("login").open = true;
    throw new ApiError(message, response.status, body && body.code);
  }
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function clearError() { showError(""); }

// -- services, collections, models ---------------------------------------------------------------

async function loadHealth() {
  try {
    live.health = await api("/api/health");
  } catch (err) {
    live.health = null;
    showError(err.message);
    return;
  }
  const list = $("services");
  list.replaceChildren();
  for (const s of live.health.services) {
    const li = document.createElement("li");
    li.className = s.serving ? "up" : "down";
    li.textContent = `${s.name}: ${s.serving ? "up" : "down"}`;
    li.title = s.serving ? s.address : s.message;
    list.append(li);
  }
  const down = live.health.services.filter((s) => !s.serving);
  live.encoderUp = !down.some((s) => s.name === "encoder");
  const banner = $("banner");
  banner.textContent = down.map((s) => s.message).join(" ");
  banner.hidden = down.length === 0;
  $("k").max = String(live.health.max_k);
}

async function loadCollections() {
  try {
    live.collections = await api("/api/collections");
  } catch (err) {
    live.collections = [];
    showError(err.message);
  }
  try {
    live.models = await api("/api/models");
  } catch (err) {
    // The encoder is down: the collections still say which model made them (by-id searches work).
    live.models = [];
  }
  const select = $("collection");
  select.replaceChildren();
  for (const c of live.collections) {
    const option = new Option(`${c.name} (${c.count} images)`, c.name);
    select.append(option);
  }
  if (!live.collections.length) {
    select.append(new Option("no collection yet: run 'retrieval index'", ""));
  }
  if (state.c && live.collections.some((c) => c.name === state.c)) select.value = state.c;
  state.c = select.value;
  fillModels();
}

function currentCollection() { return live.collections.find((c) => c.name === state.c) || null; }

function modelInfo(id) { return live.models.find((m) => m.id === id) || null; }

function fillModels() {
  const collection = currentCollection();
  const select = $("model");
  select.replaceChildren();
  // A collection is searched with the model that made its vectors; one without a record takes any
  // model of its dimension.
  let ids = [];
  if (collection && collection.model) ids = [collection.model];
  else if (collection) ids = live.models.filter((m) => m.dim === collection.dim).map((m) => m.id);
  for (const id of ids) select.append(new Option(id, id));
  if (state.m && ids.includes(state.m)) select.value = state.m;
  state.m = select.value || "";
  updateInputs();
  loadLabels();
}

function updateInputs() {
  const info = modelInfo(state.m);
  const text = $("text"), note = $("text-note"), file = $("file"), fileNote = $("file-note");
  let reason = "";
  if (!live.encoderUp) reason = "The encoder is not reachable, so queries cannot be embedded; 'Search with this' on results still works.";
  else if (!state.c) reason = "Choose a collection first.";
  file.disabled = Boolean(reason);
  fileNote.textContent = reason;
  if (!reason && !info && state.m) reason = `The encoder does not list ${state.m}.`;
  if (!reason && info && !info.text) reason = info.text_reason;
  text.disabled = Boolean(reason);
  $("text-go").disabled = Boolean(reason);
  note.textContent = reason;
  if (info && info.max_text_chars) text.maxLength = info.max_text_chars;
}

async function loadLabels() {
  const list = $("label-list");
  list.replaceChildren();
  if (!state.c) return;
  try {
    const body = await api(`/api/collections/${encodeURIComponent(state.c)}/labels`);
    for (const label of body.labels) list.append(new Option(label));
  } catch (err) {
    // Labels only help typing the filter; the search itself reports real problems.
  }
}

// -- searching -----------------------------------------------------------------------------------

function searchParams(offset) {
  const p = new URLSearchParams({ collection: state.c, query: state.q, k: String(state.k),
                                  offset: String(offset), limit: String(PAGE) });
  if (state.m) p.set("model", state.m);
  if (state.labels) p.set("labels", state.labels);
  if (state.dup) p.set("duplicates", state.dup);
  return p;
}

function readOptions() {
  state.k = clampK(parseInt($("k").value, 10));
  $("k").value = String(state.k);
  state.labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean).join(",");
  const threshold = Math.min(Math.max(parseFloat($("threshold").value) || 0.95, 0.5), 1);
  state.dup = $("dedup").checked ? threshold.toFixed(2) : "";
}

function showOptions() {
  $("k").value = String(state.k);
  $("labels").value = state.labels;
  $("dedup").checked = Boolean(state.dup);
  if (state.dup) $("threshold").value = state.dup;
  if (state.q.startsWith("text:")) $("text").value = state.q.slice(5);
}

function newSearch() {
  // Answers to an older search (its next page still loading, say) must not land in this one.
  live.generation += 1;
  live.loaded = 0;
  live.page = null;
  live.loading = false;
  $("results").replaceChildren();
  $("summary").textContent = "Searching...";
  return live.generation;
}

async function runSearch(push) {
  if (!state.c || !state.q) return;
  writeUrl(push);
  describeQuery();
  const generation = newSearch();
  try {
    const page = await api(`/api/search?${searchParams(0)}`);
    if (generation !== live.generation) return;  // a newer search has started
    clearError();
    render(page, true);
  } catch (err) {
    if (generation !== live.generation) return;
    if (err.status === 404 && state.q.startsWith("upload:") && await reupload()) return;
    $("summary").textContent = "";
    showError(err.message);
  }
}

async function reupload() {
  // The gateway forgot the uploaded query (restart, expiry); this tab still has the image.
  const data = sessionStorage.getItem(state.q);
  if (!data) return false;
  await upload(blobOf(data), false);
  return true;
}

function blobOf(dataUrl) {
  // Not fetch(dataUrl): the page's Content-Security-Policy lets it connect to the gateway only.
  const [head, body] = dataUrl.split(",", 2);
  const type = (head.match(/^data:([^;,]+)/) || [])[1] || "application/octet-stream";
  const bytes = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

async function upload(blob, push) {
  if (!state.c) { showError("Choose a collection first."); return; }
  readOptions();
  const form = new FormData();
  form.append("file", blob, blob.name || "query");
  form.append("collection", state.c);
  if (state.m) form.append("model", state.m);
  form.append("k", String(state.k));
  if (state.labels) form.append("labels", state.labels);
  if (state.dup) form.append("duplicates", state.dup);
  form.append("limit", String(PAGE));
  const generation = newSearch();
  try {
    const page = await api("/api/search/image", { method: "POST", body: form });
    if (generation !== live.generation) return;
    state.q = page.query;
    if (blob.size <= PREVIEW_MAX) {
      try { sessionStorage.setItem(page.query, await dataUrl(blob)); } catch (err) { /* storage full */ }
    }
    writeUrl(push);
    describeQuery();
    clearError();
    render(page, true);
  } catch (err) {
    if (generation !== live.generation) return;
    $("summary").textContent = "";
    showError(err.message);
  }
}

function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function describeQuery() {
  const box = $("query");
  box.replaceChildren();
  if (!state.q) return;
  const [kind, ...rest] = state.q.split(":");
  const value = rest.join(":");
  const text = document.createElement("span");
  if (kind === "upload") {
    const preview = sessionStorage.getItem(state.q);
    if (preview) {
      const img = document.createElement("img");
      img.src = preview;
      img.alt = "The uploaded query image";
      box.append(img);
    }
    text.textContent = "Images like the uploaded one";
  } else if (kind === "text") {
    text.textContent = `Images matching "${value}"`;
  } else {
    text.textContent = "Images like a stored image";
  }
  box.append(text);
}

function render(page, fresh) {
  live.page = page;
  const list = $("results");
  if (fresh) list.replaceChildren();
  for (const hit of page.hits) list.append(card(hit));
  live.loaded = page.offset + page.hits.length;
  watchScroll();
  const hidden = page.hidden_duplicates ? `, ${page.hidden_duplicates} near-duplicates hidden` : "";
  $("summary").textContent = page.total
    ? `${page.total} results in ${page.collection} (${page.model}${page.exact ? ", exact" : ""}${hidden}); showing ${live.loaded}.`
    : `No results in ${page.collection}${state.labels ? " with these labels" : ""}.`;
}

function card(hit) {
  const li = document.createElement("li");
  li.className = "card";
  const label = hit.labels.join(", ") || "(no label)";
  const open = document.createElement("button");
  open.type = "button";
  open.className = "thumb";
  open.setAttribute("aria-label", `Open result ${hit.rank} larger: ${label}, score ${hit.score.toFixed(3)}`);
  if (hit.image) {
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.src = hit.image;
    img.alt = `${label} (rank ${hit.rank}, score ${hit.score.toFixed(3)})`;
    open.append(img);
  } else {
    open.textContent = "image not served here";
  }
  open.addEventListener("click", () => openViewer(hit));
  const meta = document.createElement("p");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${hit.rank}`;
  const name = document.createElement("span");
  name.className = "label";
  name.textContent = label;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  meta.append(rank, name, score);
  const similar = document.createElement("button");
  similar.type = "button";
  similar.className = "similar";
  similar.textContent = "Search with this";
  similar.setAttribute("aria-label", `Search with result ${hit.rank} (${label})`);
  similar.addEventListener("click", () => searchWith(hit));
  li.dataset.id = hit.id;
  li.append(open, meta, similar);
  return li;
}

function searchWith(hit) {
  state.q = `id:${hit.id}`;
  if ($("viewer").open) $("viewer").close();
  window.scrollTo(0, 0);
  runSearch(true);
}

async function loadMore() {
  const page = live.page;
  if (!page || live.loading || live.loaded >= page.total) return;
  live.loading = true;
  const generation = live.generation;
  try {
    const next = await api(`/api/search?${searchParams(live.loaded)}`);
    if (generation === live.generation) render(next, false);
  } catch (err) {
    if (generation === live.generation) showError(err.message);
  } finally {
    if (generation === live.generation) live.loading = false;
  }
}

function openViewer(hit) {
  const label = hit.labels.join(", ") || "(no label)";
  $("viewer-title").textContent = `#${hit.rank}: ${label}`;
  const img = $("viewer-img");
  img.src = hit.image || "";
  img.alt = `${label}, the larger image of result ${hit.rank}`;
  img.hidden = !hit.image;
  $("viewer-meta").textContent = `score ${hit.score.toFixed(4)} · ${hit.dataset}/${hit.path}`;
  $("viewer-search").onclick = () => searchWith(hit);
  $("viewer").showModal();
  $("viewer-search").focus();
}

// -- reports -------------------------------------------------------------------------------------

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

async function loadRunForm() {
  try {
    const datasets = await api("/api/datasets");
    const select = $("run-dataset");
    select.replaceChildren(...datasets.map((d) => new Option(d.name, d.name)));
  } catch (err) { showError(err.message); }
  const models = $("run-models");
  const ids = live.models.length ? live.models.map((m) => m.id)
    : [...new Set(live.collections.map((c) => c.model).filter(Boolean))];
  models.replaceChildren(...ids.map((id) => new Option(id, id)));
  // The models the encoder has loaded are the quick ones to run; choose those to begin with.
  const loaded = new Set(live.models.filter((m) => m.loaded).map((m) => m.id));
  for (const option of models.options) option.selected = loaded.has(option.value);
  if (!models.selectedOptions.length && models.options.length) models.options[0].selected = true;
}

async function loadRuns() {
  const body = $("runs").tBodies[0];
  let runs;
  try {
    runs = await api("/api/runs?limit=50");
  } catch (err) {
    showError(err.message);
    return;
  }
  body.replaceChildren();
  for (const run of runs) {
    const tr = document.createElement("tr");
    const maps = Object.entries(run.metrics).filter(([k]) => k.endsWith("/map"))
      .map(([k, v]) => `${k.slice(0, -4)} ${v.toFixed(4)}`).join("; ");
    const stateText = run.state === "running" ? `running: ${run.stage} ${run.done}/${run.total}`
      : run.state + (run.error ? `: ${run.error}` : "");
    for (const text of [when(run.created), run.dataset, run.models.join(", "), stateText, maps]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const links = document.createElement("td");
    for (const report of run.reports) {
      if (!report.url) continue;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = `Open ${report.path.split("/").pop().replace(/\.json$/, "")}`;
      button.addEventListener("click", () => openReport(report.path, true));
      links.append(button);
    }
    if (run.state === "running" || run.state === "queued") {
      const watch = document.createElement("button");
      watch.type = "button";
      watch.textContent = "Watch";
      watch.addEventListener("click", () => watchRun(run.id));
      links.append(watch);
    }
    tr.append(links);
    body.append(tr);
  }
  if (!runs.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 6;
    td.textContent = "No runs yet.";
    tr.append(td);
    body.append(tr);
  }
}

async function loadSummaries() {
  const list = $("summaries");
  try {
    const summaries = await api("/api/reports");
    list.replaceChildren();
    for (const s of summaries) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      button.textContent = `${s.path} (${when(s.modified)})`;
      button.addEventListener("click", () => openReport(s.path, true));
      li.append(button);
      list.append(li);
    }
    if (!summaries.length) list.append(Object.assign(document.createElement("li"),
      { textContent: "No aggregated report yet ('retrieval eval report DIR' writes summary.html)." }));
  } catch (err) { showError(err.message); }
}

async function openReport(path, push) {
  state.report = path;
  writeUrl(push);
  const section = $("report"), frame = $("report-frame"), bodyBox = $("report-body");
  section.hidden = false;
  $("report-title").textContent = path;
  bodyBox.replaceChildren();
  frame.hidden = true;
  const url = `/reports/${path.split("/").map(encodeURIComponent).join("/")}`;
  if (path.endsWith(".html")) {
    frame.src = url;
    frame.hidden = false;
  } else if (path.endsWith(".json")) {
    try {
      renderRunReport(await api(url), path, bodyBox);
    } catch (err) { showError(err.message); }
  }
  section.scrollIntoView();
}

function renderRunReport(report, path, box) {
  const folder = path.includes("/") ? path.slice(0, path.lastIndexOf("/") + 1) : "";
  const m = report.metrics;
  const heading = document.createElement("p");
  heading.textContent = `${report.model.id} on ${report.dataset.name} (${report.protocol}, ${report.dataset.n_images} images, `
    + `${report.dataset.n_classes} classes): mAP ${m.map === null ? "-" : m.map.toFixed(4)}`;
  const table = document.createElement("table");
  const ks = Object.keys(m.precision_at_k);
  const head = table.createTHead().insertRow();
  for (const text of ["k", ...ks]) head.append(Object.assign(document.createElement("th"), { textContent: text, scope: "col" }));
  for (const [name, values] of [["P@k", m.precision_at_k], ["R@k", m.recall_at_k], ["mAP@k", m.map_at_k]]) {
    const row = table.insertRow();
    row.append(Object.assign(document.createElement("th"), { textContent: name, scope: "row" }));
    for (const k of ks) row.insertCell().textContent = values[k] === null ? "-" : values[k].toFixed(4);
  }
  box.append(heading, table);
  const captions = { pr_curve_png: "Precision-recall curve", grid_png: "Best and worst queries", tsne_png: "t-SNE map" };
  for (const [key, caption] of Object.entries(captions)) {
    const rel = report.artifacts && report.artifacts[key];
    if (!rel) continue;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `/reports/${(folder + rel).split("/").map(encodeURIComponent).join("/")}`;
    img.alt = `${caption} of ${report.model.id} on ${report.dataset.name}`;
    img.loading = "lazy";
    figure.append(img, Object.assign(document.createElement("figcaption"), { textContent: caption }));
    box.append(figure);
  }
}

async function startRun(event) {
  event.preventDefault();
  const models = [...$("run-models").selectedOptions].map((o) => o.value);
  if (!$("run-dataset").value || !models.length) {
    showError("Choose a dataset and at least one model.");
    return;
  }
  const body = { dataset: $("run-dataset").value, models, protocol: $("run-protocol").value,
                 catalogue: $("run-catalogue").value.trim(), queries: $("run-queries").value.trim(),
                 run_name: $("run-name").value.trim(), tsne: $("run-tsne").checked };
  try {
    const started = await api("/api/runs", { method: "POST", body: JSON.stringify(body),
                                             headers: { "Content-Type": "application/json" } });
    clearError();
    watchRun(started.run_id);
  } catch (err) { showError(err.message); }
}

async function watchRun(runId) {
  if (live.watching) live.watching.abort();
  const controller = new AbortController();
  live.watching = controller;
  live.runId = runId;
  const box = $("run-progress"), bar = $("run-bar"), stage = $("run-stage");
  box.hidden = false;
  $("run-cancel").hidden = false;
  stage.textContent = `Run ${runId}: waiting for the evaluator`;
  let last = null;
  try {
    const response = await api(`/api/runs/${encodeURIComponent(runId)}/events`, { raw: true, signal: controller.signal });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (event === "run") {
          last = JSON.parse(data);
          bar.max = Math.max(last.total, 1);
          bar.value = last.done;
          stage.textContent = `Run ${runId}: ${last.state}${last.stage ? `, ${last.stage} ${last.done}/${last.total}` : ""}`
            + (last.message ? ` (${last.message})` : "");
        } else if (event === "error") {
          showError(JSON.parse(data).error);
        }
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  }
  if (live.watching === controller) live.watching = null;
  $("run-cancel").hidden = true;
  if (last) {
    const maps = Object.entries(last.metrics).filter(([k]) => k.endsWith("/map"))
      .map(([k, v]) => `${k.slice(0, -4)} mAP ${v.toFixed(4)}`).join(", ");
    stage.textContent = `Run ${runId} ${last.state}${maps ? `: ${maps}` : ""}${last.error ? `: ${last.error}` : ""}`;
  }
  loadRuns();
  loadSummaries();
}

async function cancelRun() {
  if (!live.runId) return;
  try {
    await api(`/api/runs/${encodeURIComponent(live.runId)}/cancel`, { method: "POST" });
  } catch (err) { showError(err.message); }
}

// -- views and wiring ----------------------------------------------------------------------------

async function showView() {
  const reports = state.view === "reports";
  $("search-view").hidden = reports;
  $("reports-view").hidden = !reports;
  $("nav-search").setAttribute("aria-current", reports ? "false" : "page");
  $("nav-reports").setAttribute("aria-current", reports ? "page" : "false");
  if (reports) {
    await loadRunForm();
    await Promise.all([loadRuns(), loadSummaries()]);
    if (state.report) openReport(state.report, false);
    else $("report").hidden = true;
  }
}

async function start() {
  readUrl();
  setTokenCookie(token());
  $("token").value = token();
  showOptions();
  await loadHealth();
  await loadCollections();
  await showView();
  if (state.view === "search") runSearch(false);
}

function wire() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
    setTokenCookie(value);
    $("login").open = false;
    clearError();
    start();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    setTokenCookie("");
    $("token").value = "";
  });
  for (const link of document.querySelectorAll("nav a")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      state.view = link.dataset.view;
      writeUrl(true);
      showView();
    });
  }
  $("collection").addEventListener("change", () => {
    state.c = $("collection").value;
    state.q = "";
    $("results").replaceChildren();
    $("summary").textContent = "";
    $("query").replaceChildren();
    fillModels();
    writeUrl(true);
  });
  $("model").addEventListener("change", () => { state.m = $("model").value; updateInputs(); writeUrl(false); });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) upload(file, true);
    $("file").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (!file) { showError("Drop an image file (a link or text cannot be searched with)."); return; }
    if ($("file").disabled) { showError($("file-note").textContent); return; }
    upload(file, true);
  });
  document.addEventListener("paste", (event) => {
    if (state.view !== "search" || event.target === $("text") || event.target === $("labels")) return;
    const file = [...(event.clipboardData ? event.clipboardData.files : [])][0];
    if (!file) return;
    event.preventDefault();
    if ($("file").disabled) { showError($("file-note").textContent); return; }
    upload(file, true);
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    readOptions();
    const text = $("text").value.trim();
    if (!$("text").disabled && text) state.q = `text:${text}`;
    runSearch(true);
  });
  $("apply").addEventListener("click", () => { readOptions(); runSearch(true); });
  for (const id of ["k", "labels", "threshold", "dedup"]) {
    // Enter in an option applies it (the form's own submit button is off for image-only models).
    $(id).addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault();
      readOptions();
      runSearch(true);
    });
  }
  $("viewer-close").addEventListener("click", () => $("viewer").close());
  $("run-form").addEventListener("submit", startRun);
  $("run-cancel").addEventListener("click", cancelRun);
  $("runs-refresh").addEventListener("click", loadRuns);
  window.addEventListener("popstate", async () => {
    readUrl();
    showOptions();
    if ($("collection").value !== state.c && live.collections.some((c) => c.name === state.c)) {
      $("collection").value = state.c;
      fillModels();
    }
    await showView();
    if (state.view === "search") {
      if (state.q) runSearch(false);
      else { $("results").replaceChildren(); $("summary").textContent = ""; $("query").replaceChildren(); }
    }
  });
  live.observer = new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: "400px" });
  watchScroll();
}

function watchScroll() {
  // Observing anew reports the sentinel's current state: a page that leaves it in view loads the next.
  if (!live.observer) return;
  live.observer.unobserve($("more"));
  live.observer.observe($("more"));
}

wire();
start();
