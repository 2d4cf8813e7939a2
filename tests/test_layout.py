"""The repository's layout rules, checked on the source (no imports executed).

- the import graph between folders has no cycle;
- ``probes/`` (the pure-PyTorch library) imports neither ComfyUI nor ``nodes/``;
- nothing outside ``tests/`` imports from ``tests/``;
- the library has one import name: ``probe_select.probes`` (relative inside the pack), never a
  top-level ``probes``;
- the README's layout section names every top-level folder, and only folders that exist.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("nodes", "probes", "tools", "devtools", "scripts", "bench")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "execution",
                 "server", "latent_preview", "node_helpers"}
TEST_MODULES = {"conftest", "helpers", "server_utils", "dataset_writer_proc"} | {
    p.stem for p in (ROOT / "tests").glob("test_*.py")}


def _sources() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for folder in SOURCE_DIRS:
        files += sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return files


def _package_of(path: Path) -> list[str]:
    """Dotted package parts of the module at ``path``, relative to the pack root."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] != "__init__" else parts[:-1]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, is_pack_relative) for every import in ``path``; relative imports are resolved to a
    dotted path from the pack root."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path)
                if path.name == "__init__.py":
                    base = list(path.relative_to(ROOT).parent.parts)
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    found += [(".".join(base + [alias.name]), True) for alias in node.names]
                else:
                    found.append((module, True))
            else:
                found.append((node.module, False))
    return found


def _folder(dotted: str) -> str | None:
    """The repository folder a pack module lives in (``nodes/engine``), or None if not ours."""
    parts = dotted.split(".")
    if parts[0] == "probe_select":
        parts = parts[1:]
    if not parts or parts[0] not in SOURCE_DIRS:
        return None
    path = ROOT.joinpath(*parts)
    while parts and not path.is_dir():
        parts, path = parts[:-1], path.parent
    return "/".join(parts) or None


def _folder_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        here = str(path.relative_to(ROOT).parent)
        if here == ".":
            continue
        for module, relative in _imports(path):
            if not relative and module.split(".")[0] in COMFY_MODULES and module.split(".")[0] == "nodes":
                continue                    # absolute `nodes` is ComfyUI's nodes.py, never the pack's
            target = _folder(module)
            if target and target != here:
                graph.setdefault(here, set()).add(target)
    return graph


def test_no_import_cycle_between_folders():
    graph = _folder_graph()
    assert "nodes" in graph and "nodes/engine" in graph["nodes"]       # the walk sees the real edges
    assert "probes" in graph.get("nodes/engine", set())

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return trail + [nxt]
                if nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in (cycle_from(folder) for folder in graph) if c]
    assert cycles == [], cycles


def test_probes_never_import_comfyui_or_the_nodes():
    offenders = []
    for path in _sources():
        if path.relative_to(ROOT).parts[0] != "probes":
            continue
        for module, relative in _imports(path):
            top = module.split(".")[0]
            folder = _folder(module) or ""
            if (not relative and top in COMFY_MODULES) or folder.startswith("nodes"):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


def test_nothing_outside_tests_imports_the_test_suite():
    offenders = []
    for path in _sources():
        text = path.read_text()
        if re.search(r"""["'/]tests["'/]""", text) and "sys.path" in text:
            offenders.append(f"{path.relative_to(ROOT)}: puts tests/ on sys.path")
        for module, relative in _imports(path):
            if not relative and (module.split(".")[0] in TEST_MODULES or module.startswith("tests")):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


def test_the_library_has_one_import_name():
    offenders = []
    for path in _sources() + sorted((ROOT / "tests").glob("*.py")):
        for module, relative in _imports(path):
            if not relative and module.split(".")[0] == "probes":
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert offenders == []


def _readme_layout() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


def test_readme_layout_matches_the_tree():
    layout = _readme_layout()
    named = set(re.findall(r"^([A-Za-z_][\w./-]*)/", layout, flags=re.M))
    # The tracked tree: untracked or ignored folders (out/, build outputs) are not part of the layout.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top_level = {line.split("/", 1)[0] for line in tracked.splitlines() if "/" in line}
    top_level = {name for name in top_level if not name.startswith((".", "_"))}
    nested = {n for n in named if "/" in n}
    assert top_level <= named, f"folders missing from the README layout: {sorted(top_level - named)}"
    assert all((ROOT / n).is_dir() for n in named), [n for n in named if not (ROOT / n).is_dir()]
    assert {"nodes/engine", "probes/training"} <= nested
