"""A real ComfyUI server process for end-to-end tests, with this pack installed as a custom node.

`ComfyServer` owns a base directory (custom_nodes, models, input, output, temp, user) so nothing is
written into the ComfyUI source tree, picks a free loopback port, starts `main.py` with the
headless flags, waits until `/object_info` answers and stops the process on exit. Several
servers can run at once (one base directory and port each).

    with ComfyServer(tmp_path / "comfy") as server:      # or: server = ComfyServer(...); server.start()
        prompt_id = server.queue(workflow)
        entry = server.wait(prompt_id, timeout=60)

`EventStream` listens on the server's websocket (`/ws?clientId=`) for the messages ComfyUI sends
to one client (executing, progress, executed, execution_*), for tests that must act at a precise
moment of a run (e.g. interrupt while a given node is sampling).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from devtools import comfyui_dir

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_FOLDER = "probe-select"
DEFAULT_SETTINGS = {"Comfy.TutorialCompleted": True}
STANDARD_MODEL_FOLDERS = ("checkpoints", "probes", "vae", "loras", "clip", "embeddings")


# Loopback only: never route test requests through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server did not start, died, refused a request, or a prompt did not finish in time."""


class PromptRejected(ServerError):
    """POST /prompt answered with an error (validation failed); `body` holds ComfyUI's JSON answer."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"POST /prompt was rejected ({status}): {json.dumps(body)[:4000]}")


# $COMFYUI_DIR, else the path recorded in .venv/comfyui_dir, else .comfyui/ComfyUI.
default_comfyui_dir = comfyui_dir


def default_python() -> str:
    """The interpreter running the tests when it is a virtual environment's (.venv, .venv-0.33, ...),
    else .venv's when there is one, else the running one."""
    if sys.prefix != sys.base_prefix:
        return sys.executable
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        raise ServerError(f"{link} already exists")
    link.symlink_to(target, target_is_directory=target.is_dir())


class ComfyServer:
    """One ComfyUI server process on loopback.

    Args:
        base_dir: the server's --base-directory (created; may already hold files).
        comfyui_dir: ComfyUI source folder (cwd of the process); default `default_comfyui_dir()`.
        python: interpreter that runs main.py; default the repository's venv.
        custom_nodes: folder name -> source folder, symlinked into base_dir/custom_nodes
            (default: this repository as `probe-select`).
        extra_args: more command-line flags for main.py.
        env: extra environment variables for the process.
        startup_timeout: seconds to wait for /object_info.
    """

    def __init__(self, base_dir, comfyui_dir=None, python: Optional[str] = None,
                 custom_nodes: Optional[Mapping[str, os.PathLike]] = None, extra_args: Iterable[str] = (),
                 env: Optional[Mapping[str, str]] = None, startup_timeout: float = 120.0,
                 host: str = "127.0.0.1"):
        self.base_dir = Path(base_dir).resolve()
        self.comfyui_dir = Path(comfyui_dir or default_comfyui_dir()).resolve()
        self.python = python or default_python()
        self.custom_nodes = dict(custom_nodes) if custom_nodes is not None else {PACK_FOLDER: REPO_ROOT}
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.host = host
        self.port: Optional[int] = None
        self.client_id = f"tests-{uuid.uuid4().hex[:12]}"
        self.process: Optional[subprocess.Popen] = None
        self._log_offset = 0
        self.log_path = self.base_dir / "comfyui.log"
        self._log_file = None
        self.prepare()

    # ---- layout -------------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    def model_dir(self, folder: str) -> Path:
        return self.models_dir / folder

    def prepare(self) -> None:
        """Create the base directory layout and link the custom node packs (idempotent)."""
        for folder in STANDARD_MODEL_FOLDERS:
            self.model_dir(folder).mkdir(parents=True, exist_ok=True)
        for path in (self.input_dir, self.output_dir, self.base_dir / "temp", self.custom_nodes_dir):
            path.mkdir(parents=True, exist_ok=True)
        settings = self.base_dir / "user" / "default" / "comfy.settings.json"
        if not settings.exists():
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps(DEFAULT_SETTINGS, indent=2))
        for name, source in self.custom_nodes.items():
            _link(Path(source).resolve(), self.custom_nodes_dir / name)

    def add_model(self, folder: str, source, name: Optional[str] = None) -> Path:
        """Symlink a model file into models/<folder> (before start, or call refresh in the UI)."""
        source = Path(source).resolve()
        link = self.model_dir(folder) / (name or source.name)
        _link(source, link)
        return link

    # ---- process ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("the server has not been started")
        return f"http://{self.host}:{self.port}"

    def command(self, port: int) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", self.host, "--port", str(port),
                "--disable-auto-launch", "--base-directory", str(self.base_dir),
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--preview-method", "none",
                *self.extra_args]

    def start(self, attempts: int = 3) -> "ComfyServer":
        """Start the process and wait until /object_info answers. Retries on a port clash."""
        if self.process is not None:
            raise ServerError("already started")
        for attempt in range(attempts):
            port = free_port(self.host)
            try:
                self._spawn(port)
                self._wait_ready()
                return self
            except ServerError:
                clash = "address already in use" in self.log_text()[self._log_offset:].lower()
                self.stop()
                if not clash or attempt == attempts - 1:
                    raise
                log.warning("port %d was taken before the server bound it; retrying", port)
        raise AssertionError("unreachable")

    def _spawn(self, port: int) -> None:
        env = dict(os.environ)
        env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        self.port = port
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== {' '.join(self.command(port))}\n".encode())
        self._log_file.flush()
        self._log_offset = self.log_path.stat().st_size
        log.info("starting ComfyUI on port %d (base %s, log %s)", port, self.base_dir, self.log_path)
        self.process = subprocess.Popen(self.command(port), cwd=self.comfyui_dir, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self._log_file, stderr=subprocess.STDOUT)
        self._started_at = time.monotonic()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"ComfyUI exited with code {code} while starting:\n{self.log_tail()}")
            try:
                self.request("GET", "/object_info", timeout=10)
                log.info("ComfyUI ready on %s after %.1f s", self.url, time.monotonic() - self._started_at)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s:\n"
                                  f"{self.log_tail()}")
            time.sleep(0.5)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> Optional[int]:
        """Terminate the process (kill it after `grace` seconds); returns its exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    log.warning("ComfyUI (pid %d) ignored SIGTERM for %.0f s; killing it", self.process.pid, grace)
                    self.process.kill()
                    self.process.wait(timeout=grace)
            code = self.process.returncode
            self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def __enter__(self) -> "ComfyServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- log ------------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the server wrote to stdout and stderr so far (all starts in this base dir)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # ---- HTTP -----------------------------------------------------------------------------------
    def request(self, method: str, path: str, data: Any = None, timeout: float = 30.0) -> Any:
        """JSON request; returns the decoded JSON answer ('' bodies give None)."""
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def object_info(self, node_class: Optional[str] = None) -> dict:
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self.request("GET", path)

    def queue(self, prompt: Mapping[str, Any], client_id: Optional[str] = None,
              extra_data: Optional[Mapping[str, Any]] = None) -> str:
        """POST an API-format workflow to /prompt; returns its prompt_id. Raises PromptRejected."""
        payload = {"prompt": prompt, "client_id": client_id or self.client_id}
        if extra_data:
            payload["extra_data"] = dict(extra_data)
        try:
            answer = self.request("POST", "/prompt", payload)
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            raise PromptRejected(e.code, body) from None
        if answer.get("node_errors"):
            raise PromptRejected(200, answer)
        log.info("queued prompt %s (number %s)", answer["prompt_id"], answer.get("number"))
        return answer["prompt_id"]

    def history(self, prompt_id: Optional[str] = None) -> dict:
        return self.request("GET", "/history" if prompt_id is None else f"/history/{prompt_id}")

    def queue_state(self) -> dict:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}, items [number, prompt_id, ...]."""
        return self.request("GET", "/queue")

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll /history/<id> until the prompt has finished (success or error); returns its entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if not self.running():
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; queue: "
                                  f"{self._queue_summary()}\n{self.log_tail()}")
            time.sleep(poll)

    def wait_running(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.05) -> None:
        """Poll /queue until `prompt_id` is the running prompt."""
        deadline = time.monotonic() + timeout
        while True:
            running = [item[1] for item in self.queue_state().get("queue_running", [])]
            if prompt_id in running:
                return
            if prompt_id in self.history(prompt_id):
                raise ServerError(f"prompt {prompt_id} finished before it was seen running")
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} was not running within {timeout:.0f} s")
            time.sleep(poll)

    def _queue_summary(self) -> str:
        try:
            q = self.queue_state()
            return f"{len(q.get('queue_running', []))} running, {len(q.get('queue_pending', []))} pending"
        except Exception as e:  # only for an error message
            return f"unavailable ({e})"

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """POST /interrupt: global, or only if `prompt_id` is the running prompt."""
        self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def events(self, client_id: Optional[str] = None) -> "EventStream":
        """A websocket listener for `client_id` (default: the id `queue` uses). Use as a context manager."""
        return EventStream(self.url, client_id or self.client_id)


def history_messages(entry: Mapping[str, Any], event: Optional[str] = None) -> list:
    """The status messages ([event, data] pairs) of a history entry, optionally of one event type."""
    messages = (entry.get("status") or {}).get("messages") or []
    return [m for m in messages if event is None or m[0] == event]


def output_images(entry: Mapping[str, Any], node_id: Optional[str] = None) -> list[dict]:
    """The `images` records ({filename, subfolder, type}) of a history entry's outputs."""
    outputs = entry.get("outputs") or {}
    nodes = [node_id] if node_id is not None else list(outputs)
    return [img for n in nodes for img in (outputs.get(n) or {}).get("images", [])]


class EventStream:
    """Collects the JSON messages the server sends to one client id over /ws, in a thread.

    Binary frames (previews) are ignored. `wait_for(predicate)` returns the first message (a dict
    with "type" and "data") received since the stream opened that satisfies the predicate.
    """

    def __init__(self, base_url: str, client_id: str, connect_timeout: float = 15.0):
        self.url = base_url.replace("http://", "ws://", 1) + f"/ws?clientId={urllib.parse.quote(client_id)}"
        self.client_id = client_id
        self.messages: list[dict] = []
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._error: Optional[BaseException] = None
        self._loop = None
        self._ws = None
        self._closed = False
        self._connect_timeout = connect_timeout
        self._thread = threading.Thread(target=self._run, name=f"comfy-ws-{client_id}", daemon=True)

    def __enter__(self) -> "EventStream":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        self._thread.start()
        if not self._connected.wait(self._connect_timeout):
            self.close()
            raise ServerError(f"websocket {self.url} did not connect: {self._error!r}")
        # ComfyUI greets every new socket with a "status" message: after it, sends to this client arrive.
        self.wait_for(lambda m: m["type"] == "status", timeout=self._connect_timeout)

    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported through wait_for / open
            self._error = e
            log.debug("websocket listener ended: %r", e)
        finally:
            self._connected.set()
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    async def _main(self) -> None:
        import asyncio

        import aiohttp

        self._loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url, heartbeat=30, max_msg_size=0) as ws:
                self._ws = ws
                self._connected.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        try:
                            message = json.loads(msg.data)
                        except ValueError:
                            continue
                        with self._cond:
                            self.messages.append(message)
                            self._cond.notify_all()
                    elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        break

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for message in self.messages[seen:]:
                    if predicate(message):
                        return message
                seen = len(self.messages)
                if self._closed:
                    raise ServerError(f"websocket closed before the expected message ({self._error!r})")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    types = [m.get("type") for m in self.messages[-20:]]
                    raise ServerError(f"no matching websocket message within {timeout:.0f} s; last types {types}")
                self._cond.wait(remaining)

    def of_type(self, event: str, prompt_id: Optional[str] = None) -> list[dict]:
        """Data of the messages of one type so far (optionally of one prompt)."""
        with self._cond:
            return [m["data"] for m in self.messages if m.get("type") == event
                    and (prompt_id is None or (m.get("data") or {}).get("prompt_id") == prompt_id)]

    def close(self) -> None:
        import asyncio

        if self._loop is not None and self._ws is not None and not self._closed:
            try:
                asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(timeout=5)
            except Exception as e:  # closing is best effort
                log.debug("websocket close: %r", e)
        if self._thread.is_alive():
            self._thread.join(timeout=5)
