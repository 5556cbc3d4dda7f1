"""The status page's HTML skeleton, style and script: no build step, no external assets.

The server fills the ``{…}`` fields (already escaped); the script then refreshes every section
from ``/v1/health``, ``/v1/status`` and ``/page/summary`` with the session cookie. It writes
only ``textContent``, never HTML, so nothing an event or a status value holds can run.
"""

from __future__ import annotations

__all__ = ["PAGE", "STYLE", "SCRIPT", "LOGIN_FAILED", "LOGIN_NEEDED"]

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 52em;
       padding: 0 1em; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .6em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
.state { display: inline-block; padding: .2em .7em; border-radius: 1em; font-weight: 600; }
.state-connected { background: #d6f5dd; color: #0b6b26; }
.state-connecting { background: #fff1c2; color: #7a5700; }
.state-disconnected, .state-unknown { background: #fbd9d9; color: #8d1111; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; margin: .8em 0; }
dt { color: #666; } dd { margin: 0; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #e3e3e3; }
th { font-weight: 600; color: #555; }
.empty { color: #888; font-style: italic; }
.error { color: #8d1111; }
footer { margin-top: 2em; color: #888; font-size: .85em; }
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>X-on relay agent</title>
<style nonce="{nonce}">{style}</style>
</head>
<body>
<h1>X-on relay agent</h1>
<p><span id="link-state" class="state state-{link}">{link_label}</span>
<span id="link-since">{since}</span></p>
<p id="link-error" class="error">{problem_cause}</p>
<p id="link-action">{problem_action}</p>
<dl>
<dt>Relay</dt><dd id="relay-url">{relay_url}</dd>
<dt>Agent</dt><dd id="agent-id">{agent_id}</dd>
<dt>Last event</dt><dd id="last-event">{last_event}</dd>
<dt>Events today</dt><dd id="events-today">{events_today}</dd>
<dt>Events kept</dt><dd id="inbox-events">{inbox_events}</dd>
</dl>
<h2>Last events</h2>
<table><thead><tr><th>Time</th><th>Type</th><th>Cursor</th></tr></thead>
<tbody id="recent">{recent_rows}</tbody></table>
<h2>Status values</h2>
<table><thead><tr><th>Item</th><th>Value</th><th>Time</th></tr></thead>
<tbody id="status">{status_rows}</tbody></table>
<h2>Delivery</h2>
<table><thead><tr><th>Consumer or target</th><th>Progress</th></tr></thead>
<tbody id="delivery"><tr><td colspan="2" class="empty">none configured</td></tr></tbody>
</table>
<p id="refresh-error" class="error"></p>
<footer>Updated <span id="updated" data-refresh="server">{updated}</span>.
This page refreshes itself every 5 seconds.</footer>
<script nonce="{nonce}">{script}</script>
</body>
</html>
"""

LOGIN_NEEDED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>X-on relay agent: sign in</title>
<style>
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 40em; padding: 0 1em;
       color: #1d1d1f; background: #fafafa; }
code { background: #eee; padding: .15em .4em; border-radius: .3em; }
</style></head>
<body>
<h1 id="login-needed">X-on relay agent</h1>
<p>This is the status page of the X-on relay agent on this computer. It passes calls and
messages from X-on to the programs on this PC.</p>
<p>To see it, open it with a one-time link: on this computer, open a command prompt and run</p>
<p><code>xon-relay-agent open</code></p>
<p>It opens this page in your browser, signed in for 12 hours. If the command is not found,
ask whoever installed the agent.</p>
</body></html>
"""

LOGIN_FAILED = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Login link expired</title></head>
<body><h1>This login link was already used or has expired.</h1>
<p>Run <code>xon-relay-agent open</code> again for a new one.</p></body></html>
"""

# DELIVERY_KEYS and PROGRESS mirror page.DELIVERY_KEYS and page.PROGRESS: the /v1/health lists
# of consumers and push targets (relay_agent/delivery), and the fields worth a glance.
SCRIPT = r"""
"use strict";
const DELIVERY_KEYS = ["consumers", "forward", "tcp"];
const PROGRESS = ["url", "address", "connected", "lag", "delivered", "failures", "last_status",
                  "last_error"];
const LABELS = {connected: "Connected", connecting: "Connecting", disconnected: "Disconnected"};

function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fill(id, rows, width, empty) {
  const body = document.getElementById(id);
  body.replaceChildren();
  if (!rows.length) {
    cell(body.insertRow(), empty, "empty").colSpan = width;
    return;
  }
  for (const values of rows) {
    const row = body.insertRow();
    for (const v of values) cell(row, v);
  }
}
function progress(item) {
  const shown = PROGRESS.filter((k) => item[k] !== null && item[k] !== undefined)
    .map((k) => k + "=" + item[k]);
  return item.lag === null ? ["not started", ...shown].join(", ") : shown.join(", ");
}
function scalars(obj, skip) {
  return Object.entries(obj)
    .filter(([k, v]) => !skip.includes(k) && v !== null && typeof v !== "object")
    .map(([k, v]) => k + "=" + v).join(", ");
}
function setText(id, text) { document.getElementById(id).textContent = text; }

function showHealth(h) {
  const state = document.getElementById("link-state");
  const link = LABELS[h.link] ? h.link : "unknown";
  state.className = "state state-" + link;
  state.textContent = LABELS[h.link] || String(h.link);
  setText("link-since", h.link === "connected" && h.connected_since
    ? "since " + when(h.connected_since) : "");
  setText("relay-url", h.relay_url || "");
  setText("agent-id", h.agent_id || "");
  if (h.inbox) setText("inbox-events", String(h.inbox.events));
  const rows = [];
  for (const key of DELIVERY_KEYS) {
    if (!Array.isArray(h[key])) continue;
    for (const item of h[key]) {
      if (item && typeof item === "object") rows.push([key + ": " + item.name, progress(item)]);
    }
  }
  fill("delivery", rows, 2, "none configured");
}
function showStatus(s) {
  fill("status", (s.items || []).map((item) => {
    const ids = item.ids && typeof item.ids === "object" ? item.ids : {};
    const named = Object.keys(ids).length ? " (" + scalars(ids, []) + ")" : "";
    const params = item.params && typeof item.params === "object" ? item.params : {};
    return [(item.type || item.key) + named, scalars(params, Object.keys(ids)),
            when(item.received_at)];
  }), 3, "no status values yet");
}
function showSummary(s, h) {
  // The link's problem in words (relay_agent/problems.py), never its technical last_error.
  const problem = h.link !== "connected" && s.problem ? s.problem : {cause: "", action: ""};
  setText("link-error", problem.cause);
  setText("link-action", problem.action);
  // The link's last event since start, else the newest one kept from before.
  const newest = s.recent.length ? s.recent[0].received_at : null;
  setText("last-event", when(h.last_event_at || newest));
  setText("events-today", s.events_today === null ? "?" : String(s.events_today));
  fill("recent", s.recent.map((e) => [when(e.received_at), e.type, e.cursor]), 3,
       "no events yet");
}
async function get(path) {
  const r = await fetch(path, {credentials: "same-origin", cache: "no-store"});
  if (!r.ok) throw Object.assign(new Error(path + ": HTTP " + r.status), {status: r.status});
  return r.json();
}
async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const [health, status, summary] = await Promise.all(
      [get("/v1/health"), get("/v1/status"), get("/page/summary")]);
    showHealth(health);
    showStatus(status);
    showSummary(summary, health);
    updated.textContent = new Date().toLocaleString();
    updated.dataset.refresh = "ok";
    setText("refresh-error", "");
  } catch (err) {
    setText("refresh-error", err.status === 401
      ? "This page's sign-in has ended (it lasts 12 hours, and ends when the local token "
        + "changes). Run xon-relay-agent open for a new one."
      : "The agent is not answering: it may have stopped. Start it again (or its service), "
        + "then run xon-relay-agent open.");
    updated.dataset.refresh = "failed";
  }
}
refresh();
setInterval(refresh, 5000);
"""
