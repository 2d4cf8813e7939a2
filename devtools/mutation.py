"""Mutation testing for the pack: change one thing in a module, run its tests, see whether they notice.

``make mutation`` runs this over the modules listed in ``bench/mutation.toml`` and writes
``bench/results/mutation.md``: per module the mutants tried, killed, survived and timed out, and every
survivor with its place, the change, and (from ``bench/mutation_equivalents.toml``) the reason it is
acceptable when it changes nothing a user can observe.

Why a small driver and not mutmut or cosmic-ray (judged from their documentation, not tried here):
- mutmut 3 rewrites each function into a "trampoline" that picks the active mutant by the module's
  dotted name derived from its path. This pack is imported as ``probe_select`` from the repository
  root (``nodes/capture.py`` runs as ``probe_select.nodes.engine.capture``) and ``nodes`` is ComfyUI's own
  top-level module, so the names it records would not match the ones the tests import; it also only
  mutates code inside functions (the sampler tables in ``nodes/noise.py`` are module constants) and
  has no fixed per-module mutant budget.
- cosmic-ray writes each mutant into the working files and restores them afterwards (an interrupted
  run leaves the tree mutated), and enumerates every mutant of every operator: thousands of pytest
  runs that each start ComfyUI, hours on this project's two cores.
Mutating the file on disk in a copy of the repository sidesteps the import question completely:
whatever name a module is imported under, the tests read the mutated file. A "canary" (a module that
raises on import) checks that before any mutant runs, and the unmutated baseline must pass.

How a run goes, per configured module:
1. candidates: every place an operator applies (:data:`OPERATORS`), found with ``ast``, skipping
   docstrings, annotations, f-strings, logging calls (and `if`s that only log), ``__all__`` and lines marked
   ``# mutation: skip``;
2. selection: a seeded, round-robin draw over the operators (``random.Random(f"{seed}:{path}")``), so
   the same source and seed always give the same mutants;
3. each mutant is spliced into the source text (only the mutated span changes, so line numbers stay
   valid), written into a private copy of the repository under the system temp folder, and the
   module's tests run there with ``pytest -x``; a failure kills it, a pass lets it survive, a run over
   ``timeout_factor`` x the baseline time is a timeout (counted as detected). The working tree is
   never written; the copies are deleted at the end, even on Ctrl-C.

Usage::

    python devtools/mutation.py                         # every module, writes bench/results/mutation.md
    python devtools/mutation.py --module probes/losses.py --max-mutants 10 --jobs 2
    python devtools/mutation.py --list --module nodes/noise.py   # the selected mutants, no test run
    python devtools/mutation.py --report-from bench/results/mutation.json   # re-render (new equivalents)

A full run also writes ``bench/results/mutation.json`` (every mutant and its result).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Callable, Iterator, Optional

logger = logging.getLogger("mutation")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "bench" / "mutation.toml"
DEFAULT_EQUIVALENTS = ROOT / "bench" / "mutation_equivalents.toml"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "mutation.md"
SKIP_PRAGMA = "# mutation: skip"
# Names whose method calls only log: dropping or changing them changes no result.
LOGGING_NAMES = {"logger", "logging", "log", "LOGGER"}
# Copied as links (large shared environments) or not at all (caches, VCS data).
LINKED_DIRS = (".venv", ".comfyui")
IGNORED_NAMES = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules", ".mypy_cache"}
IGNORED_PATHS = {"bench/cache", "out"}


class ConfigError(Exception):
    """The configuration names something that is not there, or the set-up cannot be trusted."""


# ----------------------------------------------------------------------------------------------------
# Mutants


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One change to one span of a module's source text."""

    module: str          # path relative to the repository root, as configured
    operator: str
    function: str        # qualified name of the enclosing function/class, "<module>" at top level
    line: int
    col: int             # UTF-8 byte offsets, as ast reports them
    end_line: int
    end_col: int
    before: str          # the original span's text (whitespace collapsed)
    after: str           # the text that replaces it

    @property
    def description(self) -> str:
        return f"{self.operator}: `{_one_line(self.before)}` -> `{_one_line(self.after)}`"


def _one_line(text: str, limit: int = 90) -> str:
    """Whitespace collapsed and long spans (multi-line raises) shortened, for reports and keys."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def apply_mutant(source: str, mutant: Mutant) -> str:
    """The source with the mutant's span replaced; everything else byte-for-byte unchanged."""
    data = source.encode("utf-8")
    starts = [0]
    for index, byte in enumerate(data):
        if byte == 0x0A:
            starts.append(index + 1)
    begin = starts[mutant.line - 1] + mutant.col
    end = starts[mutant.end_line - 1] + mutant.end_col
    return (data[:begin] + mutant.after.encode("utf-8") + data[end:]).decode("utf-8")


# Each operator: node -> iterable of (node whose span is replaced, replacement text).
Replacement = tuple[ast.AST, str]

_COMPARE_SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
_ARITHMETIC_SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult,
}


def _expr(node: ast.AST) -> str:
    """Replacement text for an expression: parenthesised, so precedence never changes around it."""
    return f"({ast.unparse(node)})"


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def op_compare(node: ast.AST) -> Iterator[Replacement]:
    """`<` <-> `<=`, `>` <-> `>=`, `==` <-> `!=`, `is` <-> `is not`, `in` <-> `not in`."""
    if isinstance(node, ast.Compare):
        for index, op in enumerate(node.ops):
            swapped = _COMPARE_SWAPS.get(type(op))
            if swapped is not None:
                mutated = copy.deepcopy(node)
                mutated.ops[index] = swapped()
                yield node, _expr(mutated)


def op_boolean(node: ast.AST) -> Iterator[Replacement]:
    """`and` <-> `or`; `not x` -> `x`."""
    if isinstance(node, ast.BoolOp):
        mutated = copy.deepcopy(node)
        mutated.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield node, _expr(mutated)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield node, _expr(node.operand)


def op_any_all(node: ast.AST) -> Iterator[Replacement]:
    """`any(...)` <-> `all(...)`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("any", "all"):
        mutated = copy.deepcopy(node)
        mutated.func.id = "all" if node.func.id == "any" else "any"
        yield node, _expr(mutated)


def op_arithmetic(node: ast.AST) -> Iterator[Replacement]:
    """`+` <-> `-`, `*` <-> `/`, `//` -> `*`, `%` -> `//`, `**` -> `*` (also in `x += ...`); `-x` -> `x`."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC_SWAPS:
        if not (_is_text(node.left) or _is_text(node.right)):   # string building: messages
            mutated = copy.deepcopy(node)
            mutated.op = _ARITHMETIC_SWAPS[type(node.op)]()
            yield node, _expr(mutated)
    elif isinstance(node, ast.AugAssign) and type(node.op) in _ARITHMETIC_SWAPS:
        mutated = copy.deepcopy(node)
        mutated.op = _ARITHMETIC_SWAPS[type(node.op)]()
        yield node, ast.unparse(mutated)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield node, _expr(node.operand)


def op_constant(node: ast.AST) -> Iterator[Replacement]:
    """Integers n -> n + 1, n - 1; floats x -> x + 1, 0.0; `True` <-> `False`."""
    if not isinstance(node, ast.Constant):
        return
    value = node.value
    if isinstance(value, bool):
        yield node, repr(not value)
    elif isinstance(value, int):
        yield node, _expr(ast.Constant(value + 1))
        yield node, _expr(ast.Constant(value - 1))
    elif isinstance(value, float):
        yield node, _expr(ast.Constant(value + 1.0))
        if value != 0.0:
            yield node, "0.0"


def op_statement(node: ast.AST) -> Iterator[Replacement]:
    """Drop a guard's `return` / `continue` / `break` / `raise`, or a call made for its effect."""
    if isinstance(node, ast.If):
        for stmt in node.body + node.orelse:
            if isinstance(stmt, (ast.Return, ast.Continue, ast.Break, ast.Raise)):
                yield stmt, "pass"
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield node, "pass"


def op_arguments(node: ast.AST) -> Iterator[Replacement]:
    """`f(a, b, ...)` -> `f(b, a, ...)` (the first two positional arguments, when they differ)."""
    if isinstance(node, ast.Call) and len(node.args) >= 2:
        first, second = node.args[0], node.args[1]
        if not isinstance(first, ast.Starred) and not isinstance(second, ast.Starred):
            if ast.dump(first) != ast.dump(second):
                mutated = copy.deepcopy(node)
                mutated.args[0], mutated.args[1] = mutated.args[1], mutated.args[0]
                yield node, _expr(mutated)


def op_negate(node: ast.AST) -> Iterator[Replacement]:
    """The condition of an `if` / `while` / conditional expression / comprehension filter -> `not (...)`."""
    tests = []
    if isinstance(node, (ast.If, ast.While, ast.IfExp)):
        tests.append(node.test)
    elif isinstance(node, ast.comprehension):
        tests.extend(node.ifs)
    for test in tests:
        yield test, _expr(ast.UnaryOp(ast.Not(), test))


OPERATORS: dict[str, Callable[[ast.AST], Iterator[Replacement]]] = {
    "compare": op_compare,
    "boolean": op_boolean,
    "any_all": op_any_all,
    "arithmetic": op_arithmetic,
    "constant": op_constant,
    "statement": op_statement,
    "arguments": op_arguments,
    "negate": op_negate,
}


def _is_logging_call(node: ast.AST) -> bool:
    call = node.value if isinstance(node, ast.Expr) else node
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
        return False
    owner = call.func.value
    return isinstance(owner, ast.Name) and owner.id in LOGGING_NAMES


class _CandidateFinder(ast.NodeVisitor):
    """Walks a module and records every mutant the operators allow, with its enclosing function."""

    def __init__(self, module: str, source: str, operators: dict[str, Callable]):
        self.module = module
        self.source = source
        self.operators = operators
        self.skipped_lines = {
            number for number, text in enumerate(source.splitlines(), 1) if SKIP_PRAGMA in text
        }
        self.scope: list[str] = []
        self.found: list[Mutant] = []
        self._seen: set[tuple] = set()

    # Subtrees that are never mutated.
    def _skip(self, node: ast.AST) -> bool:
        if isinstance(node, ast.JoinedStr) or _is_logging_call(node):
            return True
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):   # docstrings, bare strings
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
        if isinstance(node, ast.If) and not node.orelse and all(_is_logging_call(stmt) for stmt in node.body):
            return True   # a condition that only decides whether to log
        return False

    def _record(self, node: ast.AST) -> None:
        for name, operator in self.operators.items():
            for target, replacement in operator(node):
                if getattr(target, "lineno", None) is None or target.lineno in self.skipped_lines:
                    continue
                key = (target.lineno, target.col_offset, target.end_lineno, target.end_col_offset, replacement)
                if key in self._seen:
                    continue
                self._seen.add(key)
                before = ast.get_source_segment(self.source, target) or ast.unparse(target)
                self.found.append(Mutant(
                    module=self.module, operator=name, function=".".join(self.scope) or "<module>",
                    line=target.lineno, col=target.col_offset, end_line=target.end_lineno,
                    end_col=target.end_col_offset, before=before, after=replacement,
                ))

    def generic_visit(self, node: ast.AST) -> None:
        for field, value in ast.iter_fields(node):
            if field in ("annotation", "returns", "type_comment"):
                continue   # annotations do not run (``from __future__ import annotations``)
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.AST) and not self._skip(child):
                    self.visit(child)

    def visit(self, node: ast.AST) -> None:
        self._record(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.scope.append(node.name)
            try:
                for decorator in node.decorator_list:
                    self.visit(decorator)
                if not isinstance(node, ast.ClassDef):
                    self.visit(node.args)
                for stmt in node.body:
                    if not self._skip(stmt):
                        self.visit(stmt)
            finally:
                self.scope.pop()
        else:
            self.generic_visit(node)


def find_candidates(module: str, source: str, operators: Optional[list[str]] = None) -> list[Mutant]:
    """Every mutant of ``source`` (sorted by position), for the named operators or all of them."""
    chosen = {name: OPERATORS[name] for name in (operators or OPERATORS)}
    finder = _CandidateFinder(module, source, chosen)
    finder.visit(ast.parse(source))
    return sorted(finder.found, key=_position)


def _position(mutant: Mutant) -> tuple:
    return (mutant.line, mutant.col, mutant.end_line, mutant.end_col, mutant.operator, mutant.after)


def select_mutants(candidates: list[Mutant], count: int, seed: int, module: str) -> list[Mutant]:
    """A deterministic draw of ``count`` mutants: shuffled per operator, then taken round-robin.

    Round-robin keeps every operator represented (constants alone outnumber the rest several
    times); the result is sorted by position so reports read top to bottom.
    """
    rng = random.Random(f"{seed}:{module}")
    by_operator: dict[str, list[Mutant]] = {}
    for mutant in sorted(candidates, key=_position):   # the draw depends on the seed only
        by_operator.setdefault(mutant.operator, []).append(mutant)
    pools = []
    for name in OPERATORS:
        pool = list(by_operator.get(name, []))
        rng.shuffle(pool)
        pools.append(pool)
    chosen: list[Mutant] = []
    while len(chosen) < count and any(pools):
        for pool in pools:
            if pool and len(chosen) < count:
                chosen.append(pool.pop())
    return sorted(chosen, key=_position)


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass
class ModuleConfig:
    path: str
    tests: list[str]
    mutants: int


@dataclasses.dataclass
class Config:
    seed: int
    timeout_factor: float
    timeout_floor_s: float
    pytest_args: list[str]
    modules: list[ModuleConfig]


def load_config(path: Path, root: Path) -> Config:
    """Reads the module -> tests table; every configured path must exist (files move in restructurings)."""
    if not path.exists():
        raise ConfigError(f"{path}: no such configuration file")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    defaults = data.get("defaults", {})
    modules = []
    missing = []
    for entry in data.get("module", []):
        module = ModuleConfig(path=entry["path"], tests=list(entry["tests"]),
                              mutants=int(entry.get("mutants", defaults.get("mutants", 40))))
        for relative in [module.path] + module.tests:
            if not (root / relative).exists():
                missing.append(relative)
        modules.append(module)
    if missing:
        raise ConfigError(
            f"{path.name}: configured path(s) not found under {root}: {', '.join(missing)} "
            "(moved or renamed? update the [[module]] entries)"
        )
    if not modules:
        raise ConfigError(f"{path}: no [[module]] entries")
    return Config(
        seed=int(defaults.get("seed", 0)),
        timeout_factor=float(defaults.get("timeout_factor", 3.0)),
        timeout_floor_s=float(defaults.get("timeout_floor_s", 20.0)),
        pytest_args=list(defaults.get("pytest_args", [])),
        modules=modules,
    )


@dataclasses.dataclass(frozen=True)
class Equivalent:
    module: str
    function: str
    mutation: str
    reason: str
    line: Optional[int] = None

    def matches(self, mutant: Mutant) -> bool:
        return (self.module == mutant.module and self.function == mutant.function
                and self.mutation == mutant.description and self.line in (None, mutant.line))


def load_equivalents(path: Path) -> list[Equivalent]:
    """Survivors that change nothing observable, each with its reason (matched without the line number
    unless one is given, so entries survive edits elsewhere in the file)."""
    if not path.exists():
        return []
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return [Equivalent(module=e["module"], function=e["function"], mutation=e["mutation"],
                       reason=e["reason"], line=e.get("line")) for e in data.get("equivalent", [])]


# ----------------------------------------------------------------------------------------------------
# Running


def make_copy(root: Path, destination: Path) -> Path:
    """A private copy of the repository for mutants: sources copied, the environments linked."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        relative = Path(folder).resolve().relative_to(root.resolve())
        dropped = {name for name in names if name in IGNORED_NAMES or name.endswith(".pyc")}
        dropped |= {name for name in names if (relative / name).as_posix() in IGNORED_PATHS}
        if relative == Path("."):
            dropped |= set(LINKED_DIRS)
        return dropped

    shutil.copytree(root, destination, ignore=ignore, symlinks=True)
    for name in LINKED_DIRS:
        if (root / name).exists():
            (destination / name).symlink_to((root / name).resolve(), target_is_directory=True)
    return destination


_LIVE: set[subprocess.Popen] = set()   # test runs in progress, ended by Workspace.close
_LIVE_LOCK = threading.Lock()


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclasses.dataclass
class RunResult:
    status: str          # "killed", "survived", "timeout"
    seconds: float
    detail: str = ""     # the first failing test, when there is one


def run_tests(copy_root: Path, tests: list[str], pytest_args: list[str], timeout_s: float,
              python: str = sys.executable, mutated: bool = True) -> RunResult:
    """Runs the tests in ``copy_root``; exit 0 -> survived, any failure -> killed, too slow -> timeout.

    Exit 4 (pytest could not load the tests) is a configuration error for the unmutated source, but
    for a mutated one it is a detection: tests/conftest.py imports the whole pack, so a mutant (or
    the canary) that raises on import stops pytest before any test runs."""
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args, *tests]
    # No bytecode: a mutant of the same size written within the same second as the previous file
    # would otherwise be served from a stale .pyc (its check is mtime + size).
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.monotonic()
    # A session of its own, so a timeout can kill pytest and whatever it started (Ctrl-C does not
    # reach it either: Workspace.close ends the runs still going).
    process = subprocess.Popen(command, cwd=copy_root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(process)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(process)
        process.communicate()
        return RunResult("timeout", time.monotonic() - started)
    except BaseException:   # Ctrl-C / SIGTERM while this thread waits: end the run with it
        _kill(process)
        raise
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(process)
    seconds = time.monotonic() - started
    if process.returncode == 4 and mutated:
        error = next((line for line in output.splitlines() if line.startswith("E ")), "")
        return RunResult("killed", seconds, f"tests could not be loaded: {error.strip()}"[:200])
    if process.returncode in (4, 5):   # usage error / nothing collected: the configuration is wrong
        raise ConfigError(f"pytest exit {process.returncode} for {tests}:\n{output[-2000:]}")
    if process.returncode == 0:
        return RunResult("survived", seconds)
    failed = next((line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    return RunResult("killed", seconds, failed[:200])


@dataclasses.dataclass
class ModuleReport:
    module: str
    tests: list[str]
    candidates: int
    baseline_s: float
    timeout_s: float
    results: list[tuple[Mutant, RunResult]]


class Workspace:
    """``jobs`` copies of the repository, handed out one per running mutant; removed on exit."""

    def __init__(self, root: Path, jobs: int):
        self.base = Path(tempfile.mkdtemp(prefix="probe-select-mutation-"))
        self.copies: queue.Queue[Path] = queue.Queue()
        try:
            for index in range(jobs):
                self.copies.put(make_copy(root, self.base / f"copy{index}"))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with _LIVE_LOCK:
            for process in _LIVE:
                _kill(process)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_with(self, module: str, text: Optional[str], run: Callable[[Path], RunResult]) -> RunResult:
        """Writes ``text`` as ``module`` into a free copy (None: leave it as it is), runs, restores."""
        copy_root = self.copies.get()
        target = copy_root / module
        original = target.read_bytes()
        try:
            if text is not None:
                target.write_text(text, encoding="utf-8")
            return run(copy_root)
        finally:
            target.write_bytes(original)
            self.copies.put(copy_root)


def run_in_threads(function: Callable, items: list, jobs: int) -> list:
    """``[function(item) for item in items]`` on ``jobs`` daemon threads, in order.

    The main thread waits in short joins so that Ctrl-C / SIGTERM reach it at once (a thread pool's
    blocking wait defers them until a running mutant finishes, and joins its threads at exit); on
    an interrupt the remaining items are dropped and Workspace.close ends the runs in progress.
    """
    results: list = [None] * len(items)
    todo: queue.Queue = queue.Queue()
    for index, item in enumerate(items):
        todo.put((index, item))
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            try:
                index, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = function(item)
            except BaseException as error:   # handed to the main thread below
                errors.append(error)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    finally:
        while not todo.empty():
            todo.get_nowait()
    if errors:
        raise errors[0]
    return results


CANARY = 'raise RuntimeError("mutation canary: the tests must import this copy of the module")\n'


def run_module(workspace: Workspace, root: Path, module: ModuleConfig, config: Config,
               max_mutants: Optional[int], jobs: int, progress: Callable[[str], None]) -> ModuleReport:
    source = (root / module.path).read_text(encoding="utf-8")
    candidates = find_candidates(module.path, source)
    count = module.mutants if max_mutants is None else min(module.mutants, max_mutants)
    mutants = select_mutants(candidates, count, config.seed, module.path)

    def run(timeout_s: float, mutated: bool = True) -> Callable[[Path], RunResult]:
        return lambda copy_root: run_tests(copy_root, module.tests, config.pytest_args, timeout_s, mutated=mutated)

    baseline = workspace.run_with(module.path, None, run(3600.0, mutated=False))
    if baseline.status != "survived":
        raise ConfigError(f"{module.path}: the unmutated tests fail ({baseline.detail or baseline.status}); "
                          "fix them before mutation testing")
    timeout_s = max(config.timeout_floor_s, config.timeout_factor * baseline.seconds)
    # At the end, so that `from __future__` imports stay first: the module still raises on import.
    canary = workspace.run_with(module.path, source + "\n" + CANARY, run(timeout_s))
    if canary.status == "survived":
        raise ConfigError(f"{module.path}: a module that raises on import passes {module.tests}: the tests do "
                          "not import this file (wrong tests configured, or they import another copy)")
    progress(f"{module.path}: {len(mutants)} of {len(candidates)} candidates, baseline "
             f"{baseline.seconds:.1f} s, timeout {timeout_s:.0f} s")

    def one(mutant: Mutant) -> tuple[Mutant, RunResult]:
        result = workspace.run_with(module.path, apply_mutant(source, mutant), run(timeout_s))
        progress(f"  {result.status:8s} {result.seconds:5.1f} s  {mutant.module}:{mutant.line}  {mutant.description}")
        return mutant, result

    results = run_in_threads(one, mutants, jobs)
    return ModuleReport(module.path, module.tests, len(candidates), baseline.seconds, timeout_s, results)


# ----------------------------------------------------------------------------------------------------
# Report


def summarise(report: ModuleReport, equivalents: list[Equivalent]) -> dict:
    counts = {"killed": 0, "survived": 0, "timeout": 0}
    survivors = []
    for mutant, result in report.results:
        counts[result.status] += 1
        if result.status == "survived":
            reason = next((e.reason for e in equivalents if e.matches(mutant)), None)
            survivors.append((mutant, reason))
    equivalent = sum(1 for _, reason in survivors if reason is not None)
    scored = len(report.results) - equivalent
    detected = counts["killed"] + counts["timeout"]
    seconds = sum(result.seconds for _, result in report.results)
    return {
        "tried": len(report.results), **counts, "equivalent": equivalent,
        "score": detected / scored if scored else 1.0, "survivors": survivors,
        "seconds_per_mutant": seconds / len(report.results) if report.results else 0.0,
    }


def render_report(reports: list[ModuleReport], equivalents: list[Equivalent], config: Config,
                  config_path: str, total_s: float, jobs: int) -> str:
    lines = [
        "# Mutation testing",
        "",
        f"`make mutation` (`devtools/mutation.py`, modules and tests in `{config_path}`, seed {config.seed}): "
        "one mutant at a time, written into a copy of the repository, each module's tests run with "
        "`pytest -x`. Score = (killed + timed out) / (tried - equivalent); a survivor is equivalent when "
        "`bench/mutation_equivalents.toml` says why it changes nothing a user can observe.",
        "",
        "| module | tests | candidates | tried | killed | survived | timed out | equivalent | score | s / mutant |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summaries = [(report, summarise(report, equivalents)) for report in reports]
    for report, s in summaries:
        tests = ", ".join(f"`{Path(t).name}`" for t in report.tests)
        lines.append(f"| `{report.module}` | {tests} | {report.candidates} | {s['tried']} | {s['killed']} | "
                     f"{s['survived']} | {s['timeout']} | {s['equivalent']} | {s['score']:.0%} | "
                     f"{s['seconds_per_mutant']:.1f} |")
    lines += ["", f"Wall time {total_s / 60:.1f} min with {jobs} job(s).", "", "## Survivors", ""]
    for report, s in summaries:
        lines.append(f"### `{report.module}`")
        lines.append("")
        if not s["survivors"]:
            lines += ["None.", ""]
            continue
        for mutant, reason in s["survivors"]:
            why = f"equivalent: {reason}" if reason else "**not explained** (a test should kill it)"
            lines.append(f"- `{mutant.module}:{mutant.line}` in `{mutant.function}`, {mutant.description} "
                         f"- {why}")
        lines.append("")
    run_modules = {report.module for report in reports}
    stale = [e for e in equivalents if e.module in run_modules and not any(
        e.matches(mutant) for report in reports for mutant, result in report.results if result.status == "survived")]
    if stale:
        lines += ["## Equivalence entries that matched no survivor in this run", ""]
        lines += [f"- `{e.module}` `{e.function}`: {e.mutation}" for e in stale]
        lines.append("")
    return "\n".join(lines)


def reports_to_json(reports: list[ModuleReport], seed: int, total_s: float, jobs: int) -> dict:
    """Everything the report is made from, so it can be rendered again (``--report-from``)."""
    return {"seed": seed, "total_s": total_s, "jobs": jobs, "modules": [
        {"module": r.module, "tests": r.tests, "candidates": r.candidates, "baseline_s": r.baseline_s,
         "timeout_s": r.timeout_s, "results": [
             {**dataclasses.asdict(m), "description": m.description, **dataclasses.asdict(res)}
             for m, res in r.results]} for r in reports]}


def reports_from_json(data: dict) -> list[ModuleReport]:
    mutant_fields = [field.name for field in dataclasses.fields(Mutant)]
    result_fields = [field.name for field in dataclasses.fields(RunResult)]
    return [ModuleReport(
        module=m["module"], tests=m["tests"], candidates=m["candidates"], baseline_s=m["baseline_s"],
        timeout_s=m["timeout_s"], results=[
            (Mutant(**{k: r[k] for k in mutant_fields}), RunResult(**{k: r[k] for k in result_fields}))
            for r in m["results"]]) for m in data["modules"]]


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(path)


def _write(text: str, output: Optional[Path]) -> None:
    """The report to ``output`` (atomically) or, without one, to stdout."""
    if output is None:
        print(text)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, output)
    logger.info("wrote %s", output)


def _stop(signum: int, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--equivalents", type=Path, default=DEFAULT_EQUIVALENTS)
    parser.add_argument("--module", action="append", help="only this configured module path (repeatable)")
    parser.add_argument("--max-mutants", type=int, help="at most this many mutants per module")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (each in its own copy)")
    parser.add_argument("--seed", type=int, help="overrides the configured seed")
    parser.add_argument("--output", type=Path,
                        help=f"report file (default {DEFAULT_OUTPUT.relative_to(ROOT)} for a full run; "
                             "a partial run prints to stdout unless given)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--list", action="store_true", help="print the selected mutants and exit")
    parser.add_argument("--report-from", type=Path, metavar="JSON",
                        help="render the report again from a run's JSON (after editing the equivalents)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _stop)   # `kill` / `timeout`: clean up the copies as Ctrl-C does

    try:
        config = load_config(args.config, ROOT)
        if args.seed is not None:
            config.seed = args.seed
        modules = config.modules
        if args.module:
            unknown = [m for m in args.module if m not in {c.path for c in modules}]
            if unknown:
                raise ConfigError(f"--module {', '.join(unknown)} is not configured in {args.config.name} "
                                  f"(configured: {', '.join(c.path for c in modules)})")
            modules = [c for c in modules if c.path in args.module]
        equivalents = load_equivalents(args.equivalents)

        if args.report_from:
            data = json.loads(args.report_from.read_text(encoding="utf-8"))
            config.seed = data["seed"]
            text = render_report(reports_from_json(data), equivalents, config, _shown(args.config),
                                 data["total_s"], data["jobs"])
            _write(text, args.output)
            return 0

        if args.list:
            for module in modules:
                source = (ROOT / module.path).read_text(encoding="utf-8")
                candidates = find_candidates(module.path, source)
                count = module.mutants if args.max_mutants is None else min(module.mutants, args.max_mutants)
                selected = select_mutants(candidates, count, config.seed, module.path)
                print(f"{module.path}: {len(selected)} of {len(candidates)} candidates")
                for mutant in selected:
                    print(f"  {mutant.module}:{mutant.line}  in {mutant.function}  {mutant.description}")
            return 0

        started = time.monotonic()
        with Workspace(ROOT, args.jobs) as workspace:
            reports = [run_module(workspace, ROOT, module, config, args.max_mutants, args.jobs, logger.info)
                       for module in modules]
        total_s = time.monotonic() - started
    except ConfigError as error:
        logger.error("mutation: %s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("mutation: stopped; the working tree was never written")
        return 130

    text = render_report(reports, equivalents, config, _shown(args.config), total_s, args.jobs)
    partial = bool(args.module) or args.max_mutants is not None
    output = args.output or (None if partial else DEFAULT_OUTPUT)
    _write(text, output)
    json_path = args.json or (None if output != DEFAULT_OUTPUT else DEFAULT_OUTPUT.with_suffix(".json"))
    if json_path is not None:
        json_path.write_text(json.dumps(reports_to_json(reports, config.seed, total_s, args.jobs), indent=1),
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
