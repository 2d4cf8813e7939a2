// The candidate gallery: every early candidate's x0 preview with its score and seed, kept ones
// marked, pruned ones greyed; each seed can be copied or sent to a KSampler.
// The early samplers send `probe_select_previews` (thumbnail files in ComfyUI's temp folder, by run
// id); the selection nodes send `probe_select_gallery` (seeds, scores, kept indices, same run id).
// ProbeSelectSampler with a schedule of several stages also sends each stage's seeds, scores and kept
// indices, and the stage that pruned each candidate: its tiles show every stage's score and the fate.
// Public frontend API only: app.registerExtension, api (apiURL, executed via onExecuted), addDOMWidget.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { fitNode, widgetMargin } from "./probe_select_scores.js";

const PREVIEW_NODES = new Set(["ProbeSelectEarlySampler", "ProbeSelectEarlySamplerCustom", "ProbeSelectSampler"]);
const GALLERY_NODES = new Set(["ProbeSelectTopK", "ProbeSelectSampler", "ProbeSelectPickCandidates"]);
const WIDGET_NAME = "probe_select_gallery";
const TILE_WIDTH = 104;
const TILE_HEIGHT = 146;
const GAP = 4;
const HEADER_HEIGHT = 30;
const LINE_HEIGHT = 12;
const MAX_RUNS_KEPT = 16;
const SEED_WIDGETS = ["seed", "noise_seed"];

// run id -> {seeds, images}: the thumbnails of recent early runs (the selection node shows them).
const previewsByRun = new Map();

export function rememberPreviews(previews) {
  if (!previews?.run_id) return;
  previewsByRun.delete(previews.run_id);
  previewsByRun.set(previews.run_id, previews);
  while (previewsByRun.size > MAX_RUNS_KEPT) previewsByRun.delete(previewsByRun.keys().next().value);
}

function imageUrl(record) {
  const params = new URLSearchParams({ filename: record.filename, subfolder: record.subfolder ?? "",
                                       type: record.type ?? "temp" });
  return api.apiURL(`/view?${params}`);
}

function toast(severity, summary, detail) {
  // The toast service is on app.extensionManager in current frontends; log where there is none.
  const service = app.extensionManager?.toast;
  if (service?.add) service.add({ severity, summary, detail, life: 3000 });
  else console.info(`[Probe-Select] ${summary}: ${detail}`);
}

export async function copySeed(seed) {
  const text = String(seed);
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // No clipboard permission (e.g. plain http on another host): the old way, through a selection.
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  toast("info", "Seed copied", text);
}

function seedTargets() {
  const hasSeed = (n) => n.widgets?.some((w) => SEED_WIDGETS.includes(w.name));
  const isSampler = (n) => /KSampler/.test(n.comfyClass ?? n.type ?? "") && hasSeed(n);
  const selected = Object.values(app.canvas?.selected_nodes ?? {}).filter(hasSeed);
  if (selected.length) return selected;
  return (app.graph?._nodes ?? app.graph?.nodes ?? []).filter(isSampler).slice(0, 1);
}

// Set the seed of the selected node(s) with a seed widget, else of the first KSampler, and fix it
// (control "fixed") so that the next run uses exactly this seed.
export function sendSeedToSampler(seed) {
  const targets = seedTargets();
  if (!targets.length) {
    toast("warn", "No KSampler", "add a KSampler (or select a node with a seed) first");
    return [];
  }
  for (const node of targets) {
    const index = node.widgets.findIndex((w) => SEED_WIDGETS.includes(w.name));
    const widget = node.widgets[index];
    widget.value = Number(seed);
    widget.callback?.(widget.value, app.canvas, node);
    const control = node.widgets[index + 1];
    if (control && control.name === "control_after_generate") control.value = "fixed";
    node.setDirtyCanvas?.(true, true);
  }
  toast("info", "Seed set", `${seed} on ${targets.map((n) => n.title).join(", ")}`);
  return targets;
}

function button(label, title, onClick) {
  const element = Object.assign(document.createElement("button"), { textContent: label, title });
  element.className = "probe-select-button";
  Object.assign(element.style, {
    font: "10px sans-serif", padding: "1px 3px", margin: "0", cursor: "pointer", borderRadius: "3px",
    whiteSpace: "nowrap",
    border: "1px solid var(--border-color, #555)", background: "var(--comfy-menu-bg, #333)",
    color: "var(--input-text, #ddd)",
  });
  element.addEventListener("click", (event) => { event.stopPropagation(); onClick(event); });
  element.addEventListener("pointerdown", (event) => event.stopPropagation());
  return element;
}

function tileColumns(node) {
  return Math.max(1, Math.floor((node.size[0] - 20 + GAP) / (TILE_WIDTH + GAP)));
}

// A run pruned in stages: the payload's `stages` (two or more) and `pruned_at`; one stage shows as before.
function isStaged(state) {
  return !state.picking && Array.isArray(state.stages) && state.stages.length > 1;
}

function tileHeight(state) {
  return TILE_HEIGHT + (isStaged(state) ? (state.stages.length - 1) * LINE_HEIGHT : 0);
}

// [{number, score}] for each stage that scored candidate `index` (of the first stage).
function stageScores(state, index) {
  const seed = state.seeds[index];
  return state.stages.filter((stage) => stage.seeds.includes(seed))
    .map((stage) => ({ number: stage.number, score: stage.scores?.[stage.seeds.indexOf(seed)] }));
}

// Finished first, then the later a candidate was pruned the earlier it comes; by its last score within.
function stagedOrder(state) {
  const reached = (i) => state.pruned_at?.[i] ?? state.stages.length + 1;
  const lastScore = (i) => stageScores(state, i).at(-1)?.score ?? -Infinity;
  return state.seeds.map((_, i) => i).sort((a, b) => reached(b) - reached(a) || lastScore(b) - lastScore(a) || a - b);
}

// One line per stage: where it scored and how many it kept.
function stagesHeader(state) {
  const header = document.createElement("div");
  header.className = "probe-select-stages";
  Object.assign(header.style, { whiteSpace: "pre", lineHeight: `${LINE_HEIGHT}px`, marginBottom: "4px" });
  header.textContent = state.stages.map((stage) =>
    `Stage ${stage.number} at step ${stage.step} of ${stage.steps} (t ${Number(stage.t).toFixed(2)}): `
    + `${stage.seeds.length} → ${stage.kept.length} kept`).join("\n");
  return header;
}

// The state shown: {run_id, seeds, scores, evaluator, kept, mode} (+ stages, pruned_at)
// (+ picking: {picked:Set, onToggle}) (+ header: an element above the tiles, headerHeight)
function galleryWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) return widget;
  const element = document.createElement("div");
  element.className = "probe-select-gallery";
  Object.assign(element.style, { boxSizing: "border-box", padding: "2px", overflow: "hidden",
                                 font: "10px sans-serif", color: "var(--input-text, #ddd)" });
  let state = null;
  widget = node.addDOMWidget(WIDGET_NAME, "probe_select_gallery", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => state,
    setValue: (value) => { state = value; },
    getMinHeight: () => {
      const count = state?.seeds?.length ?? 0;
      if (!count) return 0;
      const rows = Math.ceil(count / tileColumns(node));
      const header = state.header ? (state.headerHeight ?? HEADER_HEIGHT) : 0;
      return header + rows * (tileHeight(state) + GAP) + 4 + widgetMargin(widget);
    },
  });
  widget.serialize = false;
  widget.element = element;
  return widget;
}

function formatScore(score) {
  return score === null || score === undefined ? "—" : Number(score).toFixed(4);
}

function renderTile(state, index, rank, images) {
  const seed = state.seeds[index];
  const picking = !!state.picking;
  const picked = picking && state.picking.picked.has(index);
  const marked = !picking && state.mode !== "early";     // the early sampler has not selected yet
  const kept = marked && state.kept?.includes(index);
  const pruned = marked && !kept;
  const staged = isStaged(state);
  const prunedAt = staged && pruned ? state.pruned_at?.[index] : null;
  const tile = document.createElement("div");
  tile.className = "probe-select-tile";
  tile.dataset.index = String(index);
  tile.dataset.seed = String(seed);
  tile.dataset.state = picking ? (picked ? "picked" : "open") : (kept ? "kept" : (pruned ? "pruned" : "early"));
  if (prunedAt) tile.dataset.prunedAt = String(prunedAt);
  const outline = picked ? "2px solid #4aa3ff" : (kept ? "2px solid #3fbf5f" : "1px solid #555");
  Object.assign(tile.style, {
    width: `${TILE_WIDTH}px`, height: `${tileHeight(state)}px`, boxSizing: "border-box", border: outline,
    borderRadius: "4px", padding: "2px", display: "flex", flexDirection: "column", gap: "1px",
    position: "relative", background: "var(--comfy-input-bg, #222)", cursor: picking ? "pointer" : "default",
    opacity: pruned ? "0.4" : "1", filter: pruned ? "grayscale(100%)" : "none",
  });
  const record = images?.[index];
  const picture = document.createElement(record ? "img" : "div");
  Object.assign(picture.style, { width: "100%", height: `${TILE_WIDTH - 6}px`, objectFit: "contain",
                                 imageRendering: "pixelated", background: "#111", borderRadius: "2px" });
  if (record) {
    picture.src = imageUrl(record);
    picture.alt = `candidate ${index}`;
    picture.draggable = false;
  }
  tile.append(picture);
  const badge = document.createElement("div");
  badge.className = "probe-select-badge";
  const prunedText = prunedAt ? `pruned at ${prunedAt}` : "pruned";
  badge.textContent = picked ? "✓ picked" : (kept ? "kept" : (pruned ? prunedText : ""));
  Object.assign(badge.style, { position: "absolute", top: "3px", left: "3px", padding: "0 3px", borderRadius: "2px",
                               background: picked ? "#4aa3ff" : (kept ? "#3fbf5f" : "#555"),
                               color: "#fff", display: badge.textContent ? "block" : "none" });
  tile.append(badge);
  const caption = document.createElement("div");
  caption.className = "probe-select-caption";
  if (staged) {
    // One line per stage that scored it; the fate is on the badge.
    caption.style.lineHeight = `${LINE_HEIGHT}px`;
    for (const { number, score } of stageScores(state, index)) {
      const line = document.createElement("div");
      line.className = "probe-select-stage-score";
      line.dataset.stage = String(number);
      line.textContent = `stage ${number}  ${formatScore(score)}`;
      caption.append(line);
    }
  } else {
    caption.textContent = `${rank === null ? `#${index}` : `#${rank + 1}`}  ${formatScore(state.scores?.[index])}`;
  }
  const seedLine = document.createElement("div");
  seedLine.textContent = `seed ${seed}`;
  seedLine.style.whiteSpace = "nowrap";
  const actions = document.createElement("div");
  Object.assign(actions.style, { display: "flex", gap: "2px" });
  actions.append(button("copy", `Copy seed ${seed}`, () => copySeed(seed)),
                 button("→ KSampler", `Set seed ${seed} on the selected node or the first KSampler`,
                        () => sendSeedToSampler(seed)));
  tile.append(caption, seedLine, actions);
  if (picking) tile.addEventListener("click", () => state.picking.onToggle(index));
  return tile;
}

export function renderGallery(node, state) {
  if (isStaged(state) && !state.header) {
    state = { ...state, header: stagesHeader(state), headerHeight: state.stages.length * LINE_HEIGHT + 4 };
  }
  const widget = galleryWidget(node);
  widget.value = state;
  const element = widget.element;
  element.replaceChildren();
  const previews = previewsByRun.get(state.run_id);
  const images = previews?.images?.length ? previews.images : null;
  if (state.header) element.append(state.header);
  const grid = document.createElement("div");
  Object.assign(grid.style, { display: "flex", flexWrap: "wrap", gap: `${GAP}px` });
  const staged = isStaged(state);
  const indices = staged ? stagedOrder(state) : state.seeds.map((_, i) => i);
  const ranked = Array.isArray(state.scores) && state.scores.some((s) => s !== null);
  if (ranked && !staged) {
    indices.sort((a, b) => (state.scores[b] ?? -Infinity) - (state.scores[a] ?? -Infinity) || a - b);
  }
  indices.forEach((index, position) => grid.append(renderTile(state, index, ranked ? position : null, images)));
  element.append(grid);
  fitNode(node, state.seeds.length > 1 ? 2 * (TILE_WIDTH + GAP) + 20 : 0);
}

app.registerExtension({
  name: "ProbeSelect.Gallery",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const previews = PREVIEW_NODES.has(nodeData.name);
    const gallery = GALLERY_NODES.has(nodeData.name);
    if (!previews && !gallery) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      for (const entry of message?.probe_select_previews ?? []) rememberPreviews(entry);
      const shown = message?.probe_select_gallery?.[0];
      if (gallery && shown) {
        renderGallery(this, shown);
      } else if (!gallery && message?.probe_select_previews?.[0]) {
        // The early sampler: its candidates, unscored and not yet selected.
        const entry = message.probe_select_previews[0];
        renderGallery(this, { run_id: entry.run_id, seeds: entry.seeds, scores: null,
                              kept: entry.seeds.map((_, i) => i), mode: "early" });
      }
    };
  },
});
