/* The Exports panel (report page) and the export's own page, live.
 *
 * Without this script the page works with plain forms that post and redirect back. With it:
 * - Export CSV, Cancel, Retry and Re-export call the JSON API (X-CSRF-Token header) and the page
 *   is never reloaded;
 * - the list is redrawn from the API's <Export> objects, polled every second while an export is
 *   queued or running (less often otherwise).
 * The markup mirrors templates/_exports.html; the words come from the page's JSON config
 * (services/api/exportviews.py), so both say the same.
 */
"use strict";

(function () {
  const configNode = document.getElementById("exports-config");
  const list = document.getElementById("export-list");
  if (!configNode || !list) return;
  const config = JSON.parse(configNode.textContent);
  const message = document.getElementById("export-message");
  const single = list.classList.contains("single");
  const ACTIVE = new Set(["queued", "running"]);
  const states = new Map(); // export id -> last state seen, to announce changes
  let timer = null;
  let generation = 0; // bumped by every change we make, so older poll answers are dropped

  // -- formatting (as ExportUi in exportviews.py) --------------------------------------------

  const dateFormat = new Intl.DateTimeFormat("sv-SE", {
    timeZone: config.timezone, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", hour12: false,
  });
  const localTime = (iso) => (iso ? dateFormat.format(new Date(iso)) : "");
  const number = (n) => (n === null || n === undefined ? "?" : n.toLocaleString("en-US"));

  function size(bytes) {
    if (bytes === null || bytes === undefined) return "?";
    const units = ["bytes", "kB", "MB", "GB", "TB"];
    let value = bytes;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return unit === 0 ? `${bytes} bytes` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function waited(iso) {
    const seconds = Math.max(0, Math.floor((Date.now() - new Date(iso).getTime()) / 1000));
    if (seconds < 60) return `${seconds} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    return `${Math.floor(seconds / 3600)} h`;
  }

  function summary(f) { // OrderFilters.summary() in shared/filters.py
    const parts = [];
    if (f.status && f.status.length) parts.push("status " + f.status.join(", "));
    if (f.channel && f.channel.length) parts.push("channel " + f.channel.join(", "));
    if (f.placed_from || f.placed_to) {
      parts.push(`placed ${f.placed_from || "…"} to ${f.placed_to || "…"}`);
    }
    if (f.q) parts.push(`matching "${f.q}"`);
    if (f.min_total !== null && f.min_total !== undefined) parts.push(`total ≥ ${f.min_total}`);
    if (f.max_total !== null && f.max_total !== undefined) parts.push(`total ≤ ${f.max_total}`);
    return parts.length ? parts.join("; ") : "all orders";
  }

  const narrower = (e) => !!e.error && !e.error.retryable && config.narrow_codes.includes(e.error.code);

  function hint(e) {
    if (e.error && e.error.retryable) return config.hints.retry;
    if (narrower(e)) return config.hints.narrow;
    return config.hints.support.replace("{id}", e.id);
  }

  function reportUrl(e) {
    const query = new URLSearchParams();
    const f = e.filters;
    for (const name of ["status", "channel", "placed_from", "placed_to", "q", "min_total", "max_total", "sort"]) {
      const value = f[name];
      if (Array.isArray(value)) value.forEach((v) => query.append(name, v));
      else if (value !== null && value !== undefined && !(name === "sort" && value === "-placed_at")) query.append(name, value);
    }
    const text = query.toString();
    return `/accounts/${e.account}/orders` + (text ? `?${text}` : "");
  }

  function options(e) { // ExportUi.options in exportviews.py
    const o = e.options || {};
    const words = [];
    if (o.utf8_bom) words.push(config.option_labels.utf8_bom);
    if (o.compression === "gzip") words.push(config.option_labels.gzip);
    return words.join(", ");
  }

  const deleted = (e) => (e.deleted ? `deleted by ${e.deleted.by} at ${localTime(e.deleted.at)}` : "");

  const key = (e) => `${e.state}|${e.error ? e.error.code : ""}|${e.attempts}|${e.verdict}|${e.download_url ? 1 : 0}`;

  // -- drawing -----------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  function actionForm(e, action, label, style) {
    return el("form", { method: "post", action: `/exports/${e.id}/${action}`, "data-action": action, "data-id": e.id },
      el("input", { type: "hidden", name: "csrf_token", value: config.csrf }),
      el("input", { type: "hidden", name: "next", value: config.next }),
      el("button", { type: "submit", class: style || "secondary", text: label }));
  }

  function progressText(p) {
    return `${number(p.rows_written)} of ${number(p.rows_estimate)} rows` +
      (p.percent === null || p.percent === undefined ? "" : ` · ${p.percent}%`);
  }

  function detail(e) {
    const box = el("div", { class: "export-detail" });
    if (e.state === "queued") {
      box.append(el("span", null, "Waiting for a worker · ", el("span", { "data-field": "waited", text: waited(e.created_at) })));
      if (e.error) box.append(" ", el("span", { class: "muted", text: `The last attempt failed (${e.error.message}); it will be retried.` }));
    } else if (e.state === "running") {
      const p = e.progress;
      box.append(
        el("progress", { max: "100", value: p.percent === null ? null : p.percent, "aria-label": "Export progress", text: `${p.percent || 0}%` }),
        el("span", { "data-field": "progress", text: progressText(p) }));
    } else if (e.state === "ready" && e.download_url) {
      box.append(
        el("a", { class: "button", "data-field": "download", href: e.download_url, text: "Download CSV" }),
        el("span", { text: `${number(e.row_count)} rows · ${size(e.file ? e.file.size_bytes : null)} · available until ${localTime(e.expires_at)}` }));
    } else if (e.state === "ready") {
      box.append(el("span", { text: "The file has expired and is being deleted; you can export again in a moment." }));
    } else if (e.state === "failed") {
      box.append(
        el("span", { class: "reason", role: "note", text: e.error ? e.error.message : "The export failed." }),
        el("span", { class: "hint", text: hint(e) }));
      if (narrower(e)) box.append(" ", el("a", { href: reportUrl(e), text: "Change the filters" }));
    } else if (e.state === "canceled") {
      box.append(el("span", { text: `Canceled ${localTime(e.finished_at)}.` }));
    } else if (e.state === "expired" && e.deleted) {
      box.append(el("span", { "data-field": "deleted", text: `The file was ${deleted(e)}. Export again for a fresh file.` }));
    } else if (e.state === "expired") {
      box.append(el("span", { text: "The file was deleted when it expired. Export again for a fresh file." }));
    }
    return box;
  }

  function actions(e) {
    const box = el("div", { class: "export-actions" });
    if (ACTIVE.has(e.state)) box.append(actionForm(e, "cancel", "Cancel"));
    else if (e.state === "ready" && e.download_url) {
      box.append(el("a", { class: "button secondary danger", href: `/exports/${e.id}/delete-file`, "data-action": "delete_file", "data-id": e.id, text: "Delete file" }));
    }
    else if (config.enabled && e.state === "failed" && e.error && e.error.retryable) box.append(actionForm(e, "retry", "Retry", "primary"));
    else if (config.enabled && e.state === "canceled") box.append(actionForm(e, "retry", "Export again"));
    else if (config.enabled && e.state === "expired") box.append(actionForm(e, "retry", "Re-export", "primary"));
    return box;
  }

  function render(e) {
    return el("li", { class: "export", id: `export-${e.id}`, "data-id": e.id, "data-state": e.state, "data-key": key(e) },
      el("div", { class: "export-head" },
        el("span", { class: `badge badge-${e.state}`, text: config.labels[e.state] }),
        el("span", { class: `verdict verdict-${e.verdict}`, text: config.verdicts[e.verdict] }),
        el("a", { class: "export-title", href: `/exports/${e.id}`, text: summary(e.filters) }),
        options(e) ? " " : null,
        options(e) ? el("span", { class: "muted export-options", "data-field": "options", text: options(e) }) : null,
        " ",
        el("span", { class: "muted export-when", text: `requested ${localTime(e.created_at)}` })),
      detail(e),
      actions(e));
  }

  /** Bring an item up to date without redrawing it when only numbers changed. */
  function refresh(li, e) {
    const waitedNode = li.querySelector('[data-field="waited"]');
    if (waitedNode) waitedNode.textContent = waited(e.created_at);
    const bar = li.querySelector("progress");
    if (bar && e.progress.percent !== null) bar.value = e.progress.percent;
    const text = li.querySelector('[data-field="progress"]');
    if (text) text.textContent = progressText(e.progress);
    const link = li.querySelector('[data-field="download"]');
    if (link && e.download_url) link.href = e.download_url; // links are signed per request
  }

  function place(e, { first = false } = {}) {
    const old = document.getElementById(`export-${e.id}`);
    let li = old;
    if (!old || old.dataset.key !== key(e)) {
      li = render(e);
      const focused = old && old.contains(document.activeElement);
      if (old) old.replaceWith(li);
      else if (first) list.prepend(li);
      else list.append(li);
      if (focused) (li.querySelector("button, a.button") || li.querySelector("a")).focus();
    } else {
      refresh(li, e);
    }
    announce(e);
    const empty = list.querySelector("li.empty");
    if (empty) empty.remove();
    return li;
  }

  /** Draw the API's list: newest first, at most panel_size items. */
  function apply(exports) {
    const shown = single ? exports : exports.slice(0, config.panel_size);
    const ids = new Set(shown.map((e) => e.id));
    for (const li of Array.from(list.querySelectorAll("li.export"))) {
      if (!ids.has(li.dataset.id)) li.remove();
    }
    let previous = null;
    for (const e of shown) {
      const li = place(e);
      const expected = previous ? previous.nextElementSibling : list.firstElementChild;
      if (expected !== li) (previous ? previous.after(li) : list.prepend(li));
      previous = li;
    }
  }

  function trim() {
    const items = list.querySelectorAll("li.export");
    for (let i = config.panel_size; i < items.length; i += 1) items[i].remove();
  }

  // -- telling the user ----------------------------------------------------------------------

  function say(text, error) {
    if (!message) return;
    message.hidden = !text;
    message.textContent = text || "";
    message.className = "flash" + (text ? (error ? " flash-error" : " flash-info") : "");
    message.setAttribute("role", error ? "alert" : "status");
  }

  function announce(e) {
    const before = states.get(e.id);
    states.set(e.id, e.state);
    if (before === undefined || before === e.state) return;
    let text = `Export ${config.labels[e.state].toLowerCase()}: ${summary(e.filters)}.`;
    if (e.state === "ready") text = `Export ready: ${number(e.row_count)} rows (${summary(e.filters)}). Download it below.`;
    if (e.state === "failed" && e.error) text = `Export failed: ${e.error.message}`;
    say(text, e.state === "failed");
  }

  // -- talking to the API ----------------------------------------------------------------------

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": config.csrf },
      body: JSON.stringify(body || {}),
    });
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (ignored) { /* not JSON */ }
    return `The server answered ${response.status}.`;
  }

  function anyActive() {
    // Active work, or a file past its expiry that housekeeping is about to mark expired.
    return Array.from(list.querySelectorAll("li.export")).some(
      (li) => ACTIVE.has(li.dataset.state) || (li.dataset.state === "ready" && li.dataset.key.endsWith("|0")));
  }

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms !== undefined ? ms : (anyActive() ? config.active_poll_ms : config.idle_poll_ms));
  }

  async function poll() {
    if (document.hidden) return; // resumed by visibilitychange
    const started = generation;
    try {
      const response = await fetch(config.poll_url, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store" });
      if (response.status === 401) { say(config.messages.session_ended, true); return; }
      if (response.ok && started === generation) {
        const body = await response.json();
        apply(body.exports || [body.export]);
      }
    } catch (ignored) {
      say(config.messages.offline, true);
    }
    schedule();
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });

  // The Export CSV button: the APPLIED filters (from the page's config), never the inputs.
  const exportForm = document.getElementById("export-form");
  if (exportForm && config.create_url) {
    exportForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = exportForm.querySelector('button[type="submit"]');
      button.disabled = true;
      say(config.messages.requesting);
      try {
        const options = {}; // the two checkboxes, as the plain form sends them
        const bom = exportForm.querySelector('input[name="utf8_bom"]');
        const gzip = exportForm.querySelector('input[name="compression"]');
        if (bom && bom.checked) options.utf8_bom = true;
        if (gzip && gzip.checked) options.compression = gzip.value;
        const response = await post(config.create_url, { filters: config.filters, options });
        if (response.ok) {
          const body = await response.json();
          generation += 1;
          states.set(body.export.id, body.export.state);
          place(body.export, { first: true });
          trim();
          if (body.export.state === "failed" && body.export.error) say(`Export failed: ${body.export.error.message}`, true);
          else say(config.requested[String(response.status)]);
        } else {
          say(await errorText(response), true);
        }
        schedule(config.active_poll_ms);
      } catch (ignored) {
        exportForm.submit(); // the network failed us: the plain form still works
      } finally {
        button.disabled = false;
      }
    });
  }

  // Cancel, Retry, Re-export: forms inside the list.
  list.addEventListener("submit", async (event) => {
    const form = event.target.closest("form[data-action]");
    if (!form) return;
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    say(config.messages.working);
    try {
      const response = await post(`/api/v1/order-exports/${form.dataset.id}/${form.dataset.action}`);
      if (response.ok) {
        const body = await response.json();
        generation += 1;
        states.set(body.export.id, body.export.state);
        place(body.export);
        say(form.dataset.action === "cancel" ? config.messages.canceled : config.messages.retried);
      } else {
        button.disabled = false;
        say(await errorText(response), true);
      }
      schedule(config.active_poll_ms);
    } catch (ignored) {
      form.submit();
    }
  });

  // Delete file: a link to the confirmation page without this script; with it, the browser's
  // own confirmation, then DELETE through the API.
  list.addEventListener("click", async (event) => {
    const link = event.target.closest('a[data-action="delete_file"]');
    if (!link) return;
    event.preventDefault();
    if (!window.confirm(config.messages.confirm_delete)) return;
    say(config.messages.working);
    try {
      const response = await fetch(`/api/v1/order-exports/${link.dataset.id}/file`, {
        method: "DELETE",
        credentials: "same-origin",
        headers: { Accept: "application/json", "X-CSRF-Token": config.csrf },
      });
      if (response.ok) {
        const body = await response.json();
        generation += 1;
        states.set(body.export.id, body.export.state);
        place(body.export);
        say(config.messages.deleted);
      } else {
        say(await errorText(response), true);
      }
      schedule(config.active_poll_ms);
    } catch (ignored) {
      window.location.href = link.href; // the network failed us: the confirmation page works
    }
  });

  // Filters edited but not applied: say what Export CSV will use.
  const filterForm = document.querySelector("form.filters");
  const unapplied = document.getElementById("unapplied-note");
  if (filterForm && unapplied) {
    const snapshot = () => new URLSearchParams(new FormData(filterForm)).toString();
    const initial = snapshot();
    const check = () => { unapplied.hidden = snapshot() === initial; };
    filterForm.addEventListener("input", check);
    filterForm.addEventListener("change", check);
  }

  for (const li of list.querySelectorAll("li.export")) states.set(li.dataset.id, li.dataset.state);
  schedule(anyActive() ? config.active_poll_ms : config.idle_poll_ms);
})();
