"""Pause-and-pick plumbing: the waiting picks of ProbeSelectPickCandidates and their HTTP routes.

A pick node that runs opens a request here (one per node id), tells the browser over ComfyUI's
websocket (`probe_select.pick`), and waits in the prompt worker thread until the browser posts the
chosen candidates, the run is cancelled (ComfyUI's interrupt flag, polled) or the timeout passes.
Whatever ends the wait, the request is removed (`finally`), so the server keeps no waiting state
after the node returns or raises; `GET /probe_select/pick` lists what is waiting now.

Routes (registered on `server.PromptServer.instance.routes` when the pack is imported by a server):
    POST /probe_select/pick   {"node_id": "9", "indices": [0, 3], "request_id": "..." (optional)}
        200 {"node_id", "request_id", "picked"}; 400 bad body or indices; 404 nothing waiting for
        that node; 409 request_id of an earlier pause.
    GET  /probe_select/pick   {"waiting": [{"node_id", "request_id", "run_id", "candidates", "seconds_left"}]}
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from aiohttp import web

from .gallery import prompt_server

log = logging.getLogger(__name__)

ROUTE = "/probe_select/pick"
PICK_EVENT = "probe_select.pick"
PICK_CLOSED_EVENT = "probe_select.pick_closed"
POLL_SECONDS = 0.1


class PickRejected(ValueError):
    """A posted pick that can't be accepted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass
class PickRequest:
    node_id: str
    run_id: str
    candidates: int
    deadline: float                                   # time.monotonic() after which the wait ends
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    picked: Optional[list[int]] = None
    answered: threading.Event = field(default_factory=threading.Event)


def parse_indices(value: Any, candidates: int) -> list[int]:
    """The posted indices as a list of distinct ints in [0, candidates); PickRejected(400) otherwise."""
    if not isinstance(value, list) or not value:
        raise PickRejected(400, "indices must be a non-empty list of candidate indices")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise PickRejected(400, f"indices must be integers, got {value!r}")
    bad = [i for i in value if not 0 <= i < candidates]
    if bad:
        raise PickRejected(400, f"indices {bad} are outside 0..{candidates - 1}")
    if len(set(value)) != len(value):
        raise PickRejected(400, f"indices {value} repeat a candidate")
    return list(value)


class PickRegistry:
    """The picks waiting now, by node id. Thread-safe: the route runs on the server's event loop,
    the node in the prompt worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, PickRequest] = {}

    def open(self, node_id: str, run_id: str, candidates: int, timeout: float) -> PickRequest:
        request = PickRequest(str(node_id), run_id, candidates, time.monotonic() + timeout)
        with self._lock:
            stale = self._waiting.get(request.node_id)
            if stale is not None:      # only if an earlier wait never closed: never serve it again
                log.warning("Probe-Select: replacing a pick still registered for node %s", node_id)
            self._waiting[request.node_id] = request
        return request

    def close(self, request: PickRequest) -> None:
        with self._lock:
            if self._waiting.get(request.node_id) is request:
                del self._waiting[request.node_id]

    def submit(self, node_id: Any, indices: Any, request_id: Any = None) -> PickRequest:
        with self._lock:
            request = self._waiting.get(str(node_id))
            if request is None:
                raise PickRejected(404, f"no pick is waiting for node {node_id}")
            if request_id is not None and request_id != request.request_id:
                raise PickRejected(409, f"node {node_id} is waiting for a newer pick than {request_id}")
            if request.answered.is_set():
                raise PickRejected(409, f"node {node_id} already has its pick")
            request.picked = parse_indices(indices, request.candidates)
            request.answered.set()
            return request

    def wait(self, request: PickRequest, check_interrupted: Callable[[], None]) -> Optional[list[int]]:
        """The picked indices, or None at the deadline. `check_interrupted` raises to cancel."""
        while True:
            if request.answered.wait(POLL_SECONDS):
                return request.picked
            check_interrupted()
            if time.monotonic() >= request.deadline:
                return None

    def waiting(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"node_id": r.node_id, "request_id": r.request_id, "run_id": r.run_id,
                     "candidates": r.candidates, "seconds_left": max(0.0, r.deadline - now)}
                    for r in self._waiting.values()]


REGISTRY = PickRegistry()
_registered_on: list = []       # the PromptServer instances whose routes we added (once each)


def send_to_client(event: str, data: dict) -> None:
    """Send a websocket event to the client that queued the running prompt (no-op without a server)."""
    running = prompt_server()
    if running is not None:
        running.send_sync(event, data, running.client_id)


def register_routes() -> bool:
    """Add the pick routes to the running server's route table (before it starts); idempotent."""
    running = prompt_server()
    if running is None or running in _registered_on:
        return False
    routes = running.routes

    @routes.post(ROUTE)
    async def post_pick(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        if not isinstance(body, dict) or "node_id" not in body:
            return web.json_response({"error": "the body must have node_id and indices"}, status=400)
        try:
            pick = REGISTRY.submit(body["node_id"], body.get("indices"), body.get("request_id"))
        except PickRejected as e:
            return web.json_response({"error": str(e)}, status=e.status)
        return web.json_response({"node_id": pick.node_id, "request_id": pick.request_id, "picked": pick.picked})

    @routes.get(ROUTE)
    async def get_picks(request: web.Request) -> web.Response:
        return web.json_response({"waiting": REGISTRY.waiting()})

    _registered_on.append(running)
    return True
