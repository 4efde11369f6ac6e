// rlhfkit label: keyboard shortcuts, drag-to-rank, rating keys, double-submit guard. Plain JS, no build
// step, no network beyond this server. Every page works without it (plain forms); this only adds keys.
"use strict";
(function () {
  const form = document.getElementById("answer");
  const started = Date.now();

  // progress bar width (set here: the CSP allows no inline styles)
  document.querySelectorAll(".progress .bar").forEach(function (bar) {
    const total = Number(bar.dataset.total) || 0;
    bar.style.width = total ? (100 * Number(bar.dataset.done) / total).toFixed(1) + "%" : "0%";
  });

  let sent = false;
  if (form) {
    form.addEventListener("submit", function (ev) {
      if (sent) { ev.preventDefault(); return; }  // one submission per page: a double press stores nothing twice
      sent = true;
      const d = form.querySelector("input[name=duration_ms]");
      if (d) d.value = String(Date.now() - started);
    });
  }

  function typing(el) {
    return el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "radio") || el.isContentEditable);
  }

  // ranking by keys (press answers best to worst) and by drag; both fill the rank_<index> selects
  const list = document.getElementById("ranklist");
  let order = [];
  function syncSelects() {
    if (!list) return;
    const items = Array.from(list.querySelectorAll("li.candidate"));
    items.forEach(function (li) {
      const at = order.indexOf(li);
      li.querySelector("select").value = at >= 0 ? String(at + 1) : "";
      li.classList.toggle("ranked", at >= 0);
    });
  }
  if (list) {
    let dragged = null;
    list.addEventListener("dragstart", function (ev) { dragged = ev.target.closest("li"); });
    list.addEventListener("dragover", function (ev) { ev.preventDefault(); });
    list.addEventListener("drop", function (ev) {
      ev.preventDefault();
      const target = ev.target.closest("li");
      if (!dragged || !target || dragged === target) return;
      const items = Array.from(list.children);
      if (items.indexOf(dragged) < items.indexOf(target)) target.after(dragged); else target.before(dragged);
      order = Array.from(list.children);  // the visual order is the ranking
      syncSelects();
    });
    list.querySelectorAll("select").forEach(function (sel) {
      sel.addEventListener("change", function () { order = []; });  // chosen by hand: keys start over
    });
  }

  // rating rows: a number key scores the highlighted row, then the next row lights up
  const rows = Array.from(document.querySelectorAll("[data-rate-row]"));
  let current = 0;
  function highlight() {
    rows.forEach(function (r, i) { r.classList.toggle("current", i === current); });
  }
  rows.forEach(function (r, i) { r.addEventListener("click", function () { current = i; highlight(); }); });
  highlight();

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (typing(ev.target)) {
      if (ev.key === "Escape") ev.target.blur();
      return;
    }
    if (ev.repeat) { ev.preventDefault(); return; }  // a key held down would answer the next item too
    const key = ev.key;
    if (list && /^[1-9]$/.test(key)) {
      const li = list.querySelector('li[data-position="' + (Number(key) - 1) + '"]');
      if (li && order.indexOf(li) < 0) { order.push(li); syncSelects(); }
      ev.preventDefault();
      return;
    }
    if (list && key === "Backspace") { order.pop(); syncSelects(); ev.preventDefault(); return; }
    if (rows.length && /^[0-9]$/.test(key)) {
      const radio = rows[current] && rows[current].querySelector('input[value="' + key + '"]');
      if (radio) { radio.checked = true; current = Math.min(current + 1, rows.length - 1); highlight(); }
      ev.preventDefault();
      return;
    }
    const focus = document.querySelector('[data-focus-key="' + key + '"]');
    if (focus) {
      const details = focus.closest("details");
      if (details) details.open = true;
      focus.focus();
      ev.preventDefault();
      return;
    }
    const el = document.querySelector('[data-key="' + key + '"]');
    if (!el || el.disabled) return;
    ev.preventDefault();
    if (el.tagName === "INPUT" && el.type === "radio") { el.checked = !el.checked; return; }
    if (el.tagName === "A") { el.click(); return; }
    if (el.form && el.type === "submit") { el.form.requestSubmit(el); return; }
    el.click();
  });
})();
