// The review page: a grid of the queue, many images decided at once, keyboard review, undo.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { items: [], focus: 0, selected: new Set(), anchor: null, offset: 0, total: 0, undo: [] };

$("reviewer").value = localStorage.getItem("synth-reviewer") || "";
$("reviewer").addEventListener("change", () => localStorage.setItem("synth-reviewer", $("reviewer").value.trim()));

function badge(item) {
  const d = item.decision;
  if (!d) return el("span", { class: `badge ${item.accepted ? "kept" : "dropped"}` }, item.accepted ? "filter: kept" : `filter: ${item.reason || "dropped"}`);
  if (d.decision === "relabel") return el("span", { class: "badge relabel" }, `→ ${d.class}`);
  return el("span", { class: `badge ${d.decision}` }, d.decision === "accept" ? "accepted" : "rejected");
}

function render() {
  const grid = $("queue");
  grid.replaceChildren(...state.items.map((item, i) => {
    const tile = el("figure", { class: "tile", dataset: { id: item.id, index: i } },
      item.thumbnail ? el("img", { src: item.thumbnail, alt: item.id }) : el("div", { class: "missing" }, "no image"),
      el("figcaption", {}, el("span", { class: "id" }, item.id), el("span", { class: "num" }, `${item.class_name} · sim ${item.similarity.toFixed(3)} · #${item.rank}`), badge(item)));
    tile.classList.toggle("focused", i === state.focus);
    tile.classList.toggle("selected", state.selected.has(item.id));
    tile.addEventListener("click", (event) => clickTile(i, event));
    return tile;
  }));
  $("count").textContent = state.total ? `${state.offset + 1}–${state.offset + state.items.length} of ${state.total}` : "nothing to review";
  $("selection").textContent = state.selected.size ? `${state.selected.size} selected` : "";
}

function clickTile(i, event) {
  const id = state.items[i].id;
  if (event.shiftKey && state.anchor !== null) {
    const [a, b] = [Math.min(state.anchor, i), Math.max(state.anchor, i)];
    for (let k = a; k <= b; k++) state.selected.add(state.items[k].id);
  } else if (state.selected.has(id)) state.selected.delete(id);
  else state.selected.add(id);
  state.anchor = i;
  state.focus = i;
  render();
}

async function load() {
  const q = new URLSearchParams({ order: $("order").value, class: $("cls").value, offset: state.offset, limit: PAGE,
                                  undecided: $("undecided").checked ? "1" : "0" });
  try {
    const r = await api(`/api/runs/${RUN}/review/queue?${q}`);
    state.items = r.items; state.total = r.total;
    state.focus = Math.min(state.focus, Math.max(0, r.items.length - 1));
    state.selected.clear(); state.anchor = null;
    render();
  } catch (e) { toast(e.message, "error"); }
}

function reviewer() {
  const name = $("reviewer").value.trim();
  if (!name) { $("reviewer").focus(); toast("Give your name first: every decision is logged with its reviewer.", "error"); }
  return name;
}

// Decide on the selection (all at once, one log entry) or on the focused image, then advance.
async function decide(decision, cls) {
  const name = reviewer();
  if (!name || !state.items.length) return;
  const many = state.selected.size > 0;
  const ids = many ? [...state.selected] : [state.items[state.focus].id];
  const decisions = ids.map((id) => decision === "relabel" ? { id, decision, class: cls } : { id, decision });
  try {
    const r = await api(`/api/runs/${RUN}/review/decisions`, { method: "POST", json: { reviewer: name, decisions } });
    state.undo.push(r.submission);
    for (const item of state.items) {
      if (ids.includes(item.id)) item.decision = { decision, class: cls || null, reviewer: name };
    }
    if (many) state.selected.clear();
    else state.focus = Math.min(state.focus + 1, state.items.length - 1);
    render();
    toast(`${decision === "relabel" ? "relabelled to " + cls : decision + "ed"}: ${ids.length} image${ids.length > 1 ? "s" : ""}`, "ok");
  } catch (e) { toast(e.message, "error"); }
}

async function undo() {
  const name = reviewer();
  const submission = state.undo.pop();
  if (!name || !submission) { if (!submission) toast("Nothing to undo on this page.", "info"); return; }
  try {
    const r = await api(`/api/runs/${RUN}/review/undo`, { method: "POST", json: { reviewer: name, submission } });
    toast(`undone: ${r.restored} image${r.restored === 1 ? "" : "s"} restored${r.kept.length ? `, ${r.kept.length} decided since by someone else` : ""}`, "ok");
    await load();
  } catch (e) { state.undo.push(submission); toast(e.message, "error"); }
}

function columns() {
  const tiles = $("queue").children;
  if (tiles.length < 2) return 1;
  const top = tiles[0].offsetTop;
  let n = 0;
  while (n < tiles.length && tiles[n].offsetTop === top) n++;
  return Math.max(1, n);
}

document.addEventListener("keydown", (event) => {
  if (["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName)) return;
  const n = state.items.length;
  if (!n) return;
  const move = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -columns(), ArrowDown: columns() }[event.key];
  if (move !== undefined) {
    state.focus = Math.min(n - 1, Math.max(0, state.focus + move));
    if (event.shiftKey) state.selected.add(state.items[state.focus].id);
    render();
    $("queue").children[state.focus].scrollIntoView({ block: "nearest" });
  } else if (event.key === " ") {
    const id = state.items[state.focus].id;
    if (state.selected.has(id)) state.selected.delete(id); else state.selected.add(id);
    render();
  } else if ((event.ctrlKey || event.metaKey) && event.key === "a") {
    for (const item of state.items) state.selected.add(item.id);
    render();
  } else if ((event.ctrlKey || event.metaKey) && event.key === "z") {
    undo();
  } else if (event.ctrlKey || event.metaKey || event.altKey) {
    return;
  } else if (event.key === "y" || event.key === "Enter") {
    decide("accept");
  } else if (event.key === "n" || event.key === "x") {
    decide("reject");
  } else if (event.key === "u") {
    undo();
  } else if (/^[1-9]$/.test(event.key) && Number(event.key) <= CLASSES.length) {
    decide("relabel", CLASSES[Number(event.key) - 1]);
  } else if (event.key === "Escape") {
    state.selected.clear(); render();
  } else {
    return;
  }
  event.preventDefault();
});

$("accept").addEventListener("click", () => decide("accept"));
$("reject").addEventListener("click", () => decide("reject"));
$("relabel").addEventListener("click", () => decide("relabel", $("relabel-to").value));
$("undo").addEventListener("click", undo);
for (const id of ["order", "cls", "undecided"]) $(id).addEventListener("change", () => { state.offset = 0; load(); });
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); load(); });
$("next").addEventListener("click", () => { if (state.offset + PAGE < state.total) { state.offset += PAGE; load(); } });
load();
