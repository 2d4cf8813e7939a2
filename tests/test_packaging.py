"""The Comfy Registry archive and metadata, checked the way `comfy node publish` builds and validates
them (scripts/package.py repeats comfy-cli's file selection and its ruff checks; no network).

What a user's ComfyUI receives must hold the run-time files only (no weights, tests, bench data or
dev tools, under 1 MB), every module the shipped code imports, and `pyproject.toml` must carry the
fields the registry reads.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional
from urllib.parse import urlparse

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# scripts/ is not a package; load the packaging module from its file, as test_workflows.py does.
_spec = importlib.util.spec_from_file_location("probe_select_packaging", ROOT / "scripts" / "package.py")
package = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = package     # dataclasses look their module up while the class is built
_spec.loader.exec_module(package)

RUNTIME_FILES = ("__init__.py", "nodes/__init__.py", "probes/__init__.py", "requirements.txt", "pyproject.toml",
                 "README.md", "LICENSE")
# Folders a user's ComfyUI reads at run time; every tracked file in them ships (weights, bytecode
# and the workflow generator aside).
RUNTIME_DIRS = ("nodes", "probes", "js", "example_workflows", "workflows", "locales", "tools")
WORKFLOW_DIRS = ("example_workflows", "workflows")
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio", "torchsde"}
# comfy-cli's validate_version(): each comma-separated part of requires-comfyui.
REQUIRES_COMFYUI_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
# The registry's node id rules (docs.comfy.org/registry/specifications): < 100 characters of
# letters, digits, '-', '_', '.', starting with a letter, no two special characters in a row.
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")
ICON_SUFFIXES = {".svg", ".png", ".jpg", ".jpeg", ".gif"}
ICON_MAX_SIZE = (800, 400)


@pytest.fixture(scope="module")
def archive() -> list:
    return package.archive_files(ROOT)


def _requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements(text: str) -> list[str]:
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _module_file(parts: Iterable[str], files: set[str]) -> Optional[str]:
    """The file of a module given by its path parts inside the pack, if `files` has it; a folder
    (with a trailing '/') for a namespace package, a folder of modules without __init__.py."""
    stem = "/".join(parts)
    for candidate in ((f"{stem}.py", f"{stem}/__init__.py") if stem else ("__init__.py",)):
        if candidate in files:
            return candidate
    if stem and any(name.startswith(f"{stem}/") for name in files):
        return f"{stem}/"
    return None


def _has(files: set[str], module_file: str) -> bool:
    if module_file.endswith("/"):
        return any(name.startswith(module_file) for name in files)
    return module_file in files


def _python_files(root: Path) -> set[str]:
    """The repository's Python files: git-tracked ones, or (no git) all but hidden folders'."""
    tracked = [p for p in package.tracked_files(root) if p.endswith(".py")]
    if tracked:
        return set(tracked)
    found = set()
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.update((Path(directory) / name).relative_to(root).as_posix() for name in files if name.endswith(".py"))
    return found


def unshipped_imports(root: Path, shipped: set[str]) -> list[str]:
    """Imports in shipped Python files that name a module of this repository the archive lacks
    (or a relative import that resolves to nothing)."""
    repo_files = _python_files(root)
    problems = []
    for path in sorted(p for p in shipped if p.endswith(".py")):
        package_parts = PurePosixPath(path).parent.parts
        for node in ast.walk(ast.parse((root / path).read_text(encoding="utf-8"), filename=path)):
            if isinstance(node, ast.Import):
                targets = [(tuple(alias.name.split(".")), False) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module_parts = tuple(node.module.split(".")) if node.module else ()
                if node.level:
                    up = node.level - 1
                    if up > len(package_parts):
                        problems.append(f"{path}:{node.lineno}: relative import above the pack root")
                        continue
                    base = package_parts[:len(package_parts) - up] + module_parts
                    if _module_file(base, repo_files) is None:
                        problems.append(f"{path}:{node.lineno}: {'.' * node.level}{node.module or ''} "
                                        "resolves to nothing")
                        continue
                else:
                    base = module_parts
                # `from X import name`: name is a submodule or an attribute of X.
                targets = [(base, False)] + [(base + (alias.name,), True) for alias in node.names]
            else:
                continue
            for parts, may_be_attribute in targets:
                in_repo = _module_file(parts, repo_files)
                if in_repo is None:
                    # A library (ComfyUI, torch), or an attribute; only a folder of this repository
                    # that lacks the module is an error.
                    if not may_be_attribute and (root / parts[0]).is_dir():
                        problems.append(f"{path}:{node.lineno}: imports {'.'.join(parts)}, which the "
                                        "repository does not have")
                elif not _has(shipped, in_repo):
                    problems.append(f"{path}:{node.lineno}: imports {in_repo}, not in the archive")
    return problems


def _git_repo(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)


# --- the real archive -----------------------------------------------------------------------------

def test_archive_holds_the_run_time_files_and_nothing_else(archive, tmp_path):
    paths = {entry.path for entry in archive}
    assert package.archive_problems(archive) == []
    assert not [p for p in paths if p.lower().endswith(package.WEIGHT_SUFFIXES) or "/weights/" in f"/{p}"]
    assert not [p for p in paths if p.split("/")[0] in {"tests", "bench", "scripts", "devtools", ".ci", ".github"}]
    assert set(RUNTIME_FILES) <= paths, set(RUNTIME_FILES) - paths
    assert [p for p in paths if p.startswith("js/") and p.endswith(".js")]
    assert [p for p in paths if p.split("/")[0] in WORKFLOW_DIRS and p.endswith(".json")]
    # Nothing a run needs is left out by an over-broad pattern.
    tracked = package.tracked_files(ROOT)
    runtime = {p for p in tracked if p.split("/")[0] in RUNTIME_DIRS and (ROOT / p).is_file()
               and not p.lower().endswith(package.WEIGHT_SUFFIXES) and "__pycache__" not in p
               and PurePosixPath(p).name != "build_workflows.py"}
    assert runtime <= paths, sorted(runtime - paths)
    # Under 2 MB on disk and 1 MB as the zip comfy-cli uploads.
    assert sum(entry.size for entry in archive) < package.MAX_UNPACKED_BYTES
    zip_path = package.write_archive(archive, ROOT, tmp_path / "node.zip")
    assert zip_path.stat().st_size < package.MAX_ARCHIVE_BYTES
    assert set(zipfile.ZipFile(zip_path).namelist()) == paths


def test_shipped_code_imports_only_shipped_modules(archive):
    assert unshipped_imports(ROOT, {entry.path for entry in archive}) == []


def test_registry_validator_is_clean():
    """`comfy node publish` runs ruff over the whole checkout and warns (soon: fails) on exec, eval
    and `a; b`."""
    assert package.validator_findings(ROOT) == []


def test_pyproject_has_the_fields_the_registry_reads(archive):
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = config["project"], config["tool"]["comfy"]
    assert NODE_ID.match(project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"].strip()
    assert (ROOT / project["license"]["file"]).is_file()

    repository = project["urls"]["Repository"]
    owner_repo = urlparse(repository).path.strip("/").split("/")
    assert urlparse(repository).netloc == "github.com" and len(owner_repo) == 2
    for key in ("Documentation", "Bug Tracker", "Issues"):
        assert project["urls"][key].startswith(repository), key

    assert comfy["PublisherId"] and comfy["DisplayName"]
    parts = [part.strip() for part in comfy["requires-comfyui"].split(",")]
    assert all(REQUIRES_COMFYUI_PART.match(part) for part in parts), comfy["requires-comfyui"]
    assert any(part.startswith(">=") for part in parts)

    # Icon: a raw GitHub URL of a file in this repository, shipped, of a kind and size the registry takes.
    icon = urlparse(comfy["Icon"])
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com", comfy["Icon"]
    icon_owner, icon_repo, _branch, *icon_path = icon.path.strip("/").split("/")
    assert [icon_owner, icon_repo] == owner_repo
    icon_file = "/".join(icon_path)
    assert icon_file in package.tracked_files(ROOT) and icon_file in {entry.path for entry in archive}
    assert PurePosixPath(icon_file).suffix.lower() in ICON_SUFFIXES
    if PurePosixPath(icon_file).suffix.lower() != ".svg":
        with Image.open(ROOT / icon_file) as image:
            assert image.width <= ICON_MAX_SIZE[0] and image.height <= ICON_MAX_SIZE[1], image.size

    # ComfyUI-Manager installs requirements.txt, the registry reads [project] dependencies: the same
    # list, and never torch (it comes from the user's ComfyUI).
    requirements = _requirements((ROOT / "requirements.txt").read_text(encoding="utf-8"))
    assert requirements and sorted(requirements) == sorted(project["dependencies"])
    assert not TORCH_PACKAGES & {_requirement_name(line) for line in requirements}


# --- the checks themselves can fail ----------------------------------------------------------------

def test_a_pack_without_comfyignore_is_caught_and_ours_fixes_it(tmp_path):
    small = b"x" * 64
    files = {
        "__init__.py": small, "nodes/__init__.py": small, "nodes/leftover.safetensors": small,
        "probes/__init__.py": small, "js/scores.js": small, "workflows/a.json": b"{}",
        "example_workflows/b.json": b"{}", "example_workflows/b.png": small,
        "example_workflows/build_workflows.py": small,
        "bench/proxy_world/weights/proxy_unet.safetensors": small, "bench/results/big.md": b"x" * 2_100_000,
        "tests/test_x.py": small, "scripts/setup_env.sh": small, "Makefile": small, "requirements.txt": small,
        "pyproject.toml": (ROOT / "pyproject.toml").read_bytes(), "README.md": small, "LICENSE": small,
        "icon.png": small,
    }
    _git_repo(tmp_path, files)
    (tmp_path / "nodes" / "untracked.py").write_bytes(small)     # comfy-cli packs tracked files only

    problems = package.archive_problems(package.archive_files(tmp_path))
    for expected in ("weights: bench/proxy_world/weights/proxy_unet.safetensors",
                     "weights: nodes/leftover.safetensors", "development file: tests/test_x.py",
                     "development file: Makefile", "development file: scripts/setup_env.sh"):
        assert expected in problems
    assert any(problem.startswith("archive holds") for problem in problems)

    shutil.copy(ROOT / ".comfyignore", tmp_path / ".comfyignore")
    shipped = package.archive_files(tmp_path)
    assert {entry.path for entry in shipped} == {
        "__init__.py", "nodes/__init__.py", "probes/__init__.py", "js/scores.js", "workflows/a.json",
        "example_workflows/b.json", "example_workflows/b.png", "requirements.txt", "pyproject.toml",
        "README.md", "LICENSE", "icon.png"}
    assert package.archive_problems(shipped) == []


def test_an_import_of_an_unshipped_module_is_caught(tmp_path):
    files = {"__init__.py": b"from .nodes import sampling\n",
             "nodes/__init__.py": b"",
             "nodes/sampling.py": b"from ..devtools.tiny import build\nfrom .missing import x\nimport bench.models\n",
             "devtools/__init__.py": b"", "devtools/tiny.py": b"build = 1\n", "bench/models.py": b""}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    shipped = {"__init__.py", "nodes/__init__.py", "nodes/sampling.py"}
    problems = unshipped_imports(tmp_path, shipped)
    assert problems == ["nodes/sampling.py:1: imports devtools/tiny.py, not in the archive",
                        "nodes/sampling.py:2: .missing resolves to nothing",
                        "nodes/sampling.py:3: imports bench/models.py, not in the archive"]
    assert unshipped_imports(tmp_path, shipped | {"devtools/__init__.py", "devtools/tiny.py", "bench/models.py"}) \
        == ["nodes/sampling.py:2: .missing resolves to nothing"]


def test_the_validator_check_catches_semicolons_and_exec(tmp_path):
    (tmp_path / "node.py").write_text("a = 1; b = 2\nc = 3;\nexec('d = 4')\n")
    findings = "\n".join(package.validator_findings(tmp_path))
    assert "E702" in findings and "E703" in findings and "S102" in findings
