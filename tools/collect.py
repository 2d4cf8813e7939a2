"""Collect a training dataset with one or more running ComfyUI servers, for jobs too big for a graph.

``python -m tools.cli collect`` drives this module. For every prompt it fills an API-format
collect workflow (ProbeSelectCollectSampler -> evaluator -> ProbeSelectDatasetWriter), POSTs it to
a server's ``/prompt`` and polls ``/history/<id>`` until it has finished. Each server is one worker
thread with one job in flight, so N servers sample N prompts at once and share the work.

What a job is made of (see :func:`fill_workflow`):

- every string input whose value contains ``{prompt}`` gets the prompt (CLIPTextEncode text, the
  writer's and the evaluator's prompt...);
- the ProbeSelectDatasetWriter's ``dataset_name`` (and, if asked, its channel reduction and its
  ``x0_size``: the x0 prediction latents stored for probes that read x0);
- the ProbeSelectCollectSampler's ``candidates`` and ``seed``. The seed is a function of the prompt
  only (:func:`seed_for_prompt`, from :func:`probes.dataset.prompt_id`), so a prompt collected
  twice gets the same seeds and readers drop the repeated rows as duplicates.

Resuming. The servers write the dataset, under ``<output dir>/probe_select_datasets/<name>``; with
the servers' (shared) output directory the tool can read it. At start it waits until every server's
queue is empty (jobs that a killed earlier run had queued finish and are written first), reads the
prompt ids present in the dataset's shards (:class:`DatasetIndex`, headers only) and sends only the
prompts that are missing. So a run stopped half way and started again sends each remaining prompt
once, and every prompt ends up in the dataset once.

Failures. A job that the server refuses or that fails while running is logged with the server's
error message and retried once on another server (before a retry the dataset is checked again, in
case the failing part came after the writer). A server that cannot be reached three times in a row
is dropped and its prompts go to the others. If the first prompts all fail (a broken workflow, a
dataset collected with other settings), the run stops early instead of failing every prompt.

Only the standard library talks to the servers (urllib, json): this module never imports ComfyUI.
"""
from __future__ import annotations

import collections
import copy
import http.client
import json
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from probe_select.probes.training.dataset import DATASETS_SUBFOLDER, list_shards, prompt_id, read_shard_header

from . import PACK_ROOT

try:                    # optional: without tqdm, progress is a log line per prompt
    from tqdm import tqdm
except ImportError:
    tqdm = None

__all__ = [
    "PROMPT_PLACEHOLDER",
    "DEFAULT_WORKFLOW",
    "DATASETS_SUBFOLDER",
    "CollectError",
    "WorkflowError",
    "JobFailed",
    "ServerUnreachable",
    "load_prompts",
    "load_coco_captions",
    "unique_prompts",
    "seed_for_prompt",
    "load_workflow",
    "WorkflowInfo",
    "check_workflow",
    "check_dataset_name",
    "fill_workflow",
    "dataset_dir",
    "DatasetIndex",
    "pending_prompts",
    "ComfyClient",
    "format_rejection",
    "format_history_error",
    "run_job",
    "wait_until_idle",
    "Task",
    "Event",
    "WorkQueue",
    "worker_loop",
    "CollectSummary",
    "collect",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

PROMPT_PLACEHOLDER = "{prompt}"
SAMPLER_CLASS = "ProbeSelectCollectSampler"
WRITER_CLASS = "ProbeSelectDatasetWriter"
# The writer node's folder under the server's output directory (nodes/dataset.py).
DEFAULT_WORKFLOW = PACK_ROOT / "example_workflows" / "api" / "SD1.5_collect_probe_dataset.json"
# Seeds are < 2**48, so seed + candidate index stays far below ComfyUI's maximum seed (2**64 - 1).
SEED_SPACE = 2**48
# Same rule as the writer node's dataset_name (nodes/dataset.py).
_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Loopback and LAN servers: never route these requests through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError)


class CollectError(RuntimeError):
    """The collection cannot start or go on (no server answers, nodes missing, bad arguments)."""


class WorkflowError(ValueError):
    """The workflow is not an API-format collect workflow the tool can fill."""


class JobFailed(RuntimeError):
    """One prompt's job was refused or failed on a server; the message is the server's error."""


class ServerUnreachable(RuntimeError):
    """The server did not answer (connection refused, timed out, died mid-job)."""


# --------------------------------------------------------------------------------------------
# Prompts


def unique_prompts(prompts: Iterable[str]) -> list[str]:
    """The prompts without empty ones and repeats, first occurrence order kept."""
    seen: dict[str, None] = {}
    for prompt in prompts:
        if prompt and prompt not in seen:
            seen[prompt] = None
    return list(seen)


def load_prompts(path: PathLike, limit: Optional[int] = None) -> list[str]:
    """Prompts from a text file, one a line (UTF-8).

    Lines are stripped of surrounding whitespace; empty lines and repeated prompts are dropped
    (first occurrence kept, order kept). ``limit``: keep the first ``limit`` prompts of that list.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CollectError(f"cannot read the prompts file {path}: {error}") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = unique_prompts(lines)
    repeats = sum(1 for line in lines if line) - len(prompts)
    if repeats:
        logger.info("%s: dropped %d repeated prompts", path, repeats)
    return _limit(prompts, limit)


def load_coco_captions(path: PathLike, limit: Optional[int] = None) -> list[str]:
    """Captions of an MS-COCO captions file (``captions_train2017.json``...), as prompts.

    Reads the ``"annotations"`` list's ``"caption"`` fields in file order; whitespace runs (COCO
    captions carry stray newlines and trailing spaces) become single spaces; repeated captions are
    dropped (first occurrence kept). ``limit``: keep the first ``limit`` captions of that list.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CollectError(f"cannot read the COCO captions file {path}: {error}") from None
    except ValueError as error:
        raise CollectError(f"{path} is not valid JSON ({error})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise CollectError(f"{path} has no 'annotations' list; is it an MS-COCO captions file (captions_*.json)?")
    captions = []
    for annotation in annotations:
        caption = annotation.get("caption") if isinstance(annotation, dict) else None
        if isinstance(caption, str):
            captions.append(" ".join(caption.split()))
    prompts = unique_prompts(captions)
    logger.info("%s: %d captions, %d distinct", path, len(captions), len(prompts))
    return _limit(prompts, limit)


def _limit(prompts: list[str], limit: Optional[int]) -> list[str]:
    if limit is None:
        return prompts
    if limit < 0:
        raise CollectError(f"--limit must be >= 0, got {limit}")
    return prompts[:limit]


def seed_for_prompt(prompt: str, base_seed: int = 0) -> int:
    """The sampler seed of a prompt: a function of the prompt's id (and ``base_seed``) only.

    ``int(prompt_id(prompt), 16)``, offset by ``base_seed``, modulo 2**48. The same prompt gets the
    same seeds in every run and on every server, so collecting a prompt again produces the same
    (prompt id, seed) rows, which dataset readers drop as duplicates. Candidate i uses seed + i.
    """
    return (int(prompt_id(prompt), 16) + int(base_seed)) % SEED_SPACE


# --------------------------------------------------------------------------------------------
# Workflow


def load_workflow(path: PathLike) -> dict:
    """An API-format workflow (what POST /prompt takes: node id -> {class_type, inputs})."""
    path = Path(path)
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        hint = ""
        if path.resolve() == DEFAULT_WORKFLOW:
            hint = " (generate it with `.venv/bin/python scripts/build_workflows.py`, or pass --workflow)"
        raise WorkflowError(f"workflow file {path} does not exist{hint}") from None
    except OSError as error:
        raise WorkflowError(f"cannot read the workflow {path}: {error}") from None
    except ValueError as error:
        raise WorkflowError(f"{path} is not valid JSON ({error})") from None
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise WorkflowError(
            f"{path} is a UI-format workflow; the tool needs the API format (the twin under example_workflows/api/, "
            f"or the UI's 'Export (API)')")
    if isinstance(workflow, dict) and isinstance(workflow.get("prompt"), dict) and "class_type" not in workflow["prompt"]:
        workflow = workflow["prompt"]     # a saved POST /prompt payload
    _check_api_format(workflow, str(path))
    return workflow


def _check_api_format(workflow: Any, source: str = "the workflow") -> None:
    if not isinstance(workflow, dict) or not workflow:
        raise WorkflowError(f"{source} is not an API-format workflow (a JSON object of nodes)")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) or not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"{source}: node {node_id!r} is not an API-format node ({{'class_type', 'inputs'}})")


def _nodes_of(workflow: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in workflow.items() if node.get("class_type") == class_type]


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


@dataclass
class WorkflowInfo:
    """Where a collect workflow keeps what the tool fills."""

    samplers: list[str]
    writers: list[str]
    placeholders: list[tuple[str, str]]     # (node id, input name) of string inputs with {prompt}
    dataset_name: str                       # the writer's dataset_name in the file
    class_types: list[str]


def check_workflow(workflow: dict) -> WorkflowInfo:
    """Check that ``workflow`` is a collect workflow the tool can fill.

    Raises:
        WorkflowError: it is not API format; it has no ProbeSelectCollectSampler or no
            ProbeSelectDatasetWriter; their seed / candidates / dataset_name are links, not
            values; no string input contains ``{prompt}``; or a writer's ``prompt`` is a value
            other than exactly ``{prompt}`` (the rows would carry another text than the prompt,
            and resuming, which looks prompts up by id, would never find them).
    """
    _check_api_format(workflow)
    samplers = _nodes_of(workflow, SAMPLER_CLASS)
    writers = _nodes_of(workflow, WRITER_CLASS)
    if not samplers:
        raise WorkflowError(f"the workflow has no {SAMPLER_CLASS} node: there would be nothing to collect")
    if not writers:
        raise WorkflowError(f"the workflow has no {WRITER_CLASS} node: nothing would be written")
    for node_id in samplers:
        for name in ("seed", "candidates"):
            if _is_link(workflow[node_id]["inputs"].get(name)):
                raise WorkflowError(f"{SAMPLER_CLASS} node {node_id}: '{name}' is linked to another node; "
                                    f"make it a widget value so the tool can set it")
    names = set()
    for node_id in writers:
        inputs = workflow[node_id]["inputs"]
        if _is_link(inputs.get("dataset_name")):
            raise WorkflowError(f"{WRITER_CLASS} node {node_id}: 'dataset_name' is linked; make it a widget value")
        names.add(str(inputs.get("dataset_name", "")))
        text = inputs.get("prompt")
        if isinstance(text, str) and text != PROMPT_PLACEHOLDER:
            raise WorkflowError(f"{WRITER_CLASS} node {node_id}: its prompt is {text!r}; it must be exactly "
                                f"{PROMPT_PLACEHOLDER!r} so that every row carries the prompt it was made from")
        if _is_link(text):
            logger.warning("%s node %s takes its prompt from node %s: make sure that is exactly %s, or resuming "
                           "will not recognise the prompts already collected", WRITER_CLASS, node_id, text[0],
                           PROMPT_PLACEHOLDER)
    placeholders = [(node_id, name) for node_id, node in workflow.items()
                    for name, value in node.get("inputs", {}).items()
                    if isinstance(value, str) and PROMPT_PLACEHOLDER in value]
    if not placeholders:
        raise WorkflowError(f"no string input of the workflow contains {PROMPT_PLACEHOLDER}: every job would use the "
                            f"same text. Put {PROMPT_PLACEHOLDER} in the text encoder's text and the writer's prompt")
    return WorkflowInfo(samplers=samplers, writers=writers, placeholders=placeholders,
                        dataset_name=sorted(names)[0] if names else "",
                        class_types=sorted({node["class_type"] for node in workflow.values()}))


def check_dataset_name(name: str) -> str:
    name = (name or "").strip()
    if not _DATASET_NAME.match(name) or ".." in name:
        raise CollectError(f"dataset name {name!r} is not a plain folder name: use letters, digits, '.', '_' or '-'")
    return name


def fill_workflow(workflow: dict, prompt: str, *, seed: int, candidates: Optional[int] = None,
                  dataset_name: Optional[str] = None, writer_settings: Optional[dict] = None) -> dict:
    """A copy of ``workflow`` for one prompt.

    Every string input that contains ``{prompt}`` gets it replaced by ``prompt`` (text around the
    placeholder is kept, e.g. ``"a photo of {prompt}"``); every ProbeSelectCollectSampler gets
    ``seed`` and, if given, ``candidates``; every ProbeSelectDatasetWriter gets ``dataset_name`` if
    given, and the inputs of ``writer_settings`` (e.g. ``{"channel_reduction": "pca",
    "reduced_channels": 48}``). The input workflow is not modified.
    """
    filled = copy.deepcopy(workflow)
    for node in filled.values():
        inputs = node.get("inputs", {})
        for name, value in inputs.items():
            if isinstance(value, str) and PROMPT_PLACEHOLDER in value:
                inputs[name] = value.replace(PROMPT_PLACEHOLDER, prompt)
        if node.get("class_type") == SAMPLER_CLASS:
            inputs["seed"] = int(seed)
            if candidates is not None:
                inputs["candidates"] = int(candidates)
        elif node.get("class_type") == WRITER_CLASS:
            if dataset_name is not None:
                inputs["dataset_name"] = dataset_name
            inputs.update(writer_settings or {})
    return filled


# --------------------------------------------------------------------------------------------
# What the dataset already holds


def dataset_dir(output_dir: PathLike, name: str) -> Path:
    """Where the writer node puts dataset ``name``: ``<output dir>/probe_select_datasets/<name>``."""
    return Path(output_dir) / DATASETS_SUBFOLDER / name


def _shard_prompt_ids(path: Path) -> list[str]:
    """The ``prompt_ids`` of a shard, from its safetensors header only (no tensor is read)."""
    header, _length, _size = read_shard_header(path)
    ids = json.loads((header.get("__metadata__") or {})["prompt_ids"])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError("prompt_ids is not a list of strings")
    return ids


class DatasetIndex:
    """The prompt ids present in a dataset folder, read from shard headers, incrementally.

    :meth:`refresh` reads only the shards that appeared since the last call (shards are never
    modified once visible), so checking the dataset again during a long run stays cheap.
    Unreadable shards are logged once and ignored: their prompts count as missing.
    """

    def __init__(self, root: PathLike):
        self.root = Path(root)
        self._seen: set[str] = set()
        self.rows: collections.Counter = collections.Counter()      # prompt id -> rows
        self.shards: collections.Counter = collections.Counter()    # prompt id -> shards holding it
        self.unreadable: list[Path] = []
        self._lock = threading.Lock()

    def refresh(self) -> "DatasetIndex":
        with self._lock:
            for path in list_shards(self.root):
                if path.name in self._seen:
                    continue
                self._seen.add(path.name)
                try:
                    ids = _shard_prompt_ids(path)
                except (OSError, ValueError, KeyError, TypeError) as error:
                    logger.warning("cannot read shard %s (%s); its prompts count as not collected", path, error)
                    self.unreadable.append(path)
                    continue
                self.rows.update(ids)
                self.shards.update(set(ids))
        return self

    def prompt_ids(self) -> set[str]:
        with self._lock:
            return set(self.rows)

    def __contains__(self, pid: str) -> bool:
        with self._lock:
            return pid in self.rows

    def has_prompt(self, prompt: str, refresh: bool = True) -> bool:
        if refresh:
            self.refresh()
        return prompt_id(prompt) in self


def pending_prompts(prompts: Sequence[str], present_ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split ``prompts`` into (to send, already collected) by prompt id; order kept."""
    present = set(present_ids)
    pending, skipped = [], []
    for prompt in prompts:
        (skipped if prompt_id(prompt) in present else pending).append(prompt)
    return pending, skipped


# --------------------------------------------------------------------------------------------
# One server


class ComfyClient:
    """The few ComfyUI HTTP endpoints the tool uses, with urllib and json only."""

    def __init__(self, url: str, client_id: Optional[str] = None, request_timeout: float = 30.0):
        url = url.strip().rstrip("/")
        if "://" not in url:
            url = "http://" + url
        self.url = url
        self.client_id = client_id or f"probe-select-collect-{uuid.uuid4().hex[:12]}"
        self.request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"ComfyClient({self.url!r})"

    def request(self, method: str, path: str, data: Any = None, timeout: Optional[float] = None) -> Any:
        """JSON request; the decoded answer (None for an empty body).

        Raises:
            urllib.error.HTTPError: the server answered with an error status.
            ServerUnreachable: no answer (refused, reset, timed out).
        """
        body = json.dumps(data).encode("utf-8") if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout or self.request_timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError:
            raise
        except _NETWORK_ERRORS as error:
            reason = getattr(error, "reason", error)
            raise ServerUnreachable(f"{self.url} did not answer {method} {path}: {reason}") from None
        return json.loads(raw) if raw.strip() else None

    def queue_state(self) -> dict:
        return self.request("GET", "/queue")

    def queued_count(self) -> int:
        state = self.queue_state() or {}
        return len(state.get("queue_running", [])) + len(state.get("queue_pending", []))

    def queued_ids(self) -> set[str]:
        state = self.queue_state() or {}
        return {item[1] for key in ("queue_running", "queue_pending") for item in state.get(key, [])
                if isinstance(item, list) and len(item) > 1}

    def history(self, job_id: str) -> Optional[dict]:
        answer = self.request("GET", f"/history/{urllib.parse.quote(job_id)}") or {}
        return answer.get(job_id)

    def node_classes(self, class_types: Iterable[str]) -> list[str]:
        """Those of ``class_types`` the server does not know."""
        missing = []
        for class_type in class_types:
            info = self.request("GET", f"/object_info/{urllib.parse.quote(class_type)}") or {}
            if class_type not in info:
                missing.append(class_type)
        return missing

    def submit(self, workflow: dict) -> str:
        """POST /prompt; the job id. Raises :class:`JobFailed` with the server's validation errors."""
        try:
            answer = self.request("POST", "/prompt", {"prompt": workflow, "client_id": self.client_id})
        except urllib.error.HTTPError as error:
            raw = error.read().decode("utf-8", errors="replace")
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            raise JobFailed(f"{self.url} refused the workflow ({error.code}): {format_rejection(body)}") from None
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise JobFailed(f"{self.url} answered POST /prompt with {json.dumps(answer)[:500]}")
        if answer.get("node_errors"):
            raise JobFailed(f"{self.url} refused the workflow: {format_rejection(answer)}")
        return answer["prompt_id"]

    def cancel(self, job_id: str) -> None:
        """Remove a pending job from the queue, or interrupt it if it is running (best effort)."""
        try:
            self.request("POST", "/queue", {"delete": [job_id]})
            self.request("POST", "/interrupt", {"prompt_id": job_id})
        except (urllib.error.HTTPError, ServerUnreachable) as error:
            logger.warning("could not cancel job %s on %s: %s", job_id, self.url, error)


def format_rejection(body: Any) -> str:
    """ComfyUI's answer to a refused POST /prompt as one readable line."""
    if not isinstance(body, dict):
        return str(body)[:2000]
    parts = []
    error = body.get("error")
    if isinstance(error, dict):
        text = error.get("message") or error.get("type") or ""
        if error.get("details"):
            text += f": {error['details']}"
        parts.append(text)
    elif error:
        parts.append(str(error))
    for node_id, node in (body.get("node_errors") or {}).items():
        errors = node.get("errors", []) if isinstance(node, dict) else []
        text = "; ".join(f"{e.get('message', '')} ({e.get('details', '')})" for e in errors if isinstance(e, dict))
        parts.append(f"node {node_id} ({node.get('class_type', '?') if isinstance(node, dict) else '?'}): {text}")
    return " | ".join(p for p in parts if p) or json.dumps(body)[:2000]


def format_history_error(entry: dict) -> str:
    """Why a finished job did not succeed, from its history entry's status messages."""
    status = entry.get("status") or {}
    for event, data in status.get("messages") or []:
        if event == "execution_error" and isinstance(data, dict):
            message = str(data.get("exception_message", "")).strip()
            return (f"node {data.get('node_id')} ({data.get('node_type')}) raised "
                    f"{data.get('exception_type', 'an error')}: {message}")
        if event == "execution_interrupted":
            return "the job was interrupted on the server"
    return f"the job ended with status {status.get('status_str')!r}"


def run_job(client: ComfyClient, workflow: dict, *, timeout: float = 1800.0, poll: float = 0.5,
            lost_check_every: float = 5.0, unreachable_grace: float = 30.0) -> dict:
    """Run one workflow on ``client``'s server to the end; its history entry on success.

    Polls ``/history/<id>``; now and then also ``/queue``, so that a job the server lost (it was
    restarted) fails instead of waiting for the timeout. Short network errors while polling are
    tolerated for ``unreachable_grace`` seconds.

    Raises:
        JobFailed: refused, failed, interrupted, lost, or not finished within ``timeout`` seconds
            (then it is removed from the server's queue or interrupted).
        ServerUnreachable: the server stopped answering.
    """
    job_id = client.submit(workflow)
    start = time.monotonic()
    last_lost_check = start
    unreachable_since: Optional[float] = None
    while True:
        try:
            entry = client.history(job_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "success" or (status.get("completed") and not status.get("status_str")):
                    return entry
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise JobFailed(f"{client.url}: {format_history_error(entry)}")
            now = time.monotonic()
            if entry is None and now - last_lost_check >= lost_check_every:
                last_lost_check = now
                if job_id not in client.queued_ids() and client.history(job_id) is None:
                    raise JobFailed(f"{client.url} lost job {job_id}: it is neither queued nor in the history "
                                    f"(was the server restarted?)")
            unreachable_since = None
        except ServerUnreachable:
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > unreachable_grace:
                raise
        if time.monotonic() - start > timeout:
            client.cancel(job_id)
            raise JobFailed(f"{client.url}: job {job_id} did not finish within {timeout:.0f} s (cancelled)")
        time.sleep(poll)


# --------------------------------------------------------------------------------------------
# Sharing the prompts between servers


@dataclass
class Task:
    prompt: str
    tried: set = field(default_factory=set)        # workers that ran it and failed
    errors: list = field(default_factory=list)


class WorkQueue:
    """Prompts shared by the worker threads, with "retry once on another server".

    A worker gets the first task it has not failed yet; a task that failed on every worker still
    running may go back to one of them. :meth:`get` returns None once no task is left and none is
    in progress (a task in progress may still come back for a retry).
    """

    def __init__(self, prompts: Iterable[str], workers: int, max_attempts: int = 2):
        if workers < 1:
            raise ValueError("WorkQueue needs at least one worker")
        self._tasks: collections.deque = collections.deque(Task(p) for p in prompts)
        self._cond = threading.Condition()
        self._active = set(range(workers))
        self._in_progress = 0
        self._closed = False
        self.max_attempts = max_attempts

    def get(self, worker: int, wait: float = 0.2) -> Optional[Task]:
        with self._cond:
            while True:
                if self._closed:
                    return None
                for task in self._tasks:
                    others = self._active - task.tried - {worker}
                    if worker not in task.tried or not others:
                        self._tasks.remove(task)
                        self._in_progress += 1
                        return task
                if not self._tasks and self._in_progress == 0:
                    return None
                self._cond.wait(wait)

    def finished(self, task: Task) -> None:
        """``task`` is done (written, or given up): it will not come back."""
        with self._cond:
            self._in_progress -= 1
            self._cond.notify_all()

    def failed(self, task: Task, worker: int, error: str, count: bool = True) -> bool:
        """``task`` failed on ``worker``; True if it was queued again for a retry on another server.

        ``count=False`` (the server could not be reached, so the job never ran): it goes back without
        using up an attempt.
        """
        with self._cond:
            task.tried.add(worker)
            if count:
                task.errors.append(error)
            retry = len(task.errors) < self.max_attempts
            if retry:
                self._tasks.appendleft(task)
            self._in_progress -= 1
            self._cond.notify_all()
            return retry

    def worker_gone(self, worker: int) -> None:
        with self._cond:
            self._active.discard(worker)
            self._cond.notify_all()

    def close(self) -> list[Task]:
        """Stop handing out tasks; the tasks never started."""
        with self._cond:
            self._closed = True
            left = list(self._tasks)
            self._tasks.clear()
            self._cond.notify_all()
            return left

    def remaining(self) -> int:
        with self._cond:
            return len(self._tasks)


@dataclass
class Event:
    """What a worker reports for one task: kind is "done", "retry" or "failed"."""

    kind: str
    prompt: str
    worker: int
    message: str = ""
    seconds: float = 0.0


def worker_loop(worker: int, run: Callable[[str], Any], work: WorkQueue, report: Callable[[Event], None], *,
                already_done: Optional[Callable[[str], bool]] = None, stop: Optional[threading.Event] = None,
                max_unreachable: int = 3, retry_delay: float = 0.5, name: str = "") -> None:
    """Run tasks from ``work`` with ``run(prompt)`` until none is left.

    ``run`` raises :class:`JobFailed` (counted, retried once elsewhere) or
    :class:`ServerUnreachable` (not counted; after ``max_unreachable`` in a row this worker stops
    and leaves its prompts to the others; it waits ``retry_delay`` * 2**n seconds after the n-th, at
    most 5 s). Before running a retry, ``already_done(prompt)`` is
    asked, so that a prompt whose rows were written before the failure is not written twice.
    """
    name = name or f"worker {worker}"
    unreachable = 0
    try:
        while stop is None or not stop.is_set():
            task = work.get(worker)
            if task is None:
                return
            if task.errors and already_done is not None:
                try:
                    if already_done(task.prompt):
                        logger.info("%s: %r is in the dataset despite the earlier failure; not sending it again",
                                    name, _short(task.prompt))
                        work.finished(task)
                        report(Event("done", task.prompt, worker, "already written"))
                        continue
                except Exception as error:  # a check only; the retry goes ahead
                    logger.warning("could not check the dataset before a retry: %s", error)
            started = time.monotonic()
            try:
                run(task.prompt)
            except ServerUnreachable as error:
                unreachable += 1
                work.failed(task, worker, str(error), count=False)
                logger.warning("%s: %s", name, error)
                if unreachable >= max_unreachable:
                    logger.error("%s: giving up on this server after %d failed attempts to reach it; the other "
                                 "servers take its prompts", name, unreachable)
                    return
                time.sleep(min(5.0, retry_delay * 2 ** (unreachable - 1)))
                continue
            except JobFailed as error:
                unreachable = 0
                retry = work.failed(task, worker, str(error))
                report(Event("retry" if retry else "failed", task.prompt, worker, str(error),
                             time.monotonic() - started))
                continue
            except Exception as error:  # a bug or an unexpected answer: the prompt fails, the worker goes on
                unreachable = 0
                logger.exception("%s: unexpected error on %r", name, _short(task.prompt))
                retry = work.failed(task, worker, f"{type(error).__name__}: {error}")
                report(Event("retry" if retry else "failed", task.prompt, worker, str(error),
                             time.monotonic() - started))
                continue
            unreachable = 0
            work.finished(task)
            report(Event("done", task.prompt, worker, seconds=time.monotonic() - started))
    finally:
        work.worker_gone(worker)


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# The whole run


@dataclass
class CollectSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)      # (prompt, last error)
    not_sent: int = 0                               # left when the run stopped early
    missing: list = field(default_factory=list)     # reported done, yet not in the dataset afterwards
    per_server: dict = field(default_factory=dict)  # url -> prompts done
    dataset: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_sent and not self.missing

    def line(self) -> str:
        text = (f"collect: {self.total} prompts: {self.done} done, {self.skipped} skipped (already in the dataset), "
                f"{len(self.failed)} failed")
        if self.not_sent:
            text += f", {self.not_sent} not sent"
        if self.missing:
            text += f"; {len(self.missing)} done but not found in the dataset"
        return text


class _Progress:
    """tqdm when it is installed and enabled, else a log line per prompt."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.count = 0
        self.bar = None
        if enabled and total:
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="prompt", desc="collect", dynamic_ncols=True)

    def update(self, event: Event, failed: int) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=failed, refresh=False)
        else:
            logger.info("[%d/%d] %s: %s (%.1f s)", self.count, self.total, event.kind, _short(event.prompt),
                        event.seconds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_until_idle(clients: Sequence[ComfyClient], poll: float = 1.0, timeout: Optional[float] = None,
                    log_every: float = 30.0) -> None:
    """Wait until no server has a running or pending job (e.g. those of a killed earlier run).

    Raises:
        CollectError: a server does not answer, or ``timeout`` seconds passed.
    """
    start = time.monotonic()
    last_log = float("-inf")
    while True:
        counts = {}
        for client in clients:
            try:
                counts[client.url] = client.queued_count()
            except (ServerUnreachable, urllib.error.HTTPError) as error:
                raise CollectError(f"server {client.url} does not answer GET /queue: {error}") from None
        busy = {url: n for url, n in counts.items() if n}
        if not busy:
            return
        now = time.monotonic()
        if now - last_log >= log_every:
            last_log = now
            logger.info("waiting for jobs already queued on the servers to finish first (%s)",
                        ", ".join(f"{url}: {n}" for url, n in busy.items()))
        if timeout is not None and now - start > timeout:
            raise CollectError(f"the servers' queues did not empty within {timeout:.0f} s ({busy})")
        time.sleep(poll)


def collect(servers: Sequence[str], prompts: Sequence[str], workflow: dict, *, candidates: Optional[int] = None,
            dataset_name: Optional[str] = None, writer_settings: Optional[dict] = None,
            output_dir: Optional[PathLike] = None, base_seed: int = 0, timeout: float = 1800.0, poll: float = 0.5, queue_wait_timeout: Optional[float] = None,
            progress: bool = True, stop: Optional[threading.Event] = None,
            abort_after_failures: int = 3) -> CollectSummary:
    """Collect ``prompts`` into the dataset with the ``servers``; returns what happened.

    Args:
        servers: ComfyUI base URLs; each one is a worker with one job in flight.
        prompts: the prompts, in order (already de-duplicated and limited).
        workflow: the API-format collect workflow (see :func:`check_workflow`).
        candidates: seeds per prompt; None keeps the workflow's value.
        dataset_name: None keeps the workflow's writer's value.
        writer_settings: other writer inputs to set in every job (the channel reduction:
            ``channel_reduction``, ``reduced_channels``, ``projection_seed``; ``x0_size`` > 0 to store
            each candidate's x0 prediction latent for probes that read x0); None keeps the workflow's.
        output_dir: the servers' (shared) output directory; needed to skip prompts already
            collected. Without it every prompt is sent.
        base_seed: offset of every prompt's seed (:func:`seed_for_prompt`).
        timeout: seconds one job may take on a server before it is cancelled and retried.
        poll: seconds between two looks at a job's history.
        queue_wait_timeout: how long to wait for the servers' queues to empty at start (None:
            as long as it takes).
        progress: show a progress bar (tqdm) or log one line per prompt.
        stop: set it to stop handing out prompts (jobs in flight still finish).
        abort_after_failures: stop when this many prompts have failed and none succeeded yet
            (0: never).

    Raises:
        CollectError: no server, a server does not answer, or it lacks nodes the workflow uses.
        WorkflowError: the workflow can't be filled.
    """
    if not servers:
        raise CollectError("give at least one --server")
    if candidates is not None and candidates < 1:
        raise CollectError(f"--candidates must be >= 1, got {candidates}")
    info = check_workflow(workflow)
    name = check_dataset_name(dataset_name if dataset_name is not None else info.dataset_name)
    client_id = f"probe-select-collect-{uuid.uuid4().hex[:12]}"
    clients = [ComfyClient(url, client_id) for url in servers]
    urls = [c.url for c in clients]
    if len(set(urls)) != len(urls):
        raise CollectError(f"a server is given twice: {urls}")

    for client in clients:
        try:
            missing = client.node_classes(info.class_types)
        except (ServerUnreachable, urllib.error.HTTPError) as error:
            raise CollectError(f"server {client.url} does not answer: {error}") from None
        if missing:
            raise CollectError(f"server {client.url} does not have the nodes {missing} that the workflow uses; "
                               f"install those custom nodes there (and restart it)")
    wait_until_idle(clients, timeout=queue_wait_timeout)

    summary = CollectSummary(total=len(prompts), per_server={url: 0 for url in urls})
    index = None
    if output_dir is not None:
        summary.dataset = dataset_dir(output_dir, name)
        index = DatasetIndex(summary.dataset).refresh()
        pending, skipped = pending_prompts(prompts, index.prompt_ids())
        logger.info("dataset %s: %d of the %d prompts already collected, %d to send", summary.dataset,
                    len(skipped), len(prompts), len(pending))
    else:
        pending, skipped = list(prompts), []
        logger.warning("no --output-dir: the dataset can't be read, so prompts already collected are sent again "
                       "(their rows repeat; readers drop them)")
    summary.skipped = len(skipped)
    if not pending:
        return summary

    stop = stop or threading.Event()
    work = WorkQueue(pending, len(clients))
    events: "queue.Queue[Event]" = queue.Queue()
    checked_output_dir = threading.Event()

    def make_runner(client: ComfyClient) -> Callable[[str], Any]:
        def run(prompt: str) -> dict:
            job = fill_workflow(workflow, prompt, seed=seed_for_prompt(prompt, base_seed), candidates=candidates,
                                dataset_name=name, writer_settings=writer_settings)
            entry = run_job(client, job, timeout=timeout, poll=poll)
            if index is not None and not checked_output_dir.is_set():
                checked_output_dir.set()
                if not index.has_prompt(prompt):
                    logger.warning("%r finished on %s but is not in %s: is --output-dir the servers' output "
                                   "directory? Resuming needs it", _short(prompt), client.url, summary.dataset)
            return entry
        return run

    already_done = index.has_prompt if index is not None else None
    threads = []
    for i, client in enumerate(clients):
        thread = threading.Thread(
            target=worker_loop, args=(i, make_runner(client), work, events.put),
            kwargs=dict(already_done=already_done, stop=stop, name=client.url),
            name=f"collect-{i}", daemon=True)
        threads.append(thread)
        thread.start()

    bar = _Progress(len(pending), enabled=progress)
    done_prompts: list[str] = []
    try:
        while True:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if not any(t.is_alive() for t in threads):
                    break
                continue
            if event.kind == "retry":
                logger.warning("%r failed on %s: %s; %s", _short(event.prompt), urls[event.worker], event.message,
                               "not retried (stopping)" if stop.is_set() else "retrying on another server")
                continue
            if event.kind == "done":
                summary.done += 1
                done_prompts.append(event.prompt)
                summary.per_server[urls[event.worker]] += 1
            else:
                summary.failed.append((event.prompt, event.message))
                logger.error("%r failed on %s: %s", _short(event.prompt), urls[event.worker], event.message)
            bar.update(event, len(summary.failed))
            if (abort_after_failures and not stop.is_set() and summary.done == 0
                    and len(summary.failed) >= abort_after_failures):
                logger.error("the first %d prompts all failed; stopping. Fix the error above and run again",
                             len(summary.failed))
                stop.set()
                summary.not_sent += len(work.close())
    except KeyboardInterrupt:
        stop.set()
        left = work.close()
        logger.warning("stopped: %d prompts not sent; jobs already on the servers finish and are written. Run the "
                       "same command again to collect the rest", len(left))
        raise
    finally:
        bar.close()
    summary.not_sent += len(work.close())
    if index is not None and summary.done:
        # A job can succeed without writing: ComfyUI reuses cached outputs when the same workflow ran on
        # that server before (e.g. its shard was deleted since), or --output-dir is not the servers'.
        index.refresh()
        summary.missing = [p for p in done_prompts if prompt_id(p) not in index]
        if summary.missing:
            logger.warning("%d prompts finished but are not in %s (first: %r); restart the servers (to clear "
                           "their cache) and run again, and check --output-dir", len(summary.missing),
                           summary.dataset, _short(summary.missing[0]))
    return summary
