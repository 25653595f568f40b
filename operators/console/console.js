// Shared by the console pages: the API base, fetch helpers and formatting.
const BASE = location.pathname.slice(0, location.pathname.indexOf("/voxflow/") + 8);
const STATE_COLOURS = ["#cbd5e0", "#3182ce", "#38a169", "#e53e3e", "#f7fafc", "#2d3748"];  // pending leased done dead unpublished skipped

async function api(path, options) {
  const r = await fetch(BASE + "/api" + path, Object.assign({credentials: "same-origin"}, options || {}));
  const text = await r.text();
  let body; try { body = JSON.parse(text); } catch (e) { body = {detail: text}; }
  if (!r.ok) { const err = new Error(body.detail || r.statusText); err.status = r.status; throw err; }
  return body;
}
// Replace an element's content only when it changed: a page that refreshes itself must not
// close the traceback a user opened, move the focus or detach the row being clicked.
function render(el, html) {
  if (typeof el === "string") el = document.querySelector(el);
  if (el.voxflowHTML !== html) { el.innerHTML = html; el.voxflowHTML = html; }
}
function esc(s) { return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c])); }
function bar(done, dead, total) {
  const t = Math.max(total, 1);
  return `<span class="bar"><span class="done" style="width:${100 * done / t}%"></span><span class="dead" style="width:${100 * dead / t}%"></span></span>`;
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s); if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
}
function rate(r) { return r === null || r === undefined ? "–" : (r >= 10 ? r.toFixed(0) : r.toFixed(2)) + " tasks/s"; }
function usd(x) { return x === null || x === undefined ? "–" : "$" + (x >= 100 ? x.toFixed(0) : x.toPrecision(3)); }
function runHref(run, queue) { return BASE + "/run/" + encodeURIComponent(run) + "?queue=" + encodeURIComponent(queue); }
