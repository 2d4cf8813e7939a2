// Shows each candidate's predicted score on the Probe-Select nodes after they run, kept ones marked.
// The nodes send the ranking as `ui.text` (PreviewText); this puts it in a read-only text box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES_WITH_SCORES = new Set(["ProbeSelectScore", "ProbeSelectTopK", "ProbeSelectSampler"]);
const WIDGET_NAME = "probe_select_scores";

function scoreWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.85;
    // Display only: never saved into the workflow's widgets_values.
    widget.options = { ...(widget.options ?? {}), serialize: false };
    widget.serializeValue = () => undefined;
  }
  return widget;
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
      scoreWidget(this).value = Array.isArray(lines) ? lines.join("\n") : String(lines);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
