/* The Exports panel (report page) and the export's own page, live.
 *
 * Without this script the page works with plain forms that post and redirect back. With it:
 * - Export CSV, Cancel, Retry and Re-export call the JSON API (X-CSRF-Token header) and the page
 *   is never reloaded;
 * - the items are polled as an HTML fragment drawn by the server (templates/_exports.html, the
 *   only place that draws them), every second while an export is queued or running (less often
 *   otherwise); an item whose data-key changed is swapped, the others only get their numbers.
 */
"use strict";

(function () {
  const configNode = document.getElementById("exports-config");
  const list = document.getElementById("export-list");
  if (!configNode || !list) return;
  const config = JSON.parse(configNode.textContent);
  const message = document.getElementById("export-message");
  const ACTIVE = new Set(["queued", "running"]);
  const states = new Map(); // export id -> last state seen, to announce changes
  let timer = null;
  let generation = 0; // bumped by every change we make, so older poll answers are dropped

  // -- swapping the server's items in --------------------------------------------------------

  /** Bring an item up to date without redrawing it when only numbers changed. */
  function refresh(li, fresh) {
    for (const field of ["waited", "progress"]) {
      const node = li.querySelector(`[data-field="${field}"]`);
      const value = fresh.querySelector(`[data-field="${field}"]`);
      if (node && value) node.textContent = value.textContent;
    }
    const bar = li.querySelector("progress");
    const freshBar = fresh.querySelector("progress");
    if (bar && freshBar && freshBar.hasAttribute("value")) bar.value = freshBar.value;
    const link = li.querySelector('[data-field="download"]');
    const freshLink = fresh.querySelector('[data-field="download"]');
    if (link && freshLink) link.href = freshLink.href; // links are signed per request
  }

  function place(fresh) {
    const old = document.getElementById(fresh.id);
    let li = old;
    if (!old || old.dataset.key !== fresh.dataset.key) {
      li = fresh;
      const focused = old && old.contains(document.activeElement);
      if (old) old.replaceWith(li);
      else list.prepend(li);
      if (focused) (li.querySelector("button, a.button") || li.querySelector("a")).focus();
    } else {
      refresh(li, fresh);
    }
    announce(li);
    return li;
  }

  /** Show the server's items, in its order (newest first). */
  function apply(html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    const items = Array.from(template.content.querySelectorAll("li.export"));
    const ids = new Set(items.map((li) => li.id));
    for (const li of Array.from(list.querySelectorAll("li.export"))) {
      if (!ids.has(li.id)) li.remove();
    }
    let previous = null;
    for (const fresh of items) {
      const li = place(fresh);
      const expected = previous ? previous.nextElementSibling : list.firstElementChild;
      if (expected !== li) (previous ? previous.after(li) : list.prepend(li));
      previous = li;
    }
    const empty = list.querySelector("li.empty");
    if (empty && items.length) empty.remove();
  }

  // -- telling the user ----------------------------------------------------------------------

  function say(text, error) {
    if (!message) return;
    message.hidden = !text;
    message.textContent = text || "";
    message.className = "flash" + (text ? (error ? " flash-error" : " flash-info") : "");
    message.setAttribute("role", error ? "alert" : "status");
  }

  function announce(li) {
    const before = states.get(li.dataset.id);
    states.set(li.dataset.id, li.dataset.state);
    if (before === undefined || before === li.dataset.state) return;
    say(li.dataset.announce, li.dataset.state === "failed");
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

  // Fetch the panel the server draws and swap what changed; false when the session ended.
  async function load() {
    const started = generation;
    const response = await fetch(config.poll_url, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401) { say(config.messages.session_ended, true); return false; }
    if (response.ok && started === generation) apply(await response.text());
    return true;
  }

  async function poll() {
    if (document.hidden) return; // resumed by visibilitychange
    try {
      if (!(await load())) return;
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
          states.set(body.export.id, body.export.state); // said below, not again when it shows
          try {
            await load(); // the server draws the new item: in the list before it is announced
          } catch (ignored) {
            // offline for a moment: the next poll draws it
          }
          if (body.export.state === "failed" && body.export.error) say(`Export failed: ${body.export.error.message}`, true);
          else say(config.requested[String(response.status)]);
          schedule();
        } else {
          say(await errorText(response), true);
          schedule(config.active_poll_ms);
        }
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
        say(form.dataset.action === "cancel" ? config.messages.canceled : config.messages.retried);
        schedule(0);
      } else {
        button.disabled = false;
        say(await errorText(response), true);
        schedule(config.active_poll_ms);
      }
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
        say(config.messages.deleted);
        schedule(0);
      } else {
        say(await errorText(response), true);
        schedule(config.active_poll_ms);
      }
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
