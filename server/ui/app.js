// Backhaul's operator page. It drives the REST API documented at /openapi.json, signed in with
// the session cookie the server sets at POST /ui/session; the CSRF token it returns is kept in
// this script's memory only and sent with every request that changes state.
//
// Everything a store supplies (ids, labels, file names, error messages) is put into the page
// with text nodes (`el` below), never parsed as HTML.
"use strict";

const state = { csrf: null, operator: null, timers: [], streams: [] };

// ---- DOM helpers -------------------------------------------------------------------------

/** An element with attributes and children; strings become text nodes, never HTML. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function showAlert(message) {
  const box = $("alert");
  box.textContent = message || "";
  box.hidden = !message;
}

function badge(text, cls) {
  return el("span", { class: `badge st-${cls || text}` }, text);
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

function when(rfc3339) {
  if (!rfc3339) return "";
  const d = new Date(rfc3339);
  return Number.isNaN(d.getTime()) ? rfc3339 : d.toLocaleString();
}

function duration(secs) {
  if (secs === null || secs === undefined) return "";
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ${secs % 60} s`;
  return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
}

function labelsText(labels) {
  return Object.entries(labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
}

function table(headers, rows, caption) {
  return el("table", {},
    caption ? el("caption", { class: "muted" }, caption) : null,
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows));
}

// ---- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls the API; JSON in and out. A 401 sends the operator back to the sign-in form. */
async function api(method, path, body) {
  const headers = { accept: "application/json" };
  if (method !== "GET") headers["x-csrf-token"] = state.csrf || "";
  if (body !== undefined) headers["content-type"] = "application/json";
  const resp = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    const code = data && data.error ? data.error.code : `HTTP_${resp.status}`;
    const message = data && data.error ? data.error.message : resp.statusText;
    if (resp.status === 401 && !path.startsWith("/ui/session")) signedOut(message);
    throw new ApiError(resp.status, code, `${code}: ${message}`);
  }
  return data;
}

/** Runs `fn` now and every `ms` while the current view lasts. */
function every(ms, fn) {
  fn();
  state.timers.push(setInterval(fn, ms));
}

/**
 * Follows an event stream of the API, calling `onData` with each parsed frame of `event`. When
 * the stream cannot be held (a proxy that buffers), it polls `fallbackPath` instead.
 */
function follow(path, event, fallbackPath, onData, isLast) {
  let polling = false;
  const source = new EventSource(path, { withCredentials: true });
  state.streams.push(source);
  source.addEventListener(event, (e) => {
    const data = JSON.parse(e.data);
    onData(data);
    if (isLast && isLast(data)) source.close();
  });
  source.onerror = () => {
    if (source.readyState !== EventSource.CLOSED || polling) return;
    polling = true;
    const timer = setInterval(async () => {
      try {
        const data = await api("GET", fallbackPath);
        onData(data);
        if (isLast && isLast(data)) clearInterval(timer);
      } catch (err) {
        clearInterval(timer);
      }
    }, 2000);
    state.timers.push(timer);
  };
}

function leaveView() {
  state.timers.forEach(clearInterval);
  state.streams.forEach((s) => s.close());
  state.timers = [];
  state.streams = [];
}

// ---- Session -----------------------------------------------------------------------------

function signedIn(session) {
  state.csrf = session.csrf_token;
  state.operator = session.operator;
  $("who").textContent = `${session.operator} · until ${when(session.expires_at)}`;
  $("sign-in").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  showAlert("");
  route();
}

function signedOut(message) {
  leaveView();
  state.csrf = null;
  $("who").textContent = "";
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("view").replaceChildren();
  $("sign-in").hidden = false;
  showAlert(message || "");
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const field = $("token");
  try {
    const session = await api("POST", "/ui/session", { token: field.value.trim() });
    field.value = "";
    signedIn(session);
  } catch (err) {
    showAlert(err.message);
  }
}

async function signOut() {
  try {
    await api("DELETE", "/ui/session");
  } catch (err) {
    // The session is gone either way.
  }
  signedOut("Signed out.");
}

// ---- Views -------------------------------------------------------------------------------

const views = {
  stores: storesView,
  store: storeView,
  collections: collectionsView,
  collection: collectionView,
  schedules: schedulesView,
};

function route() {
  if (!state.csrf) return;
  leaveView();
  showAlert("");
  const [name, arg] = (location.hash.replace(/^#\/?/, "") || "stores").split("/");
  const view = views[name] || storesView;
  for (const a of document.querySelectorAll("nav a")) {
    const current = a.getAttribute("href") === `#/${name}` || a.getAttribute("href") === `#/${name}s`;
    if (current) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const root = $("view");
  root.replaceChildren();
  view(root, arg ? decodeURIComponent(arg) : undefined).catch((err) => showAlert(err.message));
}

/** Stores: every store ever seen, a page at a time, filtered on the server. */
async function storesView(root) {
  const filters = { label: "", glob: "", q: "", connected: "" };
  let cursors = [null];
  const summary = el("p", { class: "muted", "aria-live": "polite" });
  const body = el("div");
  const prev = el("button", { type: "button", class: "secondary", onclick: () => { cursors.pop(); load(); } }, "Previous");
  const next = el("button", { type: "button", class: "secondary" }, "Next");
  const field = (name, label, placeholder) => el("div", {},
    el("label", { for: `f-${name}` }, label),
    el("input", { id: `f-${name}`, name, placeholder, oninput: (e) => { filters[name] = e.target.value; cursors = [null]; load(); } }));
  const connected = el("select", { id: "f-connected", onchange: (e) => { filters.connected = e.target.value; cursors = [null]; load(); } },
    el("option", { value: "" }, "all"), el("option", { value: "true" }, "connected"), el("option", { value: "false" }, "offline"));
  root.append(
    el("h1", {}, "Stores"),
    el("form", { class: "row", role: "search", onsubmit: (e) => e.preventDefault() },
      field("q", "Search", "id, label or version"),
      field("label", "Labels", "region=north,brand=x"),
      field("glob", "Id glob", "store-*"),
      el("div", {}, el("label", { for: "f-connected" }, "Connection"), connected)),
    summary, body, el("div", { class: "pager" }, prev, next));
  next.addEventListener("click", () => { cursors.push(next.dataset.after); load(); });

  let seq = 0;
  async function load() {
    const mine = ++seq;
    const params = new URLSearchParams({ limit: "50" });
    for (const [k, v] of Object.entries(filters)) if (v.trim()) params.set(k, v.trim());
    const after = cursors[cursors.length - 1];
    if (after) params.set("after", after);
    let page;
    try {
      page = await api("GET", `/stores?${params}`);
    } catch (err) {
      if (mine === seq) summary.textContent = err.message;
      return;
    }
    if (mine !== seq) return;
    summary.textContent = `${page.total} ${page.total === 1 ? "store matches" : "stores match"}, ${page.connected} connected; page ${cursors.length}`;
    prev.disabled = cursors.length <= 1;
    next.disabled = !page.next_after;
    next.dataset.after = page.next_after || "";
    body.replaceChildren(table(
      ["Store", "Connection", "Last seen", "Labels", "Agent", "Token expires"],
      page.stores.map((s) => el("tr", { "data-store": s.client_id },
        el("td", {}, el("a", { href: `#/store/${encodeURIComponent(s.client_id)}` }, s.client_id)),
        el("td", {}, s.connected ? badge("connected") : badge("offline")),
        el("td", {}, when(s.last_seen)),
        el("td", {}, labelsText(s.labels)),
        el("td", {}, s.agent_version ? `${s.agent_version} (protocol ${s.protocol_version})` : ""),
        el("td", {}, when(s.token_expires_at)))),
      "Stores, by id"));
  }
  every(5000, load);
}

/** One store: its connection, a pull button, its current upload live, and its uploads. */
async function storeView(root, clientId) {
  const facts = el("dl", { class: "facts" });
  const live = el("div", { "aria-live": "polite" });
  const list = el("div");
  const share = el("input", { id: "pull-share", value: "default", required: true });
  const encoding = el("select", { id: "pull-encoding" },
    ["auto", "zstd", "none"].map((v) => el("option", { value: v }, v)));
  let following = null;

  root.append(
    el("h1", {}, "Store ", el("span", { class: "store-id" }, clientId)),
    facts,
    el("h2", {}, "Pull a file now"),
    el("form", { class: "row", onsubmit: pull },
      el("div", {}, el("label", { for: "pull-share" }, "Share"), share),
      el("div", {}, el("label", { for: "pull-encoding" }, "Compression"), encoding),
      el("button", { type: "submit" }, "Pull now")),
    el("h2", {}, "Current upload"), live,
    el("h2", {}, "Uploads, newest first"), list);

  async function pull(event) {
    event.preventDefault();
    const params = new URLSearchParams({ file: share.value.trim(), encoding: encoding.value });
    try {
      const started = await api("POST", `/trigger-download/${encodeURIComponent(clientId)}?${params}`);
      followUpload(started.upload_id);
      loadUploads();
    } catch (err) {
      showAlert(err.message);
    }
  }

  function followUpload(uploadId) {
    if (following === uploadId) return;
    following = uploadId;
    follow(`/uploads/${uploadId}/events`, "status", `/uploads/${uploadId}`,
      (s) => { renderLive(s); if (["completed", "failed", "cancelled"].includes(s.state)) loadUploads(); },
      (s) => ["completed", "failed", "cancelled"].includes(s.state));
  }

  function renderLive(s) {
    const total = s.stored_size || s.size;
    const away = !s.agent_connected && !["completed", "failed", "cancelled"].includes(s.state);
    const cancel = el("button", { type: "button", class: "danger", onclick: async () => {
      try { renderLive(await api("DELETE", `/uploads/${s.upload_id}`)); } catch (err) { showAlert(err.message); }
    } }, "Cancel");
    live.replaceChildren(el("div", { class: "upload-live", "data-upload": s.upload_id, "data-state": s.state },
      el("p", {}, badge(s.state), " ", s.file_name || s.share,
        s.stalled ? [" ", badge("stalled")] : null, away ? [" ", badge("agent away", "offline")] : null),
      total ? el("progress", { max: total, value: s.bytes_done, "aria-label": "Bytes uploaded" }) : null,
      el("p", { class: "muted" },
        `${bytes(s.bytes_done)} of ${bytes(total) || "?"}`,
        s.rate_bytes_per_sec ? ` · ${bytes(s.rate_bytes_per_sec)}/s` : "",
        s.eta_secs !== null && s.eta_secs !== undefined ? ` · ${duration(s.eta_secs)} to go` : ""),
      s.error ? el("p", { class: "error" }, `${s.error.code}: ${s.error.message}`) : null,
      ["completed", "failed", "cancelled"].includes(s.state) ? null : cancel));
  }

  async function loadStatus() {
    const st = await api("GET", `/status/${encodeURIComponent(clientId)}`);
    facts.replaceChildren(
      el("dt", {}, "Connection"), el("dd", {}, st.connected ? badge("connected") : badge("offline")),
      el("dt", {}, "Connected since"), el("dd", {}, when(st.connected_since)),
      el("dt", {}, "Last seen"), el("dd", {}, when(st.last_seen)),
      el("dt", {}, "Token expires"), el("dd", {}, when(st.token_expires_at)));
    if (st.active_upload) followUpload(st.active_upload);
    else if (!following) live.replaceChildren(el("p", { class: "muted" }, "None."));
  }

  async function loadUploads() {
    const page = await api("GET", `/stores/${encodeURIComponent(clientId)}/uploads?limit=50`);
    list.replaceChildren(table(
      ["Created", "Share", "State", "Size", "Stored", "Error", "File"],
      page.uploads.map((u) => el("tr", { "data-upload": u.upload_id, "data-state": u.state },
        el("td", {}, when(u.created_at)),
        el("td", {}, u.file_name || u.share),
        el("td", {}, badge(u.state)),
        el("td", {}, bytes(u.size)),
        el("td", {}, u.encoding && u.encoding !== "none" ? `${bytes(u.stored_size)} (${u.encoding})` : ""),
        el("td", { class: "error" }, u.error ? `${u.error.code}: ${u.error.message}` : ""),
        el("td", {}, u.state === "completed"
          ? el("a", { href: `/uploads/${u.upload_id}/download`, class: "download" }, "Download")
          : ""))),
      "Uploads of this store"));
  }

  await Promise.all([loadStatus(), loadUploads()]);
  state.timers.push(setInterval(() => loadStatus().catch(() => {}), 5000));
}

const TARGET_HINT = {
  all: "",
  labels: "region=north,brand=x",
  glob: "store-*",
  ids: "store-1,store-2",
};

function targetOf(kind, value) {
  const list = value.split(",").map((v) => v.trim()).filter(Boolean);
  if (kind === "labels") return { kind, labels: list };
  if (kind === "glob") return { kind, pattern: value.trim() };
  if (kind === "ids") return { kind, client_ids: list };
  return { kind: "all" };
}

function summaryBar(c) {
  const counts = c.counts;
  const parts = [
    ["completed", counts.completed],
    ["running", counts.running],
    ["pending", counts.pending_offline + counts.queued],
    ["failed", counts.failed + counts.cancelled],
    ["not_reached", counts.not_reached],
  ];
  const total = Math.max(1, counts.matched);
  return el("div", {},
    el("div", { class: "bar", role: "img", "aria-label": parts.map(([k, v]) => `${v} ${k}`).join(", ") },
      parts.filter(([, v]) => v > 0).map(([k, v]) => el("span", { class: `seg-${k}`, "data-width": v / total }))),
    el("div", { class: "legend counts" },
      parts.map(([k, v]) => el("span", { class: `count-${k}` }, `${k.replace("_", " ")} ${v}  `)),
      `of ${counts.matched}`));
}

/** Sizes the segments of summary bars (no inline style attributes: the CSP forbids them). */
function sizeBars(root) {
  for (const span of root.querySelectorAll(".bar span[data-width]")) {
    span.style.width = `${(Number(span.dataset.width) * 100).toFixed(2)}%`;
  }
}

function targetText(t) {
  if (t.kind === "labels") return `labels ${t.labels.join(",")}`;
  if (t.kind === "glob") return `id ${t.pattern}`;
  if (t.kind === "ids") return `${t.client_ids.length} ids`;
  return "all stores";
}

/** A form for a collection's settings, shared by collections and schedules. */
function collectionForm(prefix, onChange) {
  const kind = el("select", { id: `${prefix}-kind` },
    Object.keys(TARGET_HINT).map((k) => el("option", { value: k }, k)));
  const value = el("input", { id: `${prefix}-target`, placeholder: "" });
  const file = el("input", { id: `${prefix}-file`, value: "default" });
  const expiry = el("input", { id: `${prefix}-expiry`, type: "number", min: "1", value: "24" });
  const concurrency = el("input", { id: `${prefix}-concurrency`, type: "number", min: "1", value: "50" });
  kind.addEventListener("change", () => { value.placeholder = TARGET_HINT[kind.value]; value.disabled = kind.value === "all"; onChange(); });
  value.disabled = true;
  value.addEventListener("input", onChange);
  const fields = [
    el("div", {}, el("label", { for: `${prefix}-kind` }, "Target"), kind),
    el("div", {}, el("label", { for: `${prefix}-target` }, "Matching"), value),
    el("div", {}, el("label", { for: `${prefix}-file` }, "Share"), file),
    el("div", {}, el("label", { for: `${prefix}-expiry` }, "Expires in (hours)"), expiry),
    el("div", {}, el("label", { for: `${prefix}-concurrency` }, "At once"), concurrency),
  ];
  const read = () => ({
    target: targetOf(kind.value, value.value),
    file: file.value.trim() || undefined,
    expires_in_secs: Math.round(Number(expiry.value || "24") * 3600),
    max_concurrent: Number(concurrency.value || "50"),
  });
  return { fields, read };
}

/** Collections: create one (with a live preview of the stores it matches), and the list. */
async function collectionsView(root) {
  const preview = el("p", { class: "muted preview", "aria-live": "polite" });
  const list = el("div");
  let timer = null;
  const form = collectionForm("c", () => { clearTimeout(timer); timer = setTimeout(updatePreview, 250); });
  root.append(
    el("h1", {}, "Collections"),
    el("h2", {}, "New collection"),
    el("form", { class: "row", onsubmit: create }, form.fields, el("button", { type: "submit" }, "Create")),
    preview,
    el("h2", {}, "Newest first"), list);

  async function updatePreview() {
    try {
      const p = await api("POST", "/collections/preview", form.read());
      preview.textContent = `Matches ${p.matched} stores now: ${p.connected} connected, ${p.offline} offline.`;
    } catch (err) {
      preview.textContent = err.message;
    }
  }

  async function create(event) {
    event.preventDefault();
    try {
      const c = await api("POST", "/collections", form.read());
      location.hash = `#/collection/${c.collection_id}`;
    } catch (err) {
      showAlert(err.message);
    }
  }

  async function load() {
    const page = await api("GET", "/collections?limit=50");
    list.replaceChildren(table(
      ["Created", "Target", "Share", "State", "Progress", ""],
      page.collections.map((c) => el("tr", { "data-collection": c.collection_id },
        el("td", {}, when(c.created_at)),
        el("td", {}, targetText(c.target)),
        el("td", {}, c.file),
        el("td", {}, badge(c.state)),
        el("td", {}, summaryBar(c)),
        el("td", {}, el("a", { href: `#/collection/${c.collection_id}` }, "Open")))),
      "Collections"));
    sizeBars(list);
  }
  updatePreview();
  every(5000, () => load().catch((err) => showAlert(err.message)));
}

/** One collection: its summary live, its stores filterable, the manifest, cancel. */
async function collectionView(root, id) {
  const head = el("div", { "aria-live": "polite" });
  const rows = el("div");
  const stateFilter = el("select", { id: "row-state" },
    ["", "pending_offline", "queued", "running", "completed", "failed", "cancelled", "not_reached"]
      .map((s) => el("option", { value: s }, s || "any")));
  const codeFilter = el("input", { id: "row-code", placeholder: "FILE_NOT_FOUND" });
  stateFilter.addEventListener("change", loadRows);
  codeFilter.addEventListener("change", loadRows);
  const cancel = el("button", { type: "button", class: "danger", onclick: async () => {
    try { render(await api("DELETE", `/collections/${id}`)); } catch (err) { showAlert(err.message); }
  } }, "Cancel collection");
  root.append(
    el("h1", {}, "Collection ", el("span", { class: "collection-id" }, id)),
    head,
    el("div", { class: "toolbar" },
      el("a", { href: `/collections/${id}/manifest`, download: `manifest-${id}.json`, class: "manifest" }, "Download manifest (JSON)"),
      cancel),
    el("h2", {}, "Stores"),
    el("form", { class: "row", onsubmit: (e) => { e.preventDefault(); loadRows(); } },
      el("div", {}, el("label", { for: "row-state" }, "State"), stateFilter),
      el("div", {}, el("label", { for: "row-code" }, "Error code"), codeFilter),
      el("button", { type: "submit", class: "secondary" }, "Filter")),
    rows);

  let lastCounts = "";
  function render(c) {
    cancel.disabled = c.state === "cancelled";
    const failed = Object.entries(c.failed_by_code || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    head.replaceChildren(
      el("dl", { class: "facts" },
        el("dt", {}, "Target"), el("dd", {}, targetText(c.target)),
        el("dt", {}, "Share"), el("dd", {}, c.file),
        el("dt", {}, "State"), el("dd", {}, badge(c.state), c.settled ? " · settled" : ""),
        el("dt", {}, "Expires"), el("dd", {}, when(c.expires_at)),
        el("dt", {}, "Bytes"), el("dd", {}, `${bytes(c.bytes_done)} of ${bytes(c.bytes_total)}`),
        failed ? [el("dt", {}, "Failed by code"), el("dd", {}, failed)] : null),
      el("div", { class: "collection-summary", "data-completed": c.counts.completed, "data-matched": c.counts.matched }, summaryBar(c)));
    sizeBars(head);
    const counts = JSON.stringify(c.counts);
    if (counts !== lastCounts) { lastCounts = counts; loadRows(); }
  }

  async function loadRows() {
    const params = new URLSearchParams({ limit: "200" });
    if (stateFilter.value) params.set("state", stateFilter.value);
    if (codeFilter.value.trim()) params.set("code", codeFilter.value.trim());
    try {
      const page = await api("GET", `/collections/${id}/uploads?${params}`);
      rows.replaceChildren(table(
        ["Store", "State", "Size", "Error", "File"],
        page.rows.map((r) => el("tr", { "data-store": r.client_id, "data-state": r.state },
          el("td", {}, el("a", { href: `#/store/${encodeURIComponent(r.client_id)}` }, r.client_id)),
          el("td", {}, badge(r.state)),
          el("td", {}, bytes(r.size)),
          el("td", { class: "error" }, r.error ? `${r.error.code}: ${r.error.message}` : ""),
          el("td", {}, r.state === "completed" && r.upload_id
            ? el("a", { href: `/uploads/${r.upload_id}/download` }, "Download") : ""))),
        page.next_after ? "The first 200 stores" : "Stores of this collection"));
    } catch (err) {
      showAlert(err.message);
    }
  }

  render(await api("GET", `/collections/${id}`));
  follow(`/collections/${id}/events`, "summary", `/collections/${id}`, render,
    (c) => c.settled && c.state !== "open");
}

/** Schedules: list, create, delete. */
async function schedulesView(root) {
  const list = el("div");
  const cron = el("input", { id: "s-cron", placeholder: "0 23 * * *", required: true });
  const zone = el("input", { id: "s-zone", value: Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC" });
  const form = collectionForm("s", () => {});
  root.append(
    el("h1", {}, "Schedules"),
    el("h2", {}, "New schedule"),
    el("form", { class: "row", onsubmit: create },
      el("div", {}, el("label", { for: "s-cron" }, "Cron"), cron),
      el("div", {}, el("label", { for: "s-zone" }, "Time zone"), zone),
      form.fields, el("button", { type: "submit" }, "Create")),
    el("h2", {}, "Schedules"), list);

  async function create(event) {
    event.preventDefault();
    try {
      await api("POST", "/schedules", { cron: cron.value.trim(), time_zone: zone.value.trim() || undefined, template: form.read() });
      cron.value = "";
      load();
    } catch (err) {
      showAlert(err.message);
    }
  }

  async function load() {
    const page = await api("GET", "/schedules");
    list.replaceChildren(table(
      ["Cron", "Time zone", "Target", "Share", "Next", "Last", ""],
      page.schedules.map((s) => el("tr", { "data-schedule": s.schedule_id },
        el("td", {}, s.cron), el("td", {}, s.time_zone),
        el("td", {}, targetText(s.template.target)), el("td", {}, s.template.file || "default"),
        el("td", {}, when(s.next_fire_at)), el("td", {}, when(s.last_fired_at)),
        el("td", {}, el("button", { type: "button", class: "danger", onclick: async () => {
          try { await api("DELETE", `/schedules/${s.schedule_id}`); load(); } catch (err) { showAlert(err.message); }
        } }, "Delete")))),
      "Schedules"));
  }
  every(10000, () => load().catch((err) => showAlert(err.message)));
}

// ---- Start -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  try {
    signedIn(await api("GET", "/ui/session"));
  } catch (err) {
    signedOut("");
  }
});
