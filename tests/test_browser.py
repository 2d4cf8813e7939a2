"""The pack in a real browser: the ComfyUI web UI in headless Chromium, driven by Playwright.

A real ComfyUI server on loopback (tests/server_utils.py) with the tiny SD1.x checkpoint and a small
probe (the same fixtures as tests/test_server.py). Chromium is the Debian package (/usr/bin/chromium),
Playwright the PyPI package without its own browser download. Screenshots go to out/browser/.

Skipped when Chromium or Playwright is missing, except in CI (CI=true), where that fails.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

import pytest

import test_server as server_tests
from devtools import stand_ins
from server_utils import ComfyServer
from test_server import FEATURE_SIZE, PROBE_NAME, parse_scores_text

# The tiny checkpoint and the tap its probe is written for, as tests/test_server.py makes them.
tiny_checkpoint = server_tests.tiny_checkpoint
auto_tap = server_tests.auto_tap

pytestmark = [pytest.mark.server, pytest.mark.browser]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "out" / "browser"
CACHE_DIR = Path(os.environ.get("PROBE_SELECT_TEST_CACHE", ROOT / "bench" / "cache"))
CHROMIUM = os.environ.get("PROBE_SELECT_CHROMIUM", "/usr/bin/chromium")
# Another frontend build to test against (its static/ folder), e.g. comfyui-frontend-package 1.49.6.
FRONTEND_ROOT = os.environ.get("PROBE_SELECT_FRONTEND_ROOT")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PACK_URL = "/extensions/probe-select/"
FRONTEND_ONLY = {"MarkdownNote", "Note"}
SEED, CANDIDATES, KEEP, SIZE, STEPS = 42, 4, 2, 64, 10
# Node ids of the probe-selection example workflow (workflows/build_workflows.py).
CKPT, LATENT, TAP, EARLY, LOAD_PROBE, SCORE, TOPK, RESUME, SAVE = 1, 4, 5, 6, 7, 8, 9, 10, 12


def example_workflows() -> list[Path]:
    """The UI-format example workflows (example_workflows/ where it exists, else workflows/)."""
    for folder in ("example_workflows", "workflows"):
        files = sorted((ROOT / folder).glob("*.json"))
        if files:
            return files
    return []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _require_browser():
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package (requirements-dev.txt)")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "browser tests need " + " and ".join(missing) + "; scripts/setup_env.sh installs them"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _blend_template() -> dict:
    return json.loads((example_workflows()[0].parent / "SD1.5_probe_plus_x0_preview_blend_selection.json").read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, auto_tap, browser):
    base = tmp_path_factory.mktemp("comfy_browser")
    srv = ComfyServer(base, extra_args=["--front-end-root", FRONTEND_ROOT] if FRONTEND_ROOT else [])
    srv.add_model("checkpoints", tiny_checkpoint)
    server_tests._write_probe(srv.model_dir("probes") / PROBE_NAME, *auto_tap)
    # the blend template's CLIPScore weights: the open_clip stand-in under the template's file name
    (clip,) = [n for n in _blend_template()["nodes"] if n["type"] == "ProbeSelectCLIPScore"]
    arch, weights = clip["widgets_values"][:2]
    srv.model_dir("evaluators").mkdir(parents=True, exist_ok=True)
    srv.add_model("evaluators", stand_ins.cached_open_clip_stand_in(arch, CACHE_DIR), weights)
    with srv:
        yield srv


class Page:
    """One browser tab on the server's web UI, with the console messages it logged."""

    def __init__(self, browser, server: ComfyServer):
        self.server = server
        self.context = browser.new_context(viewport={"width": 1500, "height": 950})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        self.page = self.context.new_page()
        self.console: list[dict] = []
        self.page.on("console", lambda m: self.console.append(
            {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        self.page.on("pageerror", lambda e: self.console.append({"type": "pageerror", "text": str(e), "url": ""}))
        self.page.goto(server.url + "/", wait_until="domcontentloaded")
        self.page.wait_for_function(
            "() => window.app?.graph && app.extensions?.some(e => e.name === 'ProbeSelect.PickCandidates')"
            " && (app.graph.nodes ?? app.graph._nodes).length > 0",     # the start-up workflow is in
            timeout=60_000)
        # The toolbar renders after the graph: then the frontend's start-up is over.
        self.page.get_by_role("button", name="Run", exact=True).first.wait_for(state="visible", timeout=30_000)

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def pack_messages(self) -> list[dict]:
        """Errors and warnings from the pack's js, and frontend notices about APIs it must not use."""
        bad = []
        for m in self.console:
            ours = PACK_URL in m["url"] or PACK_URL in m["text"] or "Probe-Select" in m["text"]
            notice = "internal module" in m["text"] or "is deprecated" in m["text"] and "inputEl" in m["text"]
            if (m["type"] in ("error", "warning", "pageerror") and ours) or notice:
                bad.append(m)
        return bad

    def alerts(self) -> list[str]:
        """The frontend's warning and error toasts now shown (e.g. a workflow its schema rejects), then closed."""
        texts = self.js("""() => [...document.querySelectorAll('.p-toast-message-warn, .p-toast-message-error')]
                           .map(t => t.textContent.trim())""")
        self.js("() => document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach(b => b.click())")
        return texts

    def load(self, workflow: dict) -> None:
        self.js("async (wf) => { await app.loadGraphData(wf); }", workflow)
        ids = [node["id"] for node in workflow["nodes"]]
        self.page.wait_for_function("(ids) => ids.every(id => app.graph.getNodeById(id))", arg=ids, timeout=10_000)

    def show_node(self, node_id: int, left: int = 90, top: int = 170) -> None:
        """Zoom 1 with the node near the top left corner, clear of the sidebar."""
        self.js("""([id, left, top]) => {
            const node = app.graph.getNodeById(id);
            app.canvas.ds.scale = 1;
            app.canvas.ds.offset = [left - node.pos[0], top - node.pos[1]];
            app.canvas.setDirty(true, true);
        }""", [node_id, left, top])
        self.page.wait_for_timeout(300)

    def screenshot(self, name: str) -> Path:
        """out/browser/<name>; under frontend-<version>/ when the server runs another frontend build."""
        folder = SHOTS
        if FRONTEND_ROOT:
            version = self.js('() => window.__COMFYUI_FRONTEND_VERSION__ ?? "other"')
            folder = SHOTS / f"frontend-{version}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        self.page.screenshot(path=str(path))
        return path

    def click_run(self) -> None:
        """The toolbar's Run button (rendered a moment after the graph), not the sidebar's queue tab."""
        button = self.page.get_by_role("button", name="Run", exact=True).first
        button.wait_for(state="visible", timeout=30_000)
        button.click()

    def click_cancel(self) -> None:
        """The toolbar's button that interrupts the running prompt."""
        button = self.page.locator("button[aria-label='Cancel current run'], button[aria-label='Cancel Run'], "
                                   "button[aria-label='Interrupt']").first
        button.wait_for(state="visible", timeout=10_000)
        button.click()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, server):
    tab = Page(browser, server)
    yield tab
    tab.close()


# ---- what a loaded workflow must satisfy ------------------------------------------------------

GRAPH_PROBLEMS = """(wf) => {
  const problems = [];
  const registered = LiteGraph.registered_node_types;
  // Node ids are numbers in frontend 1.32, strings in 1.49.
  const loaded = new Map((app.graph.nodes ?? app.graph._nodes).map(n => [String(n.id), n]));
  for (const n of wf.nodes) {
    if (!(n.type in registered)) problems.push(`node ${n.id}: missing node type ${n.type}`);
    const live = loaded.get(String(n.id));
    // (Not has_errors: frontend 1.49 also sets it for a model file the server does not have.)
    if (!live) problems.push(`node ${n.id} (${n.type}) was not loaded`);
  }
  const byId = new Map(wf.nodes.map(n => [n.id, n]));
  for (const [id, from, fromSlot, to, toSlot, type] of wf.links ?? []) {
    const source = byId.get(from), target = byId.get(to);
    if (!source || !target) { problems.push(`link ${id}: node ${source ? to : from} does not exist`); continue; }
    const output = source.outputs?.[fromSlot], input = target.inputs?.[toSlot];
    if (!output || !(output.links ?? []).includes(id)) problems.push(`link ${id}: output ${fromSlot} of node ${from} does not list it`);
    if (!input || input.link !== id) { problems.push(`link ${id}: input ${toSlot} of node ${to} does not hold it`); continue; }
    const liveTarget = loaded.get(String(to)), liveSource = loaded.get(String(from));
    const inType = liveTarget?.inputs?.find(i => i.name === input.name)?.type;
    const outType = liveSource?.outputs?.[fromSlot]?.type;
    if (!inType || !outType || !LiteGraph.isValidConnection(outType, inType))
      problems.push(`link ${id}: ${outType} output of node ${from} can't feed ${input.name} (${inType}) of node ${to}`);
    const links = app.graph.links;
    const live = links instanceof Map ? (links.get(id) ?? links.get(String(id))) : links?.[id];
    if (!live) problems.push(`link ${id} was dropped by the frontend`);
  }
  return problems;
}"""


OPENING_VIEW = """() => {
  const canvas = app.canvas, rect = canvas.canvas.getBoundingClientRect();
  const nodes = app.graph.nodes ?? app.graph._nodes;
  const left = Math.min(...nodes.map(n => n.pos[0]));
  const bar = document.querySelector('.side-tool-bar-container');
  return {scale: canvas.ds.scale, lowQuality: !!canvas.low_quality,
          leftmost: rect.left + (left + canvas.ds.offset[0]) * canvas.ds.scale,
          sidebarRight: bar ? bar.getBoundingClientRect().right : rect.left};
}"""


def _load_and_check(page: Page, workflow: dict) -> list[str]:
    page.load(workflow)
    problems = page.js(GRAPH_PROBLEMS, workflow)
    page.page.wait_for_timeout(300)                      # toasts are shown a moment after the load
    return problems + [f"frontend alert: {text}" for text in page.alerts()]


# ---- tests ------------------------------------------------------------------------------------

def test_every_example_workflow_loads_cleanly(page):
    files = example_workflows()
    assert files, "no example workflows found"
    for path in files:
        workflow = json.loads(path.read_text())
        problems = _load_and_check(page, workflow)
        assert problems == [], f"{path.name}: {problems}"
        # Every node the file names is in the graph, with its widget values.
        assert page.js("() => (app.graph.nodes ?? app.graph._nodes).length") == len(workflow["nodes"]), path.name
        page.page.wait_for_timeout(200)                  # one frame drawn at the workflow's own view
        view = page.js(OPENING_VIEW)
        assert not view["lowQuality"], f"{path.name} opens at zoom {view['scale']}, too small for any text"
        assert view["leftmost"] >= view["sidebarRight"], f"{path.name}: its first column is under the sidebar {view}"
        page.screenshot(f"open_{path.stem}.png")
    page.page.wait_for_timeout(300)
    assert page.pack_messages() == [], page.pack_messages()


@pytest.fixture
def broken_workflow() -> dict:
    """The selection workflow with a node type that does not exist and a link into the wrong input."""
    workflow = json.loads((example_workflows()[0].parent / "SD1.5_probe_selection.json").read_text())
    broken = copy.deepcopy(workflow)
    node = next(n for n in broken["nodes"] if n["id"] == TOPK)
    node["type"] = "ProbeSelectNoSuchNode"
    # The MODEL link into the early sampler now claims to feed its 'positive' (CONDITIONING) input.
    link = next(link for link in broken["links"] if link[3] == EARLY and link[4] == 0)
    early = next(n for n in broken["nodes"] if n["id"] == EARLY)
    early["inputs"][0]["link"], early["inputs"][1]["link"] = None, link[0]
    link[4] = 1
    return broken


def test_a_broken_workflow_is_caught(page, broken_workflow):
    problems = _load_and_check(page, broken_workflow)
    assert any("missing node type ProbeSelectNoSuchNode" in p for p in problems), problems
    assert any("can't feed positive (CONDITIONING)" in p for p in problems), problems
    page.js("() => document.querySelectorAll('.p-dialog-mask, .p-dialog').forEach(d => d.remove())")


def _selection_workflow(tiny_checkpoint: Path) -> dict:
    """The probe-selection example scaled down for the tiny checkpoint (UI format)."""
    workflow = json.loads((example_workflows()[0].parent / "SD1.5_probe_selection.json").read_text())
    return _scaled_down(workflow, tiny_checkpoint)


def _scaled_down(workflow: dict, tiny_checkpoint: Path) -> dict:
    """A selection example (UI format) with the tiny checkpoint, the test's sizes and the test's probe."""
    values = {CKPT: {0: tiny_checkpoint.name}, LATENT: {0: SIZE, 1: SIZE}, TAP: {1: FEATURE_SIZE},
              EARLY: {0: SEED, 2: CANDIDATES, 3: STEPS}, LOAD_PROBE: {0: PROBE_NAME}, TOPK: {0: KEEP}}
    for node in workflow["nodes"]:
        for index, value in values.get(node["id"], {}).items():
            node["widgets_values"][index] = value
    return workflow


def _wait_for_new_prompt(server: ComfyServer, before: set, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = server.history()
        new = [entry for key, entry in history.items() if key not in before]
        done = [e for e in new if (e.get("status") or {}).get("status_str") in ("success", "error")]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no prompt finished within {timeout} s\n{server.log_tail()}")


TILES = """(id) => {
  const node = app.graph.getNodeById(id);
  const widget = node.widgets?.find(w => w.name === 'probe_select_gallery');
  if (!widget) return null;
  return [...widget.element.querySelectorAll('.probe-select-tile')].map(t => {
    const img = t.querySelector('img');
    return {index: +t.dataset.index, seed: +t.dataset.seed, state: t.dataset.state,
            prunedAt: t.dataset.prunedAt ? +t.dataset.prunedAt : null,
            caption: t.querySelector('.probe-select-caption').textContent,
            stages: [...t.querySelectorAll('.probe-select-stage-score')].map(line => line.textContent),
            badge: t.querySelector('.probe-select-badge').textContent,
            overflows: t.scrollHeight > t.clientHeight + 1,
            opacity: getComputedStyle(t).opacity, loaded: !!img && img.complete && img.naturalWidth > 0};
  });
}"""

SCORES_BOX = """(id) => {
  const node = app.graph.getNodeById(id);
  const widget = node.widgets?.find(w => w.name === 'probe_select_scores');
  if (!widget) return null;
  const el = widget.element;
  const rect = el.getBoundingClientRect();
  return {text: el.textContent, clipped: el.scrollHeight > el.clientHeight + 1 || el.scrollWidth > el.clientWidth + 1,
          height: rect.height, nodeHeight: node.size[1], visible: rect.height > 0 && getComputedStyle(el).display !== 'none'};
}"""


def test_selection_run_shows_scores_gallery_and_marks(page, server, tiny_checkpoint):
    page.load(_selection_workflow(tiny_checkpoint))
    before = set(server.history())
    page.click_run()
    entry = _wait_for_new_prompt(server, before)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    _, ranking = parse_scores_text(entry["outputs"][str(TOPK)]["text"][0])

    page.show_node(SCORE)
    page.page.wait_for_function(f"() => ({TILES})({TOPK})?.every(t => t.loaded)", timeout=20_000)
    tiles = page.js(TILES, TOPK)
    # Best first, one tile per candidate, the K best kept, the others greyed.
    assert [t["index"] for t in tiles] == [r["candidate"] for r in ranking]
    assert [t["seed"] for t in tiles] == [SEED + r["candidate"] for r in ranking]
    assert [t["state"] for t in tiles] == ["kept"] * KEEP + ["pruned"] * (CANDIDATES - KEEP)
    assert all(float(t["opacity"]) < 0.5 for t in tiles[KEEP:]) and all(t["opacity"] == "1" for t in tiles[:KEEP])
    assert [t["caption"].split()[1] for t in tiles] == [f"{r['score']:.4f}" for r in ranking]
    assert page.js(TILES, EARLY) and len(page.js(TILES, EARLY)) == CANDIDATES    # previews on the early sampler

    for node in (SCORE, TOPK):
        box = page.js(SCORES_BOX, node)
        assert box and box["visible"], f"no scores shown on node {node}"
        assert len(box["text"].splitlines()) == CANDIDATES + 1 and not box["clipped"], box
    shot = page.screenshot("gallery.png")

    # A seed is copied, and sent to a KSampler's seed widget (with its control set to fixed).
    best_seed = tiles[0]["seed"]
    page.js(f"""() => app.graph.getNodeById({TOPK}).widgets.find(w => w.name === 'probe_select_gallery')
                 .element.querySelector('.probe-select-tile button').click()""")
    page.page.wait_for_timeout(200)
    assert page.js("() => navigator.clipboard.readText()") == str(best_seed)
    sampler_seed = page.js(f"""() => {{
        const k = LiteGraph.createNode('KSampler'); k.pos = [100, 900]; app.graph.add(k);
        app.graph.getNodeById({TOPK}).widgets.find(w => w.name === 'probe_select_gallery')
           .element.querySelectorAll('.probe-select-tile button')[1].click();
        const seed = k.widgets.find(w => w.name === 'seed').value;
        const control = k.widgets.find(w => w.name === 'control_after_generate').value;
        app.graph.remove(k);
        return [seed, control];
    }}""")
    assert sampler_seed == [best_seed, "fixed"]

    # Nothing shown is saved: not in the workflow, not in the prompt.
    saved = page.js("() => JSON.stringify(app.graph.serialize())")
    assert "predicted" not in saved and "candidate 0" not in saved and "probe_select_x0" not in saved
    topk = next(n for n in json.loads(saved)["nodes"] if n["id"] == TOPK)
    assert [v for v in topk["widgets_values"] if v is not None] == [KEEP]
    prompt = page.js("async () => JSON.stringify((await app.graphToPrompt()).output)")
    assert "probe_select_scores" not in prompt and "probe_select_gallery" not in prompt
    assert page.pack_messages() == [], page.pack_messages()
    log.info("gallery screenshot: %s", shot)


GALLERY_PART = """([id, selector]) => {
  const element = app.graph.getNodeById(id).widgets.find(w => w.name === 'probe_select_gallery').element;
  const part = selector ? element.querySelector(selector) : element;
  return part && {text: part.textContent, rect: part.getBoundingClientRect().toJSON()};
}"""

ONE_BOX = 6        # ProbeSelectSampler in the one-box example workflow (same ids as above for the others)
# Two stages, both scored by the one probe (t = 0.2; 0.3 is within its tolerance): 4 -> 3 -> 2.
SCHEDULE, SCHEDULE_STOPS, SCHEDULE_KEPT = "0.2->3, 0.3->2", (2, 3), (3, 2)


def test_blend_run_shows_the_blended_ranking(page, server, tiny_checkpoint):
    """The probe + x0 preview template, run from the UI: the blend node shows its ranking, and Top-K's gallery
    keeps the blend's best."""
    workflow = _scaled_down(_blend_template(), tiny_checkpoint)
    (blend,) = [n["id"] for n in workflow["nodes"] if n["type"] == "ProbeSelectBlendScores"]
    page.load(workflow)
    before = set(server.history())
    page.click_run()
    entry = _wait_for_new_prompt(server, before)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    header, ranking = parse_scores_text(entry["outputs"][str(blend)]["text"][0])
    assert header.startswith("blend w=0.70 ") and len(ranking) == CANDIDATES
    page.show_node(blend)
    box = page.js(SCORES_BOX, blend)
    assert box and box["visible"] and not box["clipped"], box
    assert box["text"].splitlines()[1].split()[:3] == ["#1", "candidate", str(ranking[0]["candidate"])], box
    page.page.wait_for_function(f"() => ({TILES})({TOPK})?.every(t => t.loaded)", timeout=20_000)
    tiles = page.js(TILES, TOPK)
    assert [t["index"] for t in tiles] == [r["candidate"] for r in ranking]
    assert [t["state"] for t in tiles] == ["kept"] * KEEP + ["pruned"] * (CANDIDATES - KEEP)
    log.info("blend screenshot: %s", page.screenshot("blend.png"))


def _one_box_workflow(tiny_checkpoint: Path, schedule: str) -> dict:
    """The one-box example (ProbeSelectSampler) scaled down for the tiny checkpoint, with a schedule."""
    workflow = json.loads((example_workflows()[0].parent / "SD1.5_probe_selection_one_box.json").read_text())
    values = {CKPT: {0: tiny_checkpoint.name}, LATENT: {0: SIZE, 1: SIZE}, LOAD_PROBE: {0: PROBE_NAME},
              ONE_BOX: {0: SEED, 2: CANDIDATES, 4: STEPS, 10: schedule}}
    for node in workflow["nodes"]:
        for index, value in values.get(node["id"], {}).items():
            node["widgets_values"][index] = value
    return workflow


def test_staged_run_shows_each_stage_and_fate(page, server, tiny_checkpoint):
    """ProbeSelectSampler pruning in two stages: each tile shows the score of every stage that scored it and
    the stage that pruned it; the finished candidates are the ones marked kept."""
    page.load(_one_box_workflow(tiny_checkpoint, SCHEDULE))
    before = set(server.history())
    page.click_run()
    entry = _wait_for_new_prompt(server, before)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    shown = entry["outputs"][str(ONE_BOX)]["probe_select_gallery"][0]
    assert [(s["step"], len(s["kept"])) for s in shown["stages"]] == list(zip(SCHEDULE_STOPS, SCHEDULE_KEPT))

    page.show_node(ONE_BOX)
    page.page.wait_for_function(f"() => ({TILES})({ONE_BOX})?.every(t => t.loaded)", timeout=20_000)
    tiles = page.js(TILES, ONE_BOX)
    # All N first-stage candidates (with their x0 previews): 2 finished, 1 pruned at stage 2, 1 at stage 1, in
    # that order, each fate as the payload says.
    assert [(t["state"], t["prunedAt"]) for t in tiles] == [("kept", None)] * 2 + [("pruned", 2), ("pruned", 1)]
    assert [t["badge"] for t in tiles] == ["kept", "kept", "pruned at 2", "pruned at 1"]
    assert sorted(t["seed"] for t in tiles[:2]) == sorted(shown["seeds"][i] for i in shown["kept"])
    assert all(shown["pruned_at"][t["index"]] == t["prunedAt"] for t in tiles)
    for tile in tiles:
        expected = [f"stage {stage['number']}  {stage['scores'][stage['seeds'].index(tile['seed'])]:.4f}"
                    for stage in shown["stages"] if tile["seed"] in stage["seeds"]]
        assert tile["stages"] == expected and len(expected) == (tile["prunedAt"] or len(shown["stages"])), tile
        assert not tile["overflows"], tile
    assert all(float(t["opacity"]) < 0.5 for t in tiles[2:]) and all(t["opacity"] == "1" for t in tiles[:2])
    header = page.js(GALLERY_PART, [ONE_BOX, ".probe-select-stages"])["text"]
    assert header.splitlines() == [f"Stage 1 at step 2 of {STEPS} (t 0.20): {CANDIDATES} → 3 kept",
                                   f"Stage 2 at step 3 of {STEPS} (t 0.30): 3 → 2 kept"]
    # The node is tall (every widget, the ranking text): scroll its gallery into the screenshot.
    page.show_node(ONE_BOX, top=170 - round(page.js(GALLERY_PART, [ONE_BOX, None])["rect"]["top"] - 400))
    box = page.js(GALLERY_PART, [ONE_BOX, None])["rect"]
    assert box["top"] >= 0 and box["bottom"] <= page.page.viewport_size["height"], box
    shot = page.screenshot("gallery_stages.png")
    assert shot.stat().st_size > 0
    log.info("staged gallery screenshot: %s", shot)

    assert page.pack_messages() == [], page.pack_messages()


SWAP_TOPK_FOR_PICK = """([topk, early, score, resume, timeout]) => {
  const old = app.graph.getNodeById(topk);
  const pick = LiteGraph.createNode('ProbeSelectPickCandidates');
  pick.pos = [...old.pos];
  app.graph.remove(old);
  app.graph.add(pick);
  const input = (node, name) => node.inputs.findIndex(i => i.name === name);
  app.graph.getNodeById(early).connect(0, pick, input(pick, 'early_latent'));
  app.graph.getNodeById(score).connect(0, pick, input(pick, 'scores'));
  pick.connect(0, app.graph.getNodeById(resume), input(app.graph.getNodeById(resume), 'latent'));
  pick.widgets.find(w => w.name === 'keep').value = 2;
  pick.widgets.find(w => w.name === 'timeout').value = timeout;
  return pick.id;
}"""


# The pick node's own gallery part (the early sampler's node shows the same tiles), found through its widget.
PICK_PART = """([id, selector]) => app.graph.getNodeById(id).widgets.find(w => w.name === 'probe_select_gallery')
                 .element.querySelector(selector)"""

# Whether the countdown leaves the Finish button and the tiles in place while it ticks (a click in progress
# on an element replaced under it is lost), and the label's text before and after a tick.
COUNTDOWN_KEEPS_ELEMENTS = """(id) => new Promise(resolve => {
  const part = (selector) => (""" + PICK_PART + """)([id, selector]);
  const finish = part('.probe-select-pick-finish'), tile = part('.probe-select-tile'),
        before = part('.probe-select-pick-header span').textContent;
  setTimeout(() => resolve({
    before, after: part('.probe-select-pick-header span').textContent,
    kept: finish.isConnected && tile.isConnected && part('.probe-select-pick-finish') === finish}), 2500);
})"""


def test_pause_and_pick_by_clicks(page, server, tiny_checkpoint):
    page.load(_selection_workflow(tiny_checkpoint))
    # A node timeout well past the test's own waits: a slow machine must not time the pause out before Finish.
    pick_id = page.js(SWAP_TOPK_FOR_PICK, [TOPK, EARLY, SCORE, RESUME, 300])
    listening = "() => app.extensions.find(e => e.name === 'ProbeSelect.PickCandidates').listening"
    assert page.js(listening) == 1
    before = set(server.history())
    page.click_run()

    page.page.wait_for_selector(".probe-select-pick-finish", timeout=60_000)
    page.show_node(pick_id)
    page.page.wait_for_function(f"() => ({TILES})({pick_id})?.every(t => t.loaded)", timeout=20_000)
    tiles = page.js(TILES, pick_id)
    # Paused: the top 2 by score are preselected; the worst two are what we pick instead.
    assert [t["state"] for t in tiles] == ["picked"] * 2 + ["open"] * (CANDIDATES - 2)
    waiting = server.request("GET", "/probe_select/pick")["waiting"]
    assert [w["node_id"] for w in waiting] == [str(pick_id)] and waiting[0]["candidates"] == CANDIDATES
    worst = [tiles[-1]["index"], tiles[-2]["index"]]
    # The pick node's own tiles (the early sampler's node shows the same previews): a click on the picture
    def click_tile(index):
        page.js(f"(arg) => ({PICK_PART})(arg).click()", [pick_id, f".probe-select-tile[data-index='{index}'] img"])
    for t in tiles[:2]:
        click_tile(t["index"])              # unpick the preselected ones
    for index in worst:
        click_tile(index)
    page.page.wait_for_timeout(200)
    assert sorted(t["index"] for t in page.js(TILES, pick_id) if t["state"] == "picked") == sorted(worst)
    page.screenshot("pick_paused.png")
    # The countdown ticks in the label only: the button and the tiles under the pointer stay the same elements.
    countdown = page.js(COUNTDOWN_KEEPS_ELEMENTS, pick_id)
    assert countdown["kept"] and countdown["after"] != countdown["before"], countdown
    # The pick node's own Finish button, clicked with the mouse (Playwright waits until it is enabled and hit).
    page.page.evaluate_handle(PICK_PART, [pick_id, ".probe-select-pick-finish"]).as_element().click()
    accepted_by = time.monotonic() + 30
    while server.request("GET", "/probe_select/pick")["waiting"] and time.monotonic() < accepted_by:
        time.sleep(0.2)
    assert server.request("GET", "/probe_select/pick")["waiting"] == [], ("the pick never reached the server",
                                                                        page.pack_messages())

    entry = _wait_for_new_prompt(server, before)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    shown = entry["outputs"][str(pick_id)]["probe_select_gallery"][0]
    expected_order = [t["index"] for t in tiles if t["index"] in worst]      # best first among the picked
    assert shown["mode"] == "picked" and shown["kept"] == expected_order
    images = entry["outputs"][str(SAVE)]["images"]
    assert len(images) == 2
    # The saved images come from the picked seeds: SaveImage records the prompt, the pick node the seeds.
    assert server.request("GET", "/probe_select/pick")["waiting"] == []

    page.page.wait_for_function(f"() => ({TILES})({pick_id})?.filter(t => t.state === 'kept').length === 2")
    after = page.js(TILES, pick_id)
    assert sorted(t["index"] for t in after if t["state"] == "kept") == sorted(worst)
    page.screenshot("pick_done.png")

    page.js(f"() => app.graph.remove(app.graph.getNodeById({pick_id}))")
    assert page.js(listening) == 0
    assert page.pack_messages() == [], page.pack_messages()


def test_cancel_during_a_pause_leaves_the_server_clean(page, server, tiny_checkpoint):
    page.load(_selection_workflow(tiny_checkpoint))
    pick_id = page.js(SWAP_TOPK_FOR_PICK, [TOPK, EARLY, SCORE, RESUME, 300])
    before = set(server.history())
    page.click_run()
    page.page.wait_for_selector(".probe-select-pick-finish", timeout=60_000)
    assert [w["node_id"] for w in server.request("GET", "/probe_select/pick")["waiting"]] == [str(pick_id)]
    started = time.monotonic()
    page.click_cancel()
    entry = _wait_for_new_prompt(server, before, timeout=30)
    assert time.monotonic() - started < 10
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]["messages"]
    assert server.request("GET", "/probe_select/pick")["waiting"] == []
    # The gallery leaves the pick mode: no Finish button, no picked marks.
    page.page.wait_for_selector(".probe-select-pick-finish", state="detached", timeout=10_000)
    assert all(t["state"] == "early" for t in page.js(TILES, pick_id))
    assert page.pack_messages() == [], page.pack_messages()


def test_a_missing_browser_skips_here_and_fails_in_ci(monkeypatch):
    monkeypatch.setitem(globals(), "CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium at /nonexistent/chromium"):
        _require_browser()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Chromium at /nonexistent/chromium"):
        _require_browser()
