"""The machinery of the example workflows: declare a graph once, write it in two formats.

    example_workflows/<name>.json      UI format: what ComfyUI's templates browser lists and loads
                                       (nodes, links, widgets_values; the pack folder
                                       `example_workflows/` is served as templates, `*.json` one
                                       level deep only).
    example_workflows/api/<name>.json  API format: what POST /prompt takes; the tests run these.

The declarations live in scripts/templates_*.py (each registers its workflows with `@workflow`);
scripts/build_workflows.py is the command line that imports them and writes or checks the files.

Node schemas (input order, which inputs are widgets, output types) are ComfyUI's own `/object_info`
entries, computed in-process the way server.py computes them: ComfyUI is bootstrapped by
devtools/ (as the tests do), the pack is imported like ComfyUI imports it. No server, no network; the
files depend only on the declarations, ComfyUI's version and the pack's node schemas, and a second
run gives byte-identical files.

Adding a workflow
-----------------
Write a function that returns a `Workflow` and decorate it with `@workflow("<file name>")`. A node
is `Node(id, class_type, inputs, ...)`: each input is a literal widget value or a link
`(source node id, output index)`. Widgets left out take the schema default; the seed control
("fixed", "randomize"...) is `Node(control=...)`. The layout is automatic (columns by dependency
depth); `column=`, `pos=` and `size=` override it. `Note(id, markdown)` adds a UI-only note.
Then run scripts/build_workflows.py; tests/test_workflows.py checks every UI file against the
schemas, checks that its API twin is what `ui_to_api()` makes of it, and fails while a file is
stale. A workflow that needs a node ComfyUI does not register fails the build with its name.
"""
from __future__ import annotations

import asyncio
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "example_workflows"
API_DIR = WORKFLOWS_DIR / "api"
PACK_NAME = "probe-select"          # the Comfy Registry id (pyproject.toml [project] name)

# How a workflow opens: the frontend draws nodes without text below ~0.57 zoom (its 8 px minimum font
# size for detail over 14 px node text), so never open below MIN_OPENING_SCALE even if the graph is
# then wider than the screen; the offset (graph units) keeps the first column clear of the sidebar
# and of the workflow-name bar at the top left.
MIN_OPENING_SCALE = 0.65
OPENING_OFFSET = (100, 120)


def opening_scale(graph_width: float) -> float:
    return round(max(MIN_OPENING_SCALE, min(1.0, 1800 / graph_width)), 2)


# ---- declarations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One node. `inputs`: name -> literal widget value, or a link (source node id, output index)."""
    id: int
    class_type: str
    inputs: dict = field(default_factory=dict)
    title: Optional[str] = None       # shown on the node and in the API `_meta`; default: display name
    color: Optional[str] = None       # a key of COLORS
    control: str = "fixed"            # value of the control_after_generate widget (seeds)
    column: Optional[int] = None      # layout overrides
    pos: Optional[tuple] = None
    size: Optional[tuple] = None


@dataclass(frozen=True)
class Note:
    """A markdown note: UI only (the frontend's MarkdownNote), never in the API twin."""
    id: int
    text: str
    title: str = "Note"
    column: int = 0
    pos: Optional[tuple] = None
    size: Optional[tuple] = None


@dataclass(frozen=True)
class Workflow:
    """A graph and what the template browser and the missing-model check read about it.

    `description`: one paragraph on what the workflow does and what it needs. ComfyUI's frontends
    (1.32 to 1.49) show a custom-node template's file name as its card title and description and
    read nothing else from the pack, so the description is kept in the UI file's `extra.description`
    (for other tools and the README) and should also open the workflow's note.
    """
    nodes: list
    description: str = ""
    # A picture (path relative to the repository root) shown on the card instead of the drawn graph:
    # the analysis templates show what their output looks like (docs/images, made by `make pictures`).
    picture: Optional[str] = None


@dataclass(frozen=True)
class PublicModel:
    """A model file a workflow names in a loader widget, as the frontend's missing-model check reads it
    from the loader node's `properties.models`: file name, models/ subfolder and download URL. Only files
    with a public download are registered: the frontend's workflow schema (1.32.9) requires the url, and
    rejects the whole workflow on load when an entry lacks it (so a probe the user trains has no entry)."""
    name: str
    directory: str
    url: str

    def metadata(self) -> dict:
        return {"name": self.name, "directory": self.directory, "url": self.url}


# file name -> PublicModel: every downloadable model file a template may name, in one place. A loader
# whose widget holds one of these names gets `properties.models` (build()).
PUBLIC_MODELS: dict[str, PublicModel] = {}


def public_model(name: str, directory: str, url: str) -> str:
    """Register a model file for the missing-model metadata; returns its name (for widget values)."""
    model = PublicModel(name, directory, url)
    if PUBLIC_MODELS.get(name, model) != model:
        raise ValueError(f"{name} registered twice with different folders or URLs")
    PUBLIC_MODELS[name] = model
    return name


WORKFLOWS: dict[str, Callable[[], Workflow]] = {}


def workflow(name: str):
    """Register a function returning a Workflow; written as example_workflows/<name>.json and api/<name>.json."""
    def register(fn):
        if name in WORKFLOWS:
            raise ValueError(f"two workflows named {name}")
        WORKFLOWS[name] = fn
        return fn
    return register


# Defaults shared by the examples (the SD1.5 model file of ComfyUI's own default workflow).
# ---- node schemas (ComfyUI's /object_info, in-process) --------------------------------------------

FRONTEND_ONLY = {"MarkdownNote", "Note"}        # virtual nodes: no schema, never in the API format
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
IMAGE_NODES = {"SaveImage", "PreviewImage"}
COLORS = {  # LiteGraph's node palette
    "red": ("#322", "#533"), "brown": ("#332922", "#593930"), "green": ("#232", "#353"),
    "blue": ("#223", "#335"), "pale_blue": ("#2a363b", "#3f5159"), "cyan": ("#233", "#355"),
    "purple": ("#323", "#535"), "yellow": ("#432", "#653"), "black": ("#222", "#000"),
}


def _load_pack():
    """ComfyUI bootstrapped and the pack loaded as ComfyUI loads it (devtools/; both idempotent)."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))      # last: ComfyUI's `nodes` must win over the pack's nodes/
    # Imported here: `devtools` is importable only once the repository root is on sys.path.
    from devtools import load_pack

    return load_pack()


class Schemas:
    """class_type -> the node's /object_info entry, for ComfyUI core, its comfy_extras and this pack."""

    def __init__(self):
        pack = _load_pack()
        import nodes

        self._nodes = nodes
        self._pack: dict[str, type] = {}
        extension = asyncio.run(pack.comfy_entrypoint())
        for cls in asyncio.run(extension.get_node_list()):
            self._pack[cls.GET_SCHEMA().node_id] = cls
        self._extras_loaded = False
        self._cache: dict[str, dict] = {}

    def is_ours(self, class_type: str) -> bool:
        return class_type in self._pack

    def __contains__(self, class_type: str) -> bool:
        return self._class(class_type) is not None

    def _class(self, class_type: str):
        if class_type in self._pack:
            return self._pack[class_type]
        mapping = self._nodes.NODE_CLASS_MAPPINGS
        if class_type not in mapping and not self._extras_loaded:
            self._extras_loaded = True          # comfy_extras/ only when a workflow needs one of them
            asyncio.run(self._nodes.init_builtin_extra_nodes())
        return mapping.get(class_type)

    def __getitem__(self, class_type: str) -> dict:
        if class_type not in self._cache:
            cls = self._class(class_type)
            if cls is None:
                raise KeyError(f"unknown node type {class_type}: not registered by ComfyUI core, its "
                               "comfy_extras or this pack")
            self._cache[class_type] = node_info(cls, class_type, self._nodes)
        return self._cache[class_type]


def display_name(info: dict, class_type: str) -> str:
    """The name the frontend shows: the schema's display name, else the node type (some V3 nodes of
    ComfyUI 0.33 have none)."""
    return info.get("display_name") or class_type


def node_info(cls, class_type: str, nodes_module) -> dict:
    """The fields of server.py's node_info() that workflows need (it is a closure there, not importable)."""
    if hasattr(cls, "GET_NODE_INFO_V1"):                 # V3 schema nodes
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {
        "input": inputs,
        "input_order": {key: list(value.keys()) for key, value in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
        "name": class_type,
        "display_name": nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type),
    }


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str                 # "COMBO" for option lists
    options: dict
    required: bool
    widget: bool              # drawn as a widget (its value goes in widgets_values)
    control: bool             # followed by a control_after_generate value in widgets_values
    choices: Optional[list] = None


def input_specs(info: dict) -> list[InputSpec]:
    """Inputs in the frontend's order (required, then optional; input_order when given), hidden ones left out.

    Widgets follow the frontend: INT, FLOAT, STRING, BOOLEAN and COMBO, unless forceInput; an INT
    gets a control_after_generate widget when its options say so, or, when they are silent, when it
    is named seed or noise_seed; a COMBO only when its options say so.
    """
    specs = []
    for section in ("required", "optional"):
        declared = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(declared))
        for name in order:
            raw = declared[name]
            kind, options = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
            choices = None
            if isinstance(kind, list):
                kind, choices = "COMBO", kind
            elif kind == "COMBO":
                choices = options.get("options", [])
            widget = kind in WIDGET_TYPES and not options.get("forceInput", False)
            if widget and any(options.get(key) for key in UPLOAD_OPTIONS):
                raise NotImplementedError(f"input {name}: upload widgets add a frontend-only value; "
                                          "teach build_workflows.py their widgets_values first")
            control = options.get("control_after_generate")
            if control is None:
                control = kind == "INT" and name in ("seed", "noise_seed")
            specs.append(InputSpec(name, kind, options, section == "required", widget,
                                   bool(widget and control), choices))
    return specs


def types_match(output_type: str, input_type: str) -> bool:
    """LiteGraph's rule: '*' (or empty) matches anything, else the comma-separated sets must intersect."""
    if output_type in ("*", "") or input_type in ("*", ""):
        return True
    outs = {t.strip().upper() for t in str(output_type).split(",")}
    ins = {t.strip().upper() for t in str(input_type).split(",")}
    return bool(outs & ins)


def is_link(value: Any) -> bool:
    return isinstance(value, tuple)


# ---- building ----------------------------------------------------------------------------------

class WorkflowError(ValueError):
    pass


def _widget_value(where: str, spec: InputSpec, value: Any) -> Any:
    """The value normalised for JSON (FLOAT -> float); rejects values the widget can't hold."""
    if spec.type == "FLOAT" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    expected = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(spec.type)
    if expected and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        raise WorkflowError(f"{where}: {value!r} is not a valid {spec.type}")
    if spec.type in ("INT", "FLOAT"):
        low, high = spec.options.get("min"), spec.options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise WorkflowError(f"{where}: {value} is outside [{low}, {high}]")
    return value


_EMPTY_WIDGET = {"STRING": "", "INT": 0, "FLOAT": 0.0, "BOOLEAN": False}


def _unlinked_value(spec) -> Any:
    """What the frontend keeps in widgets_values for a widget whose input is linked: its default."""
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return (spec.options.get("options") or [""])[0]
    return _EMPTY_WIDGET.get(spec.type)


def _resolve(node: Node, schemas: Schemas) -> dict:
    """name -> literal value or link, every widget filled (schema default when left out), checked."""
    specs = input_specs(schemas[node.class_type])
    names = {s.name for s in specs}
    unknown = set(node.inputs) - names
    if unknown:
        raise WorkflowError(f"node {node.id} ({node.class_type}) has no inputs {sorted(unknown)}; "
                            f"it has {[s.name for s in specs]}")
    resolved = {}
    for spec in specs:
        where = f"node {node.id} ({node.class_type}) input {spec.name}"
        if spec.name in node.inputs:
            value = node.inputs[spec.name]
            if is_link(value):
                resolved[spec.name] = value
            elif not spec.widget:
                raise WorkflowError(f"{where}: a {spec.type} socket needs a link (node id, output index)")
            else:
                resolved[spec.name] = _widget_value(where, spec, value)
        elif spec.widget:
            if "default" not in spec.options:
                raise WorkflowError(f"{where}: no value and the schema has no default")
            resolved[spec.name] = _widget_value(where, spec, spec.options["default"])
        elif spec.required:
            raise WorkflowError(f"{where}: required {spec.type} input is not linked")
    return resolved


def _check_graph(wf: Workflow, schemas: Schemas) -> dict[int, dict]:
    ids = [n.id for n in wf.nodes]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) and i > 0 for i in ids):
        raise WorkflowError(f"node ids must be distinct positive ints: {ids}")
    by_id = {n.id: n for n in wf.nodes}
    resolved = {}
    for node in wf.nodes:
        if isinstance(node, Note):
            continue
        resolved[node.id] = values = _resolve(node, schemas)
        in_types = {s.name: s.type for s in input_specs(schemas[node.class_type])}
        for name, value in values.items():
            if not is_link(value):
                continue
            source_id, slot = value
            source = by_id.get(source_id)
            if source is None or isinstance(source, Note):
                raise WorkflowError(f"node {node.id} input {name}: no node {source_id} to link from")
            outputs = schemas[source.class_type]["output"]
            if not 0 <= slot < len(outputs):
                raise WorkflowError(f"node {node.id} input {name}: node {source_id} has no output {slot}")
            if not types_match(outputs[slot], in_types[name]):
                raise WorkflowError(f"node {node.id} input {name} ({in_types[name]}) linked to node "
                                    f"{source_id} output {slot} ({outputs[slot]})")
    return resolved


def _sources(values: dict) -> list[int]:
    return [v[0] for v in values.values() if is_link(v)]


def _execution_order(wf: Workflow, resolved: dict) -> list[int]:
    """Topological order (ties in declaration order), as LiteGraph stores it in each node's `order`."""
    done, order = set(), []
    pending = [n.id for n in wf.nodes]
    while pending:
        ready = [i for i in pending if all(s in done for s in _sources(resolved.get(i, {})))]
        if not ready:
            raise WorkflowError(f"the links form a cycle through nodes {pending}")
        order.append(ready[0])
        done.add(ready[0])
        pending.remove(ready[0])
    return order


def _columns(wf: Workflow, resolved: dict, order: list[int]) -> dict[int, int]:
    """Column = longest path from a source; a source sits just left of its first consumer."""
    column = {}
    for i in order:
        column[i] = max((column[s] + 1 for s in _sources(resolved.get(i, {}))), default=0)
    for node in wf.nodes:
        consumers = [i for i, values in resolved.items() if node.id in _sources(values)]
        if node.id in resolved and not _sources(resolved[node.id]) and consumers:
            column[node.id] = max(0, min(column[c] for c in consumers) - 1)
        if node.column is not None:
            column[node.id] = node.column
    return column


def _size(node, specs: list[InputSpec], n_outputs: int, linked: set) -> list:
    if node.size is not None:
        return list(node.size)
    if isinstance(node, Note):
        return [400, 200]
    if node.class_type in IMAGE_NODES:
        return [400, 460]
    sockets = sum(1 for s in specs if not s.widget or s.name in linked)
    widgets = sum(1 + s.control for s in specs if s.widget and s.name not in linked)
    multiline = any(s.widget and s.options.get("multiline") for s in specs)
    height = max(sockets, n_outputs) * 22 + widgets * 24 + 12 + (110 if multiline else 0)
    return [400 if multiline else 315, height]


def build(name: str, wf: Workflow, schemas: Schemas) -> tuple[dict, dict]:
    """(UI-format workflow, API-format workflow) of one declaration."""
    resolved = _check_graph(wf, schemas)
    order = _execution_order(wf, resolved)
    column = _columns(wf, resolved, order)

    # Links, numbered in declaration order of the target nodes and schema order of their inputs.
    by_id = {n.id: n for n in wf.nodes}
    links, in_slots, out_links = [], {}, {}
    for node in wf.nodes:
        if isinstance(node, Note):
            continue
        specs = input_specs(schemas[node.class_type])
        values = resolved[node.id]
        sockets = [s for s in specs if not s.widget] + [s for s in specs if s.widget and is_link(values.get(s.name))]
        in_slots[node.id] = []
        for slot, spec in enumerate(sockets):
            link_id = None
            if is_link(values.get(spec.name)):
                source_id, source_slot = values[spec.name]
                link_id = len(links) + 1
                link_type = schemas[by_id[source_id].class_type]["output"][source_slot]
                links.append([link_id, source_id, source_slot, node.id, slot, link_type])
                out_links.setdefault((source_id, source_slot), []).append(link_id)
            entry = {"name": spec.name, "type": spec.type, "link": link_id}
            if spec.widget:
                entry["widget"] = {"name": spec.name}
            if not spec.required:
                entry["shape"] = 7                     # LiteGraph's hollow circle: an optional input
            in_slots[node.id].append(entry)

    ui_nodes, sizes = {}, {}
    for node in wf.nodes:
        if isinstance(node, Note):
            r, g = COLORS["yellow"]
            ui_nodes[node.id] = {"id": node.id, "type": "MarkdownNote", "title": node.title, "inputs": [],
                                 "outputs": [], "properties": {}, "widgets_values": [node.text],
                                 "color": r, "bgcolor": g}
            sizes[node.id] = _size(node, [], 0, set())
            continue
        info = schemas[node.class_type]
        specs = input_specs(info)
        values = resolved[node.id]
        linked = {s.name for s in specs if is_link(values.get(s.name))}
        widgets_values = []
        for spec in specs:
            if spec.widget:
                widgets_values.append(values[spec.name] if spec.name not in linked else _unlinked_value(spec))
                if spec.control:
                    widgets_values.append(node.control)
        outputs = [{"name": out_name, "type": out_type, "links": out_links.get((node.id, slot))}
                   for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        properties = {"Node name for S&R": node.class_type,
                      "cnr_id": PACK_NAME if schemas.is_ours(node.class_type) else "comfy-core"}
        models = [PUBLIC_MODELS[v].metadata() for v in widgets_values if isinstance(v, str) and v in PUBLIC_MODELS]
        if models:
            properties["models"] = models
        entry = {"id": node.id, "type": node.class_type}
        if node.title and node.title != display_name(info, node.class_type):
            entry["title"] = node.title
        entry.update({"inputs": in_slots[node.id], "outputs": outputs, "properties": properties,
                      "widgets_values": widgets_values})
        if node.color:
            entry["color"], entry["bgcolor"] = COLORS[node.color]
        ui_nodes[node.id] = entry
        sizes[node.id] = _size(node, specs, len(outputs), linked)

    # Layout: columns left to right, nodes top to bottom in declaration order.
    title_bar, gap, left, top = 30, 40, 50, 100
    n_columns = max(column.values()) + 1
    widths = [max([sizes[i][0] for i in column if column[i] == c], default=315) for c in range(n_columns)]
    x_of = [left + sum(widths[:c]) + gap * 2 * c for c in range(n_columns)]
    y_next = [top] * n_columns
    positions = {}
    for node in sorted(wf.nodes, key=lambda n: isinstance(n, Note)):      # notes below the nodes
        c = column[node.id]
        if node.pos is not None:
            positions[node.id] = list(node.pos)
        else:
            positions[node.id] = [x_of[c], y_next[c]]
            y_next[c] += sizes[node.id][1] + title_bar + gap

    nodes_out = []
    for node in wf.nodes:
        entry = ui_nodes[node.id]
        head = {k: entry.pop(k) for k in ("id", "type")}
        nodes_out.append({**head, "pos": positions[node.id], "size": sizes[node.id], "flags": {},
                          "order": order.index(node.id), "mode": 0, **entry})
    right = max(positions[i][0] + sizes[i][0] for i in positions)
    ui = {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"https://registry.comfy.org/{PACK_NAME}/{name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in wf.nodes),
        "last_link_id": len(links),
        "nodes": nodes_out,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": opening_scale(right), "offset": list(OPENING_OFFSET)},
                  **({"description": wf.description} if wf.description else {})},
        "version": 0.4,
    }

    api = {}
    for node in wf.nodes:
        if isinstance(node, Note):
            continue
        inputs = {k: ([str(v[0]), v[1]] if is_link(v) else v) for k, v in resolved[node.id].items()}
        api[str(node.id)] = {"class_type": node.class_type, "inputs": inputs,
                             "_meta": {"title": node.title or display_name(schemas[node.class_type], node.class_type)}}
    return ui, api


# ---- UI -> API ---------------------------------------------------------------------------------

def ui_to_api(ui: dict, schemas) -> dict:
    """What the frontend queues for a UI-format workflow (no subgraphs, primitives or bypassed nodes).

    `schemas`: class_type -> /object_info entry (a Schemas, or the JSON of a server's /object_info).
    """
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']}: muted or bypassed nodes are not supported")
        info = schemas[node["type"]]
        specs = input_specs(info)
        values = list(node.get("widgets_values") or [])
        expected = sum(1 + s.control for s in specs if s.widget)
        if len(values) != expected:
            raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widgets_values, "
                                f"the schema has {expected}")
        widget_values = {}
        for spec in specs:
            if spec.widget:
                widget_values[spec.name] = values.pop(0)
                if spec.control:
                    values.pop(0)
        linked = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source_id, source_slot, target_id, _, _ = links[slot["link"]]
                if target_id != node["id"]:
                    raise WorkflowError(f"link {slot['link']} does not end at node {node['id']}")
                linked[slot["name"]] = [str(source_id), source_slot]
        inputs = {}
        for spec in specs:
            if spec.name in linked:
                inputs[spec.name] = linked[spec.name]
            elif spec.name in widget_values:
                inputs[spec.name] = widget_values[spec.name]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or display_name(info, node["type"])}}
    return api


# ---- files -------------------------------------------------------------------------------------

def dumps(value: Any, indent: int = 0) -> str:
    """JSON with two-space indents, lists of scalars on one line (short diffs for pos, size, links)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return json.dumps(value, ensure_ascii=False)
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def render(schemas: Optional[Schemas] = None) -> dict[Path, str]:
    """Path -> file text for every declared workflow."""
    schemas = schemas or Schemas()
    files = {}
    for name, declare in WORKFLOWS.items():
        ui, api = build(name, declare(), schemas)
        files[WORKFLOWS_DIR / f"{name}.json"] = dumps(ui) + "\n"
        files[API_DIR / f"{name}.json"] = dumps(api) + "\n"
    return files


def essence(workflow: Any) -> Any:
    """What a workflow file means to whoever runs it, for the staleness check.

    A UI-format graph: its nodes' ids, types, titles, modes, widget values and model metadata, which
    input each link arrives at, the links (ends and type) and the description. An API-format graph:
    its nodes less `_meta`. Layout, sizes and the list of outputs are left out, so
    an output that ComfyUI adds upstream (0.33's SaveImage) does not make the files stale. Anything
    else counts whole.
    """
    if isinstance(workflow, dict) and workflow and all(isinstance(v, dict) and "class_type" in v
                                                       for v in workflow.values()):
        # API format: what runs; `_meta` (titles, which follow ComfyUI's display names) is left out.
        return {k: {key: v for key, v in node.items() if key != "_meta"} for k, node in workflow.items()}
    if not (isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)
            and isinstance(workflow.get("links"), list)):
        return workflow
    nodes = sorted(
        (node["id"], node["type"], node.get("title"), node.get("mode", 0), json.dumps(node.get("widgets_values")),
         json.dumps([[slot["name"], slot.get("link")] for slot in node.get("inputs", [])]),
         json.dumps((node.get("properties") or {}).get("models")))
        for node in workflow["nodes"])
    return {"nodes": nodes, "links": sorted(tuple(link) for link in workflow["links"]),
            "description": (workflow.get("extra") or {}).get("description")}


def _same_essence(text_a: str, text_b: str) -> bool:
    try:
        return essence(json.loads(text_a)) == essence(json.loads(text_b))
    except json.JSONDecodeError:
        return False


def stale(files: dict[Path, str], exact: bool = False) -> list[Path]:
    """The files that are missing or whose `essence` differs from the rendered text's (any byte: `exact`)."""
    out = []
    for path, text in files.items():
        current = path.read_text() if path.exists() else None
        if current != text and (current is None or exact or not _same_essence(current, text)):
            out.append(path)
    return out


