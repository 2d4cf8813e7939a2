"""The command line (`python -m tools.cli`): collect with running ComfyUI servers, train, evaluate.

Unit tests (no ComfyUI): prompt files (plain and MS-COCO captions), workflow checks and filling,
per-prompt seeds, reading which prompts a dataset holds, the worker loop's retry on another server,
and `collect()` end to end against small fake ComfyUI HTTP servers that write real dataset shards.

Acceptance test (marked `server`): two real ComfyUI servers on loopback share one
`--output-directory`; the collect CLI runs as a subprocess over 8 prompts, is killed half way, and
runs again to completion. Every prompt must then be in the dataset exactly once with its
`candidates` rows, both servers must have worked, and `train` and `evaluate` must run on the result.
The workflow is the test's own (below); its scorer is the test-only node pack in
tests/custom_nodes/probe_select_test_nodes, installed on the test servers only.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from tools import collect as C
from probe_select.probes.training.dataset import (
    CandidateRows,
    DatasetManifest,
    DatasetWriter,
    ProbeDataset,
    list_shards,
    prompt_id,
    split_by_prompt,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEST_NODES = Path(__file__).resolve().parent / "custom_nodes" / "probe_select_test_nodes"
CACHE_DIR = Path(os.environ.get("PROBE_SELECT_TEST_CACHE", ROOT / "bench" / "cache"))

CANDIDATES = 2
STEPS = 6
N_PROMPTS = 8
EVALUATOR = "brightness"

# The test's collect workflow (API format). ckpt_name is set per test; {prompt} and dataset_name,
# seed and candidates are what the CLI fills.
CKPT, POS, NEG, LATENT, TAP, SAMPLER, DECODE, BRIGHT, SCORES, WRITER = "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"
WORKFLOW = {
    CKPT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    POS: {"class_type": "CLIPTextEncode", "inputs": {"clip": [CKPT, 1], "text": "{prompt}"}},
    NEG: {"class_type": "CLIPTextEncode", "inputs": {"clip": [CKPT, 1], "text": "blurry, low quality"}},
    LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    TAP: {"class_type": "ProbeSelectTap", "inputs": {"model": [CKPT, 0], "block": "auto", "feature_size": 4}},
    SAMPLER: {"class_type": "ProbeSelectCollectSampler", "inputs": {
        "model": [TAP, 0], "positive": [POS, 0], "negative": [NEG, 0], "latent_image": [LATENT, 0], "seed": 0,
        "candidates": 1, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "checkpoint_percents": "0.2,0.5", "denoise": 1.0}},
    DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": [CKPT, 2]}},
    BRIGHT: {"class_type": "ProbeSelectTestBrightness", "inputs": {"images": [DECODE, 0]}},
    SCORES: {"class_type": "ProbeSelectScoresFromFloats", "inputs": {
        "scores": [BRIGHT, 0], "evaluator_name": EVALUATOR, "prompt": "{prompt}"}},
    WRITER: {"class_type": "ProbeSelectDatasetWriter", "inputs": {
        "activations": [SAMPLER, 1], "scores": [SCORES, 0], "prompt": "{prompt}", "dataset_name": "from_workflow"}},
}
WORKFLOW_CLASSES = sorted({node["class_type"] for node in WORKFLOW.values()})


# ---- prompts -----------------------------------------------------------------------------------

def test_load_prompts_plain_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\n\n  a blue dog  \na red cat\r\nA red cat\n\t\nthe {moon} at 50% \u00e9t\u00e9\n",
                    encoding="utf-8")
    assert C.load_prompts(path) == ["a red cat", "a blue dog", "A red cat", "the {moon} at 50% \u00e9t\u00e9"]
    assert C.load_prompts(path, limit=2) == ["a red cat", "a blue dog"]
    assert C.load_prompts(path, limit=0) == []
    with pytest.raises(C.CollectError, match="cannot read"):
        C.load_prompts(tmp_path / "missing.txt")


def test_load_coco_captions(tmp_path):
    coco = {
        "info": {"description": "COCO 2017"},
        "images": [{"id": 1, "file_name": "000000000001.jpg"}],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A man riding a wave on top of a surfboard.\n"},
            {"image_id": 1, "id": 11, "caption": "  A kitchen  with\na stove. "},
            {"image_id": 2, "id": 12, "caption": "A man riding a wave on top of a surfboard."},
            {"image_id": 2, "id": 13, "caption": "   "},
            {"image_id": 3, "id": 14},
            {"image_id": 3, "id": 15, "caption": "Two dogs."},
        ],
    }
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps(coco))
    expected = ["A man riding a wave on top of a surfboard.", "A kitchen with a stove.", "Two dogs."]
    assert C.load_coco_captions(path) == expected
    assert C.load_coco_captions(path, limit=2) == expected[:2]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(C.CollectError, match="annotations"):
        C.load_coco_captions(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(C.CollectError, match="not valid JSON"):
        C.load_coco_captions(tmp_path / "broken.json")


# ---- workflow ----------------------------------------------------------------------------------

def test_fill_workflow_sets_prompt_seed_candidates_and_dataset():
    template = copy.deepcopy(WORKFLOW)
    template[NEG]["inputs"]["text"] = "not {prompt}, blurry"
    original = copy.deepcopy(template)
    info = C.check_workflow(template)
    assert info.samplers == [SAMPLER] and info.writers == [WRITER] and info.dataset_name == "from_workflow"
    assert set(info.placeholders) == {(POS, "text"), (NEG, "text"), (SCORES, "prompt"), (WRITER, "prompt")}

    prompt = 'a "quoted" {odd} prompt'
    filled = C.fill_workflow(template, prompt, seed=123, candidates=3, dataset_name="ds1")
    assert template == original, "the template was modified"
    assert filled[POS]["inputs"]["text"] == prompt
    assert filled[NEG]["inputs"]["text"] == f"not {prompt}, blurry"
    assert filled[SCORES]["inputs"]["prompt"] == prompt and filled[WRITER]["inputs"]["prompt"] == prompt
    assert filled[SAMPLER]["inputs"]["seed"] == 123 and filled[SAMPLER]["inputs"]["candidates"] == 3
    assert filled[WRITER]["inputs"]["dataset_name"] == "ds1"
    # Links and every other value are untouched.
    for node_id, node in original.items():
        for name, value in node["inputs"].items():
            if not (isinstance(value, str) and "{prompt}" in value) and (node_id, name) not in {
                    (SAMPLER, "seed"), (SAMPLER, "candidates"), (WRITER, "dataset_name")}:
                assert filled[node_id]["inputs"][name] == value, (node_id, name)
    reduced = C.fill_workflow(template, prompt, seed=1, writer_settings={"channel_reduction": "pca",
                                                                          "reduced_channels": 48})
    assert reduced[WRITER]["inputs"]["channel_reduction"] == "pca" and reduced[WRITER]["inputs"]["reduced_channels"] == 48
    assert "channel_reduction" not in filled[WRITER]["inputs"] and "channel_reduction" not in template[WRITER]["inputs"]
    # None keeps the workflow's own values.
    kept = C.fill_workflow(template, "x", seed=5)
    assert kept[SAMPLER]["inputs"]["candidates"] == 1 and kept[WRITER]["inputs"]["dataset_name"] == "from_workflow"
    assert "{prompt}" not in json.dumps(kept)


def _without(workflow: dict, node_id: str) -> dict:
    return {k: v for k, v in copy.deepcopy(workflow).items() if k != node_id}


def test_check_workflow_refuses_what_it_cannot_fill(tmp_path):
    with pytest.raises(C.WorkflowError, match="no ProbeSelectCollectSampler"):
        C.check_workflow(_without(WORKFLOW, SAMPLER))
    with pytest.raises(C.WorkflowError, match="no ProbeSelectDatasetWriter"):
        C.check_workflow(_without(WORKFLOW, WRITER))
    linked = copy.deepcopy(WORKFLOW)
    linked[SAMPLER]["inputs"]["seed"] = ["11", 0]
    with pytest.raises(C.WorkflowError, match="'seed' is linked"):
        C.check_workflow(linked)
    other_text = copy.deepcopy(WORKFLOW)
    other_text[WRITER]["inputs"]["prompt"] = "a photo of {prompt}"
    with pytest.raises(C.WorkflowError, match="must be exactly"):
        C.check_workflow(other_text)
    fixed = json.loads(json.dumps(WORKFLOW).replace("{prompt}", "a cat"))
    with pytest.raises(C.WorkflowError, match="must be exactly"):
        C.check_workflow(fixed)
    fixed[WRITER]["inputs"]["prompt"] = [POS, 0]          # linked prompt: allowed; but no placeholder left
    with pytest.raises(C.WorkflowError, match="no string input"):
        C.check_workflow(fixed)

    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(C.WorkflowError, match="UI-format"):
        C.load_workflow(ui)
    api = tmp_path / "api.json"
    api.write_text(json.dumps(WORKFLOW))
    assert C.load_workflow(api) == WORKFLOW
    with pytest.raises(C.WorkflowError, match="does not exist"):
        C.load_workflow(tmp_path / "none.json")
    with pytest.raises(C.CollectError, match="plain folder name"):
        C.check_dataset_name("../escape")


def test_seeds_are_a_function_of_the_prompt_only():
    prompts = [f"prompt number {i}" for i in range(200)]
    seeds = [C.seed_for_prompt(p) for p in prompts]
    assert seeds == [C.seed_for_prompt(p) for p in prompts]
    assert seeds[0] == int(prompt_id(prompts[0]), 16) % C.SEED_SPACE
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < C.SEED_SPACE and s + 4096 < 2**64 for s in seeds)
    assert C.seed_for_prompt("a", base_seed=7) == (C.seed_for_prompt("a") + 7) % C.SEED_SPACE
    # The filled workflow carries it.
    assert C.fill_workflow(WORKFLOW, prompts[3], seed=C.seed_for_prompt(prompts[3]))[SAMPLER]["inputs"]["seed"] == seeds[3]


# ---- what a dataset holds ----------------------------------------------------------------------

def _manifest() -> DatasetManifest:
    return DatasetManifest(backbone_family="sd1", tap="output_blocks.1.0", feature_shape=(2, 1, 1),
                           checkpoints=[0.2, 0.5], evaluators=[EVALUATOR])


def write_prompt_rows(root: Path, prompt: str, seed: int, candidates: int, writer_id: Optional[str] = None) -> None:
    rows = CandidateRows(features=torch.randn(candidates, 2, 2, 1, 1), seeds=[seed + i for i in range(candidates)],
                         prompts=[prompt] * candidates, scores={EVALUATOR: torch.rand(candidates)})
    DatasetWriter(root, _manifest(), writer_id=writer_id).append(rows)


def test_pending_prompts_from_the_dataset(tmp_path, caplog):
    root = C.dataset_dir(tmp_path / "output", "ds")
    assert root == tmp_path / "output" / "probe_select_datasets" / "ds"
    prompts = [f"prompt {i}" for i in range(6)]
    index = C.DatasetIndex(root).refresh()          # no dataset yet: nothing collected
    assert index.prompt_ids() == set()
    assert C.pending_prompts(prompts, index.prompt_ids()) == (prompts, [])

    for p in (prompts[1], prompts[4]):
        write_prompt_rows(root, p, C.seed_for_prompt(p), 2)
    (root / "shards" / ".shard-x-000000.safetensors.123.abcd.tmp").write_bytes(b"partial")   # a killed write
    index.refresh()
    assert index.prompt_ids() == {prompt_id(prompts[1]), prompt_id(prompts[4])}
    assert index.rows[prompt_id(prompts[1])] == 2 and index.shards[prompt_id(prompts[1])] == 1
    pending, skipped = C.pending_prompts(prompts, index.prompt_ids())
    assert pending == [prompts[0], prompts[2], prompts[3], prompts[5]] and skipped == [prompts[1], prompts[4]]

    # Incremental: a new shard is picked up; a damaged one is skipped with a warning (its prompt
    # counts as missing, so it is collected again).
    write_prompt_rows(root, prompts[2], 0, 2)
    (root / "shards" / "shard-zz-000000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with caplog.at_level(logging.WARNING, logger="tools.collect"):
        assert index.has_prompt(prompts[2])
    assert index.unreadable == [root / "shards" / "shard-zz-000000.safetensors"]
    assert "cannot read shard" in caplog.text
    assert not index.has_prompt(prompts[0])


# ---- the worker loop ---------------------------------------------------------------------------

def run_workers(prompts: list[str], runners: list[Callable[[str], None]], already_done=None) -> list[C.Event]:
    work = C.WorkQueue(prompts, len(runners))
    events: list[C.Event] = []
    lock = threading.Lock()

    def report(event):
        with lock:
            events.append(event)

    threads = [threading.Thread(target=C.worker_loop, args=(i, run, work, report),
                                kwargs={"already_done": already_done, "retry_delay": 0.05}, daemon=True)
               for i, run in enumerate(runners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a worker did not finish"
    return events


def test_worker_loop_retries_a_failed_prompt_once_on_another_server():
    prompts = [f"p{i}" for i in range(10)]
    ran = {0: [], 1: []}

    failed_once: set = set()
    lock = threading.Lock()

    def runner(worker: int, bad: set, unreachable: bool = False, once: frozenset = frozenset()):
        def run(prompt):
            with lock:
                ran[worker].append(prompt)
                first = prompt in once and prompt not in failed_once
                failed_once.add(prompt)
            time.sleep(0.01)
            if unreachable:
                raise C.ServerUnreachable("down")
            if prompt in bad or first:
                raise C.JobFailed(f"boom on {worker}")
        return run

    # p3 fails on the first server that runs it, p5 on both.
    once = frozenset({"p3"})
    events = run_workers(prompts, [runner(0, {"p5"}, once=once), runner(1, {"p5"}, once=once)])
    kinds = {}
    for e in events:
        kinds.setdefault(e.prompt, []).append((e.kind, e.worker))
    final = {p: k[-1][0] for p, k in kinds.items()}
    assert final == {**{p: "done" for p in prompts}, "p5": "failed"}
    assert sorted(p for w in ran.values() for p in w) == sorted(prompts + ["p3", "p5"]), "retried more than once"
    for p in ("p3", "p5"):
        (first, first_worker), (last, last_worker) = kinds[p]
        assert first == "retry" and first_worker != last_worker, kinds[p]
    assert "boom on" in [e for e in events if e.prompt == "p5" and e.kind == "failed"][0].message

    # A retry is not sent when the prompt's rows were written before the failure.
    ran = {0: [], 1: []}
    events = run_workers(["q"], [runner(0, {"q"}), runner(1, set())], already_done=lambda p: True)
    assert [(e.kind, e.message) for e in events] == [("retry", "boom on 0"), ("done", "already written")]
    assert ran == {0: ["q"], 1: []}

    # One server only: the retry goes to the same server.
    ran = {0: [], 1: []}
    events = run_workers(["r"], [runner(0, {"r"})])
    assert [e.kind for e in events] == ["retry", "failed"] and ran[0] == ["r", "r"]

    # A server that can't be reached gives its prompts back (no attempt used up) and stops after
    # three tries in a row; the other one does everything.
    ran = {0: [], 1: []}
    events = run_workers(prompts, [runner(0, set(), unreachable=True), runner(1, set())])
    assert sorted(e.prompt for e in events if e.kind == "done") == prompts
    assert [e for e in events if e.kind != "done"] == []
    assert 1 <= len(ran[0]) <= 3 and sorted(ran[1]) == prompts
    ran = {0: [], 1: []}
    slow = runner(1, set())
    events = run_workers(prompts[:4], [runner(0, set(), unreachable=True), lambda p: (time.sleep(0.2), slow(p))])
    assert len(ran[0]) == 3 and sorted(ran[1]) == prompts[:4]      # gave up after 3 (0.05 s, 0.1 s back-off)


# ---- collect() against fake ComfyUI servers ------------------------------------------------------

class FakeComfy:
    """Just enough of ComfyUI's HTTP API for collect(): /object_info/<class>, /queue, /prompt,
    /history/<id>, /interrupt. A job "runs" for `delay` seconds in a thread, then writes the rows
    its writer node would write (real shards) into `output_dir`, or fails as `fail(prompt)` says."""

    def __init__(self, output_dir: Path, delay: float = 0.05, fail: Callable[[str], Optional[str]] = lambda p: None,
                 reject: Callable[[str], bool] = lambda p: False, known=WORKFLOW_CLASSES):
        self.output_dir, self.delay, self.fail, self.reject, self.known = output_dir, delay, fail, reject, set(known)
        self.history: dict = {}
        self.queued: list[str] = []
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _run(self, job_id: str, workflow: dict) -> None:
        time.sleep(self.delay)
        writer = next(n for n in workflow.values() if n["class_type"] == "ProbeSelectDatasetWriter")["inputs"]
        sampler = next(n for n in workflow.values() if n["class_type"] == "ProbeSelectCollectSampler")["inputs"]
        prompt = writer["prompt"]
        error = self.fail(prompt)
        if error is None:
            root = self.output_dir / "probe_select_datasets" / writer["dataset_name"]
            write_prompt_rows(root, prompt, sampler["seed"], sampler["candidates"])
            status = {"status_str": "success", "completed": True, "messages": [["execution_success", {}]]}
        else:
            status = {"status_str": "error", "completed": False, "messages": [["execution_error", {
                "node_id": WRITER, "node_type": "ProbeSelectDatasetWriter", "exception_type": "ValueError",
                "exception_message": error}]]}
        with self.lock:
            self.queued.remove(job_id)
            self.history[job_id] = {"prompt": [0, job_id, workflow], "outputs": {}, "status": status}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, data) -> None:
                body = json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = urllib.parse.unquote(self.path)
                with fake.lock:
                    if path.startswith("/object_info/"):
                        name = path[len("/object_info/"):]
                        return self._send(200, {name: {}} if name in fake.known else {})
                    if path == "/queue":
                        return self._send(200, {"queue_running": [[0, j, {}, {}, []] for j in fake.queued[:1]],
                                                "queue_pending": [[0, j, {}, {}, []] for j in fake.queued[1:]]})
                    if path.startswith("/history/"):
                        job = path[len("/history/"):]
                        return self._send(200, {job: fake.history[job]} if job in fake.history else {})
                self._send(404, {})

            def do_POST(self):
                data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/prompt":
                    workflow = data["prompt"]
                    prompt = workflow[WRITER]["inputs"]["prompt"]
                    with fake.lock:
                        fake.prompts.append(prompt)
                    if fake.reject(prompt):
                        return self._send(400, {
                            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed "
                                      "validation", "details": ""},
                            "node_errors": {SAMPLER: {"class_type": "ProbeSelectCollectSampler", "errors": [
                                {"message": "Value not in list", "details": "sampler_name: 'nope'"}]}}})
                    job_id = uuid.uuid4().hex
                    with fake.lock:
                        fake.queued.append(job_id)
                    threading.Thread(target=fake._run, args=(job_id, workflow), daemon=True).start()
                    return self._send(200, {"prompt_id": job_id, "number": 0, "node_errors": {}})
                self._send(200, {})

        return Handler


@pytest.fixture
def fakes(tmp_path):
    made = []

    def make(**kwargs) -> FakeComfy:
        fake = FakeComfy(tmp_path / "output", **kwargs)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


def test_collect_with_fake_servers_resumes_and_retries_elsewhere(tmp_path, fakes, caplog):
    prompts = [f"a photo of thing {i}" for i in range(12)]
    output = tmp_path / "output"
    root = C.dataset_dir(output, "fake_ds")
    # A third of the prompts is already there (an earlier run).
    for p in prompts[::3]:
        write_prompt_rows(root, p, C.seed_for_prompt(p), CANDIDATES)
    # The first server to get "thing 4" fails while running it, the first to get "thing 7" refuses it.
    seen, lock = set(), threading.Lock()

    def first_time(suffix: str) -> Callable[[str], bool]:
        def check(prompt: str) -> bool:
            with lock:
                if prompt.endswith(suffix) and prompt not in seen:
                    seen.add(prompt)
                    return True
                return False
        return check

    fail_once, reject_once = first_time("thing 4"), first_time("thing 7")
    a = fakes(fail=lambda p: "CUDA out of memory" if fail_once(p) else None, reject=reject_once)
    b = fakes(fail=lambda p: "CUDA out of memory" if fail_once(p) else None, reject=reject_once, delay=0.08)
    with caplog.at_level(logging.INFO, logger="tools.collect"):
        summary = C.collect([a.url, b.url + "/"], prompts, WORKFLOW, candidates=CANDIDATES, dataset_name="fake_ds",
                            output_dir=output, poll=0.02, progress=False)
    assert summary.ok and summary.failed == [] and summary.not_sent == 0
    assert (summary.total, summary.skipped, summary.done) == (12, 4, 8), summary
    assert sum(summary.per_server.values()) == 8 and all(summary.per_server.values()), summary.per_server
    assert "retrying on another server" in caplog.text
    assert "CUDA out of memory" in caplog.text and "Value not in list" in caplog.text
    # Every prompt was sent once, except the two that failed: once more, to the other server.
    sent = a.prompts + b.prompts
    assert not set(sent) & set(prompts[::3]), "a prompt already in the dataset was sent"
    assert sorted(sent) == sorted([p for p in prompts if p not in prompts[::3]] + [prompts[4], prompts[7]])
    for p in (prompts[4], prompts[7]):
        assert a.prompts.count(p) == 1 and b.prompts.count(p) == 1, (a.prompts, b.prompts)
    data = ProbeDataset(root)
    assert sorted(set(data.prompts)) == sorted(prompts) and len(data) == 12 * CANDIDATES
    assert data.duplicates_dropped == 0
    for p in prompts[1:3]:
        rows = [i for i, q in enumerate(data.prompts) if q == p]
        assert data.seeds[rows].tolist() == [C.seed_for_prompt(p) + i for i in range(CANDIDATES)]

    # Run again: nothing left to send.
    again = C.collect([a.url, b.url], prompts, WORKFLOW, candidates=CANDIDATES, dataset_name="fake_ds",
                      output_dir=output, poll=0.02, progress=False)
    assert (again.done, again.skipped, again.failed) == (0, 12, [])
    assert len(a.prompts + b.prompts) == len(sent)


def test_collect_stops_early_when_everything_fails_and_checks_servers(tmp_path, fakes):
    prompts = [f"p {i}" for i in range(10)]
    bad = fakes(fail=lambda p: "dataset was collected with different settings")
    summary = C.collect([bad.url], prompts, WORKFLOW, dataset_name="x", output_dir=tmp_path / "output", poll=0.02,
                        progress=False)
    # Stopped after the third failed prompt (a fourth may have been under way); nothing is lost.
    assert summary.done == 0 and 3 <= len(summary.failed) <= 4 and not summary.ok
    assert summary.done + len(summary.failed) + summary.not_sent == len(prompts)
    assert "different settings" in summary.failed[0][1]
    assert bad.prompts[:6] == ["p 0", "p 0", "p 1", "p 1", "p 2", "p 2"] and len(bad.prompts) <= 8  # retried once

    lacking = fakes(known=[c for c in WORKFLOW_CLASSES if c != "ProbeSelectTestBrightness"])
    with pytest.raises(C.CollectError, match="ProbeSelectTestBrightness"):
        C.collect([lacking.url], prompts, WORKFLOW, output_dir=tmp_path / "output", progress=False)
    with pytest.raises(C.CollectError, match="does not answer"):
        C.collect([f"http://127.0.0.1:{_closed_port()}"], prompts, WORKFLOW, progress=False)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_rejects_bad_arguments(tmp_path):
    from probe_select.probes.checkpoints import CheckpointError, stored_checkpoint
    from tools.cli import main

    assert stored_checkpoint([1 / 6, 0.5], 0.2) == pytest.approx(1 / 6)
    assert stored_checkpoint([0.2, 0.5], 0.5) == 0.5
    with pytest.raises(CheckpointError, match="not stored"):
        stored_checkpoint([0.1, 0.5], 0.3)
    with pytest.raises(SystemExit) as exit_:
        main(["collect", "--server", "http://x"])           # neither --prompts nor --coco-captions
    assert exit_.value.code == 2
    (tmp_path / "p.txt").write_text("a\n")
    assert main(["collect", "--server", "http://127.0.0.1:1", "--prompts", str(tmp_path / "p.txt"),
                 "--workflow", str(tmp_path / "missing.json")]) == 2
    # The channel reduction flags become writer inputs; flags not given keep the workflow's values.
    from tools.cli import _writer_settings, build_parser
    args = build_parser().parse_args(["collect", "--server", "http://x", "--prompts", "p.txt",
                                      "--channel-reduction", "projection", "--projection-seed", "3"])
    assert _writer_settings(args) == {"channel_reduction": "projection", "projection_seed": 3}
    assert _writer_settings(build_parser().parse_args(["collect", "--server", "http://x", "--prompts", "p"])) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["collect", "--server", "x", "--prompts", "p", "--channel-reduction", "svd"])


# ---- acceptance: two real servers, a killed run, a resumed run, train, evaluate ----------------

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", *args]


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def pick_prompts(n: int) -> list[str]:
    """n prompts whose split (split_by_prompt, seed 0) puts at least one in val and one in test,
    so that train and evaluate have data."""
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "grey"]
    things = ["cat", "dog", "house", "car", "boat", "tree", "bird", "lamp", "chair", "horse"]
    pool = [f"a {c} {t} in the morning light" for c in colours for t in things]
    splits = split_by_prompt([prompt_id(p) for p in pool])
    where = {}
    for name, rows in splits.items():
        for row in rows.tolist():
            where[pool[row]] = name
    val = [p for p in pool if where[p] == "val"][:1]
    test = [p for p in pool if where[p] == "test"][:1]
    train = [p for p in pool if where[p] == "train"][: n - 2]
    return train[:3] + val + train[3:] + test


def shard_prompt_ids(root: Path) -> dict[str, list[str]]:
    from safetensors import safe_open

    ids = {}
    for path in list_shards(root):
        with safe_open(str(path), framework="pt") as handle:
            ids[path.name] = json.loads(handle.metadata()["prompt_ids"])
    return ids


def wait_queues_empty(servers, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(s.queue_state()["queue_running"] or s.queue_state()["queue_pending"] for s in servers):
        assert time.monotonic() < deadline, "the servers' queues did not empty"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    from devtools.make_checkpoint import cached_tiny_sd15_checkpoint
    from server_utils import ComfyServer, REPO_ROOT

    checkpoint = cached_tiny_sd15_checkpoint(CACHE_DIR)
    base = tmp_path_factory.mktemp("cli_servers")
    shared_output = base / "shared_output"
    shared_output.mkdir()
    servers = []
    for i in range(2):
        server = ComfyServer(base / f"comfy{i}", extra_args=["--output-directory", str(shared_output)],
                             custom_nodes={"probe-select": REPO_ROOT, "probe_select_test_nodes": TEST_NODES})
        server.add_model("checkpoints", checkpoint)
        servers.append(server)
    errors = []

    def start(server):
        try:
            server.start()
        except Exception as error:  # reported below
            errors.append(error)

    t0 = time.monotonic()
    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        log.info("two ComfyUI servers started in %.1f s", time.monotonic() - t0)
        yield servers, shared_output, checkpoint
    finally:
        for server in servers:
            server.stop()


@pytest.mark.server
def test_collect_cli_on_two_servers_resumes_then_train_and_evaluate(two_servers, tmp_path):
    servers, output_dir, checkpoint = two_servers
    for server in servers:
        info = server.object_info("ProbeSelectTestBrightness")
        assert info["ProbeSelectTestBrightness"]["output"] == ["FLOAT"], info
    workflow = copy.deepcopy(WORKFLOW)
    workflow[CKPT]["inputs"]["ckpt_name"] = checkpoint.name
    workflow_path = tmp_path / "collect_test.json"
    workflow_path.write_text(json.dumps(workflow, indent=2))
    prompts = pick_prompts(N_PROMPTS)
    prompts_path = tmp_path / "prompts.txt"
    prompts_path.write_text("\n".join(prompts + prompts[:2]) + "\n")     # repeats are dropped
    name = f"cli_{uuid.uuid4().hex[:6]}"
    root = C.dataset_dir(output_dir, name)
    collect_args = cli("collect", "--prompts", str(prompts_path), "--workflow", str(workflow_path),
                       "--dataset", name, "--candidates", str(CANDIDATES), "--output-dir", str(output_dir),
                       "--poll", "0.1", "--timeout", "120", "--queue-wait-timeout", "120",
                       *[a for s in servers for a in ("--server", s.url)])

    # First run: killed (SIGKILL, like a crash) once 3 prompts are in the dataset.
    first_log = tmp_path / "collect_1.log"
    with open(first_log, "wb") as log_file:
        proc = subprocess.Popen(collect_args, cwd=ROOT, env=cli_env(), stdout=log_file, stderr=subprocess.STDOUT)
        index = C.DatasetIndex(root)
        deadline = time.monotonic() + 120
        try:
            while len(index.refresh().prompt_ids()) < 3:
                assert proc.poll() is None, f"collect ended early (rc {proc.returncode}):\n{first_log.read_text()}"
                assert time.monotonic() < deadline, f"no 3 prompts within 120 s:\n{first_log.read_text()}"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    log.info("first run killed:\n%s", first_log.read_text()[-3000:])
    # Jobs it had queued still finish on the servers; the second run waits for them itself, but the
    # test waits here too, to know how many prompts the first run got into the dataset.
    wait_queues_empty(servers)
    collected_first = len(C.DatasetIndex(root).refresh().prompt_ids())
    assert 3 <= collected_first < N_PROMPTS, f"not stopped half way: {collected_first} prompts collected"

    # Second run: sends only the missing prompts.
    second = subprocess.run(collect_args + ["--no-progress"], cwd=ROOT, env=cli_env(), capture_output=True,
                            text=True, timeout=150)
    output = second.stdout + second.stderr
    log.info("second run:\n%s", output[-3000:])
    assert second.returncode == 0, output
    summary = re.search(r"collect: (\d+) prompts: (\d+) done, (\d+) skipped \(already in the dataset\), (\d+) failed",
                        output)
    assert summary, output
    assert tuple(map(int, summary.groups())) == (N_PROMPTS, N_PROMPTS - collected_first, collected_first, 0), output

    # Every prompt exactly once, with exactly CANDIDATES rows of its own seeds.
    data = ProbeDataset(root)
    assert data.duplicates_dropped == 0
    assert len(data) == N_PROMPTS * CANDIDATES
    assert sorted(set(data.prompts)) == sorted(prompts)
    for prompt in prompts:
        rows = [i for i, p in enumerate(data.prompts) if p == prompt]
        assert len(rows) == CANDIDATES, (prompt, rows)
        assert sorted(data.seeds[rows].tolist()) == [C.seed_for_prompt(prompt) + i for i in range(CANDIDATES)]
    assert data.manifest.evaluators == [EVALUATOR] and len(data.manifest.checkpoints) == 2
    assert data.scores(EVALUATOR).isfinite().all()
    # Raw shards: one shard per prompt, never a prompt written twice.
    shards = shard_prompt_ids(root)
    assert len(shards) == N_PROMPTS, shards
    owners = {}
    for shard, ids in shards.items():
        assert len(ids) == CANDIDATES and len(set(ids)) == 1, (shard, ids)
        assert ids[0] not in owners, f"prompt {ids[0]} written twice: {owners.get(ids[0])} and {shard}"
        owners[ids[0]] = shard
    # Both servers did work.
    for server in servers:
        history = server.history()
        assert history, f"{server.url} ran nothing"
        assert all(entry["status"]["status_str"] == "success" for entry in history.values())
    assert sum(len(s.history()) for s in servers) == N_PROMPTS

    # Train and evaluate on that dataset.
    probe = tmp_path / "probes" / "cli_probe.safetensors"
    train = subprocess.run(
        cli("train", "--dataset", str(root), "--checkpoint", "0.2", "--out", str(probe), "--epochs", "3",
            "--batch-prompts", "4", "--lr", "1e-3", "--seed", "1", "--state-dir", str(tmp_path / "state"),
            "--probe-config", json.dumps({"stem_width": 16, "widths": [16], "embed_dim": 16, "time_embed_dim": 8,
                                          "head_hidden": [16], "mlp_hidden": 16})),
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    log.info("train:\n%s", train.stderr[-3000:])
    assert train.returncode == 0, train.stdout + train.stderr
    assert probe.is_file() and probe.stat().st_size > 0
    assert re.search(r"epoch 3/3: loss", train.stderr) and "best epoch" in train.stderr, train.stderr
    from probe_select.probes.io import read_probe_metadata

    meta = read_probe_metadata(probe)
    assert meta.evaluator == EVALUATOR and meta.checkpoint_t == pytest.approx(1 / 6)     # 0.2 of 6 steps
    assert (meta.backbone_family, meta.tap) == (data.manifest.backbone_family, data.manifest.tap)

    metrics_path = tmp_path / "metrics.json"
    evaluate = subprocess.run(
        cli("evaluate", "--probe", str(probe), "--dataset", str(root), "--split", "test", "--json", str(metrics_path)),
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    log.info("evaluate:\n%s", evaluate.stderr[-3000:])
    assert evaluate.returncode == 0, evaluate.stdout + evaluate.stderr
    report = json.loads(metrics_path.read_text())
    assert report["split"] == "test" and report["evaluator"] == EVALUATOR
    metrics = report["metrics"]
    assert "within_prompt_spearman" in metrics and metrics["rows"] == CANDIDATES and metrics["prompts"] == 1
    assert "within-prompt Spearman" in evaluate.stderr
    # --json without a file: the same metrics on stdout.
    to_stdout = subprocess.run(cli("evaluate", "--probe", str(probe), "--dataset", str(root), "--split", "all",
                                   "--json", "-q"),
                               cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert json.loads(to_stdout.stdout)["metrics"]["rows"] == N_PROMPTS * CANDIDATES
