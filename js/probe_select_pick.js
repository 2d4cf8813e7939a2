// Pause-and-pick: while ProbeSelectPickCandidates waits at the checkpoint, its gallery lets the user
// click the candidates to finish and press Finish, which posts them to /probe_select/pick.
// The server announces a pause with the `probe_select.pick` websocket event and its end (picked,
// timeout, cancelled) with `probe_select.pick_closed`. Each pick node listens for its own id; the
// listeners are removed with the node.
// Public frontend API only: app.registerExtension, nodeCreated/onRemoved, api events, api.fetchApi.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { rememberPreviews, renderGallery } from "./probe_select_gallery.js";

const NODE_CLASS = "ProbeSelectPickCandidates";
const PICK_EVENT = "probe_select.pick";
const CLOSED_EVENT = "probe_select.pick_closed";

const extension = {
  name: "ProbeSelect.PickCandidates",
  listening: 0,   // pick nodes with live listeners (to check that removed nodes leave none behind)

  nodeCreated(node) {
    if ((node.comfyClass ?? node.type) !== NODE_CLASS) return;
    let pause = null;   // {request_id, gallery, picked, deadline, sending, timer, label}

    const stop = () => {
      if (pause?.timer) clearInterval(pause.timer);
      pause = null;
    };

    const labelText = () => {
      const left = Math.max(0, Math.round((pause.deadline - Date.now()) / 1000));
      return pause.sending ? "Finishing…"
        : `Paused: click candidates to finish (${pause.picked.size} picked, ${left} s left)`;
    };

    // The countdown changes the label's text only. Rebuilding the gallery each second would replace the
    // Finish button and the tiles under a click in progress (mouse down on the old element, up on the new
    // one: the browser clicks neither), and the pick would be lost until the node's timeout.
    const tick = () => {
      if (pause?.label) pause.label.textContent = labelText();
    };

    // The whole gallery: when the pause starts, on each toggle and when Finish is pressed.
    const render = () => {
      if (!pause) return;
      const header = document.createElement("div");
      header.className = "probe-select-pick-header";
      Object.assign(header.style, { display: "flex", alignItems: "center", gap: "6px", height: "26px",
                                    marginBottom: "4px", font: "11px sans-serif" });
      const label = document.createElement("span");
      label.textContent = labelText();
      pause.label = label;
      const finish = Object.assign(document.createElement("button"), { textContent: "Finish with picked" });
      finish.className = "probe-select-pick-finish";
      finish.disabled = pause.picked.size === 0 || pause.sending;
      Object.assign(finish.style, { padding: "2px 8px", cursor: "pointer", borderRadius: "3px", whiteSpace: "nowrap",
                                    border: "1px solid #4aa3ff", background: "#1d4f80", color: "#fff" });
      finish.addEventListener("pointerdown", (event) => event.stopPropagation());
      finish.addEventListener("click", (event) => { event.stopPropagation(); submit(); });
      header.append(finish, label);
      renderGallery(node, { ...pause.gallery, header,
                            picking: { picked: pause.picked, onToggle: toggle } });
    };

    const toggle = (index) => {
      if (!pause || pause.sending) return;
      if (pause.picked.has(index)) pause.picked.delete(index);
      else pause.picked.add(index);
      render();
    };

    const submit = async () => {
      if (!pause || !pause.picked.size) return;
      pause.sending = true;
      render();
      const current = pause;
      const response = await api.fetchApi("/probe_select/pick", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ node_id: String(node.id), request_id: current.request_id,
                               indices: [...current.picked] }),
      });
      if (!response.ok) {
        const answer = await response.json().catch(() => ({}));
        console.error(`[Probe-Select] pick refused (${response.status}): ${answer.error ?? ""}`);
        if (pause === current) { pause.sending = false; render(); }
      }
    };

    const onPick = ({ detail }) => {
      if (String(detail?.node_id) !== String(node.id)) return;
      stop();
      rememberPreviews(detail.previews);
      pause = { request_id: detail.request_id, gallery: detail.gallery, picked: new Set(detail.gallery.kept),
                deadline: Date.now() + 1000 * detail.timeout, sending: false };
      pause.timer = setInterval(tick, 1000);
      render();
    };

    const onClosed = ({ detail }) => {
      if (String(detail?.node_id) !== String(node.id) || detail.request_id !== pause?.request_id) return;
      const gallery = pause.gallery;
      stop();
      // Picked: the node's executed message shows the result next. Otherwise leave the unmarked gallery.
      if (detail.reason !== "picked") renderGallery(node, { ...gallery, kept: [], mode: "early" });
    };

    api.addEventListener(PICK_EVENT, onPick);
    api.addEventListener(CLOSED_EVENT, onClosed);
    extension.listening += 1;
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
      api.removeEventListener(PICK_EVENT, onPick);
      api.removeEventListener(CLOSED_EVENT, onClosed);
      extension.listening -= 1;
      stop();
      return onRemoved?.apply(this, arguments);
    };
  },
};

app.registerExtension(extension);
