"""The example workflows in example_workflows/: UI files valid against the node schemas, API twins in step.

In-process, no server: the schemas are ComfyUI's /object_info entries computed the way server.py
computes them (scripts/build_workflows.py `Schemas`). The checks on the UI files re-derive the
frontend's rules here (which inputs are widgets, which get a control_after_generate value) instead
of reusing the generator's, so a mistake in one shows up against the other.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "example_workflows"
API_DIR = WORKFLOWS_DIR / "api"
UI_FILES = sorted(WORKFLOWS_DIR.glob("*.json"))
FRONTEND_ONLY = {"MarkdownNote", "Note"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
TITLE_BAR = 30


def _load_generator():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                 # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bw = _load_generator()


@pytest.fixture(scope="module")
def schemas(pack):
    return bw.Schemas()


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def ui_param(path: Path):
    return pytest.param(path, id=path.stem)


# ---- the frontend's rules, restated --------------------------------------------------------------

def frontend_inputs(info: dict) -> list[tuple[str, str, dict, bool, bool, bool]]:
    """(name, type, options, required, is widget, has control value) in the order the frontend uses."""
    result = []
    for section in ("required", "optional"):
        declared = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(declared)):
            kind, *rest = declared[name]
            options = rest[0] if rest else {}
            if isinstance(kind, list):
                kind, options = "COMBO", {**options, "options": kind}
            widget = kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not options.get("forceInput")
            control = options.get("control_after_generate")
            if control is None:                       # frontend: `control_after_generate ?? seed names`
                control = kind == "INT" and name in ("seed", "noise_seed")
            result.append((name, kind, options, section == "required", widget, widget and bool(control)))
    return result


def check_widget_value(where: str, kind: str, options: dict, value) -> None:
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an INT"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a FLOAT"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a STRING"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a BOOLEAN"
    elif kind == "COMBO" and not str(value).endswith(MODEL_FILE_SUFFIXES) and options.get("options"):
        # File and dataset lists depend on the install (an empty list here means none on this machine).
        assert value in options.get("options", []), f"{where}: {value!r} is not one of {options.get('options')}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"


# ---- the files -----------------------------------------------------------------------------------

def test_every_declared_workflow_has_a_ui_file_and_an_api_twin():
    declared = set(bw.WORKFLOWS)
    assert {"SD1.5_probe_selection", "SD1.5_probe_selection_one_box", "SD1.5_pick_by_hand_x0_previews"} <= declared
    assert {p.stem for p in UI_FILES} == declared, "a UI file without a declaration, or the reverse"
    assert {p.stem for p in API_DIR.glob("*.json")} == declared


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_ui_file_is_litegraph_format(path):
    # ComfyUI serves every example_workflows/*.json as a template: each must be a UI-format graph.
    ui = load(path)
    assert ui["version"] == 0.4 and isinstance(ui["nodes"], list) and isinstance(ui["links"], list)
    ids = [n["id"] for n in ui["nodes"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) for i in ids)
    assert ui["last_node_id"] == max(ids)
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids) and ui["last_link_id"] == max(link_ids, default=0)
    assert sorted(n["order"] for n in ui["nodes"]) == list(range(len(ids)))
    for node in ui["nodes"]:
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and node["mode"] == 0, node["id"]


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_node_types_exist(path, schemas):
    for node in load(path)["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node["type"] in schemas, f"node {node['id']}: unknown type {node['type']}"
        assert node["properties"]["Node name for S&R"] == node["type"]


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_widgets_values_match_the_schema(path, schemas):
    for node in load(path)["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        where = f"{path.stem} node {node['id']} ({node['type']})"
        widgets = [i for i in frontend_inputs(schemas[node["type"]]) if i[4]]
        values = list(node["widgets_values"])
        assert len(values) == sum(1 + control for *_, control in widgets), f"{where}: {values}"
        for name, kind, options, _required, _widget, control in widgets:
            check_widget_value(f"{where} {name}", kind, options, values.pop(0))
            if control:
                assert values.pop(0) in CONTROL_VALUES, f"{where}: no control value after {name}"


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_links_agree_with_both_ends(path, schemas):
    ui = load(path)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        out = nodes[source]["outputs"][source_slot]
        into = nodes[target]["inputs"][target_slot]
        assert link_id in (out["links"] or []) and into["link"] == link_id, f"link {link_id} not on both ends"
        assert out["type"] == link_type == schemas[nodes[source]["type"]]["output"][source_slot], link_id
        declared = {name: kind for name, kind, *_ in frontend_inputs(schemas[nodes[target]["type"]])}
        assert into["type"] == declared[into["name"]], f"link {link_id}: input {into['name']} type"
        assert bw.types_match(link_type, into["type"]), f"link {link_id}: {link_type} into {into['type']}"
    # No dangling ids on the node side either.
    known = {link[0] for link in ui["links"]}
    for node in ui["nodes"]:
        assert all(i["link"] is None or i["link"] in known for i in node["inputs"]), node["id"]
        assert all(set(o["links"] or []) <= known for o in node["outputs"]), node["id"]


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_every_required_input_has_a_value_or_a_link(path, schemas):
    for node in load(path)["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        slots = {i["name"] for i in node["inputs"]}
        for name, kind, _options, required, widget, _control in frontend_inputs(schemas[node["type"]]):
            if not widget:
                assert name in slots, f"node {node['id']}: socket {name} missing from inputs"
                if required:
                    assert name in linked, f"node {node['id']} ({node['type']}): required {kind} {name} not linked"


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_nodes_do_not_overlap(path):
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in load(path)["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2]
            assert apart, f"nodes {a[0]} and {b[0]} overlap"


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_api_twin_is_the_converted_ui_file(path, schemas):
    twin, converted = load(API_DIR / path.name), bw.ui_to_api(load(path), schemas)
    assert bw.essence(twin) == bw.essence(converted)          # titles follow the ComfyUI version
    assert set(twin) == set(converted) and all(twin[i]["_meta"]["title"] for i in twin)


def test_files_are_up_to_date(schemas):
    stale = bw.stale(bw.render(schemas))
    assert stale == [], f"stale: {[str(p.relative_to(ROOT)) for p in stale]}; run scripts/build_workflows.py"


def test_check_command_passes():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_workflows.py"), "--check"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_stale_detects_missing_and_changed_files(tmp_path):
    path = tmp_path / "w.json"
    assert bw.stale({path: "{}\n"}) == [path]
    path.write_text("[]\n")
    assert bw.stale({path: "{}\n"}) == [path]
    path.write_text("{}\n")
    assert bw.stale({path: "{}\n"}) == []


def test_stale_ignores_layout_and_outputs_but_not_what_the_graph_means(tmp_path):
    """An output ComfyUI adds upstream (0.33's SaveImage) or a moved node is not stale; a changed node
    type, widget value or link is; a rewrite (exact) still brings every byte up to date."""
    text = (WORKFLOWS_DIR / "SD1.5_probe_selection.json").read_text()
    path = tmp_path / "w.json"

    def stale_after(edit, exact=False):
        ui = json.loads(text)
        edit(ui)
        path.write_text(bw.dumps(ui) + "\n")
        return bw.stale({path: text}, exact=exact) == [path]

    def add_output(ui):
        ui["nodes"][-1]["outputs"].append({"name": "IMAGE", "type": "IMAGE", "links": None})
        ui["nodes"][-1]["size"][1] += 20
        ui["nodes"][0]["pos"][0] += 10

    assert not stale_after(add_output) and stale_after(add_output, exact=True)
    assert not stale_after(lambda ui: None, exact=True)
    first = next(n for n in json.loads(text)["nodes"] if n["widgets_values"] and n["type"] not in FRONTEND_ONLY)
    index = [n["id"] for n in json.loads(text)["nodes"]].index(first["id"])

    def change_widget(ui):
        ui["nodes"][index]["widgets_values"][0] = "something else"

    def change_type(ui):
        ui["nodes"][index]["type"] = "SomethingElse"

    def change_link(ui):
        ui["links"][0][4] += 1

    assert stale_after(change_widget) and stale_after(change_type) and stale_after(change_link)


def test_basic_api_twin_keeps_what_test_server_edits():
    api = load(API_DIR / "SD1.5_probe_selection.json")
    expected = {"1": ("CheckpointLoaderSimple", "ckpt_name"), "4": ("EmptyLatentImage", "width"),
                "5": ("ProbeSelectTap", "feature_size"), "6": ("ProbeSelectEarlySampler", "seed"),
                "7": ("ProbeSelectLoadProbe", "probe_name"), "8": ("ProbeSelectScore", "probe"),
                "9": ("ProbeSelectTopK", "keep"), "12": ("SaveImage", "filename_prefix")}
    for node_id, (class_type, name) in expected.items():
        assert api[node_id]["class_type"] == class_type and name in api[node_id]["inputs"], node_id


# ---- the converter and the generator ------------------------------------------------------------

def test_ui_to_api_skips_control_values_and_notes(schemas):
    ui = {"links": [[1, 1, 0, 2, 3, "LATENT"]], "nodes": [
        {"id": 1, "type": "EmptyLatentImage", "inputs": [], "widgets_values": [64, 32, 2]},
        {"id": 2, "type": "KSampler", "title": "Mine", "widgets_values": [7, "randomize", 20, 8.0, "euler", "normal", 1.0],
         "inputs": [{"name": "model", "type": "MODEL", "link": None}, {"name": "positive", "type": "CONDITIONING", "link": None},
                    {"name": "negative", "type": "CONDITIONING", "link": None},
                    {"name": "latent_image", "type": "LATENT", "link": 1}]},
        {"id": 3, "type": "MarkdownNote", "inputs": [], "widgets_values": ["hello"]},
    ]}
    assert bw.ui_to_api(ui, schemas) == {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 32, "batch_size": 2},
              "_meta": {"title": "Empty Latent Image"}},
        "2": {"class_type": "KSampler", "_meta": {"title": "Mine"},
              "inputs": {"seed": 7, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0, "latent_image": ["1", 0]}},
    }
    ui["nodes"][1]["widgets_values"].remove("randomize")       # a file written without the control value
    with pytest.raises(bw.WorkflowError, match="6 widgets_values, the schema has 7"):
        bw.ui_to_api(ui, schemas)


def test_generator_links_a_widget_input(schemas):
    # The best seed of one run (TopK output 2, INT) drives the seed widget of another early sampler.
    basic = bw.WORKFLOWS["SD1.5_probe_selection"]().nodes
    declared = basic[:9] + [bw.Node(20, "ProbeSelectEarlySampler", {
        "model": (5, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0), "seed": (9, 2)})]
    ui, api = bw.build("linked_seed", bw.Workflow(declared), schemas)
    node = next(n for n in ui["nodes"] if n["id"] == 20)
    seed_slot = next(i for i in node["inputs"] if i["name"] == "seed")
    assert seed_slot["widget"] == {"name": "seed"} and seed_slot["link"] is not None
    assert node["widgets_values"][:2] == [0, "fixed"] and len(node["widgets_values"]) == 9
    assert api["20"]["inputs"]["seed"] == ["9", 2] and api["20"]["inputs"]["candidates"] == 5
    assert bw.ui_to_api(ui, schemas) == api


@pytest.mark.parametrize("node, message", [
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "k": 1}), "has no inputs"),
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "keep": 1}), "scores: required PS_SCORES"),
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": (1, 0), "scores": (8, 0)}), r"\(LATENT\) linked to node 1 output 0 \(MODEL\)"),
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": (6, 7), "scores": (8, 0)}), "has no output 7"),
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "keep": 0}), "outside"),
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": (6, 0), "scores": (8, 0), "keep": "1"}), "is not a valid INT"),
    (bw.Node(9, "ProbeSelectTopK", {"early_latent": "latent", "scores": (8, 0)}), "socket needs a link"),
])
def test_generator_rejects_bad_declarations(schemas, node, message):
    basic = bw.WORKFLOWS["SD1.5_probe_selection"]().nodes
    declared = [node if n.id == node.id else n for n in basic]
    with pytest.raises(bw.WorkflowError, match=message):
        bw.build("bad", bw.Workflow(declared), schemas)


def test_generator_rejects_unknown_nodes_and_cycles(schemas):
    with pytest.raises(KeyError, match="unknown node type ProbeSelectNoSuchNode"):
        bw.build("bad", bw.Workflow([bw.Node(1, "ProbeSelectNoSuchNode", {})]), schemas)
    cycle = [bw.Node(1, "VAEDecode", {"samples": (2, 0), "vae": (3, 2)}),
             bw.Node(2, "VAEEncode", {"pixels": (1, 0), "vae": (3, 2)}),
             bw.Node(3, "CheckpointLoaderSimple", {"ckpt_name": "x.safetensors"})]
    with pytest.raises(bw.WorkflowError, match="cycle"):
        bw.build("bad", bw.Workflow(cycle), schemas)


# ---- what the template browser and the missing-model check read ----------------------------------

@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_template_has_a_small_thumbnail(path):
    # Frontends 1.32-1.49 show /api/workflow_templates/<pack>/<name>.jpg on the card.
    from PIL import Image

    jpg = path.with_suffix(".jpg")
    assert jpg.is_file(), f"no thumbnail {jpg.name}; run scripts/build_workflows.py"
    with Image.open(jpg) as image:
        assert image.format == "JPEG" and image.size == (320, 240), (image.format, image.size)
    assert jpg.stat().st_size < 8_000, jpg.stat().st_size


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_template_has_a_description_and_a_note_that_opens_with_it(path):
    ui = load(path)
    description = ui["extra"].get("description", "")
    assert len(description) > 60, description
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert len(notes) == 1 and description in notes[0]["widgets_values"][0], path.stem


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_template_opens_readable(path):
    ds = load(path)["extra"]["ds"]
    assert ds["scale"] >= bw.MIN_OPENING_SCALE and list(ds["offset"]) == list(bw.OPENING_OFFSET), ds


@pytest.mark.parametrize("path", [ui_param(p) for p in UI_FILES])
def test_every_model_file_has_download_metadata(path, schemas):
    """Each widget that names a model file carries {name, directory[, url]} in its node's
    properties.models, as the frontend's missing-model check reads it; URLs are public Hugging Face
    downloads of exactly that file, which the frontend's dialog accepts (https://huggingface.co/,
    .safetensors)."""
    for node in load(path)["nodes"]:
        names = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v.endswith(MODEL_FILE_SUFFIXES)]
        models = (node.get("properties") or {}).get("models", [])
        directory = {"CheckpointLoaderSimple": "checkpoints", "ProbeSelectLoadProbe": "probes",
                     "ProbeSelectCLIPScore": "evaluators", "ProbeSelectLoadInception": "inception"}.get(node["type"])
        if directory in ("probes", "inception"):
            # probes: trained by the user, no public file; the FID Inception: a GitHub release .pth, which
            # the dialog does not take. An entry without a url makes frontend 1.32.9 reject the workflow.
            assert models == [], (node["id"], models)
            continue
        assert [m["name"] for m in models] == names, (node["id"], names, models)
        for model in models:
            assert model["directory"] == directory, model
            assert model["url"].startswith("https://huggingface.co/") and "/resolve/main/" in model["url"]
            assert model["url"].endswith(".safetensors"), model
