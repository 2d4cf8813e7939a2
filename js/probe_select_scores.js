// Shows each candidate's predicted score, in full, on the Probe-Select nodes that score or select.
// The nodes send the ranking as `ui.text`; it goes into a read-only DOM widget whose height follows
// its line count, and the node grows to fit. Display only: the widget is excluded from the saved
// workflow (widget.serialize) and from the prompt (options.serialize).
// Public frontend API only: app.registerExtension, node.addDOMWidget, onExecuted.
import { app } from "../../scripts/app.js";

const NODES_WITH_SCORES = new Set([
  "ProbeSelectScore", "ProbeSelectPreviewScore", "ProbeSelectBlendScores", "ProbeSelectTopK", "ProbeSelectSampler",
  "ProbeSelectPickCandidates",
]);
const WIDGET_NAME = "probe_select_scores";
const LINE_HEIGHT = 15;
const CHAR_WIDTH = 6.8;
const PADDING = 12;

// Grow (never shrink) the node so every widget is shown in full, and move the nodes right below it
// down by as much, so that the grown node covers none of them.
export function fitNode(node, minWidth = 0) {
  const [oldWidth, oldHeight] = node.size;
  const wanted = node.computeSize();
  const width = Math.max(oldWidth, wanted[0], minWidth);
  const height = Math.max(oldHeight, wanted[1]);
  node.setSize([width, height]);
  const grown = height - oldHeight;
  if (grown > 0) {
    const oldBottom = node.pos[1] + oldHeight;
    const overlapsColumn = (other) => other.pos[0] < node.pos[0] + width && other.pos[0] + other.size[0] > node.pos[0];
    for (const other of node.graph?._nodes ?? node.graph?.nodes ?? []) {
      if (other !== node && other.pos[1] >= oldBottom && overlapsColumn(other)) other.pos[1] += grown;
    }
  }
  node.setDirtyCanvas?.(true, true);
}

// A DOM widget's element is inset by the widget's margin on each side.
export function widgetMargin(widget) {
  return 2 * (widget?.margin ?? 10);
}

function scoresWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) return widget;
  const element = document.createElement("pre");
  element.className = "probe-select-scores";
  Object.assign(element.style, {
    margin: "0", padding: "4px 6px", boxSizing: "border-box", overflow: "hidden", whiteSpace: "pre",
    font: `11px/${LINE_HEIGHT}px monospace`, borderRadius: "4px", userSelect: "text",
    background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)",
  });
  widget = node.addDOMWidget(WIDGET_NAME, "probe_select_text", element, {
    serialize: false,
    getValue: () => element.textContent,
    setValue: (value) => { element.textContent = value ?? ""; },
    getMinHeight: () => element.textContent.split("\n").length * LINE_HEIGHT + PADDING + widgetMargin(widget),
  });
  widget.serialize = false;   // LiteGraph's workflow serialisation reads this flag, the prompt reads options
  return widget;
}

export function showScores(node, text) {
  const widget = scoresWidget(node);
  widget.value = text;
  const longest = Math.max(...text.split("\n").map((line) => line.length));
  fitNode(node, Math.ceil(longest * CHAR_WIDTH) + 2 * PADDING + 20);
}

app.registerExtension({
  name: "ProbeSelect.Scores",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_SCORES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const lines = message?.text;
      if (!lines) return;
      showScores(this, Array.isArray(lines) ? lines.join("\n") : String(lines));
    };
  },
});
