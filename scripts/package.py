"""The Comfy Registry archive, built the way `comfy node pack` / `comfy node publish` builds it.

comfy-cli (1.23) zips the git-tracked files (every file on disk when git gives no answer), leaves
out those matching `.comfyignore` (gitignore syntax through pathspec's "gitwildmatch" patterns;
blank and `#` lines dropped; the last matching pattern wins), keeps anything under
`[tool.comfy] includes` whatever the ignore file says, and, before publishing, runs
`ruff check . --select S102,S307,E702` as its "security checks" (warnings today, errors soon).
comfy-cli itself is not a dependency: it pulls in telemetry clients, uv and cookiecutter; this
module repeats its two small rules with the same pathspec library instead.

    python -m scripts.package        # from the repository root (`make package`)

writes `out/<name>-<version>.zip` and `out/archive-files.txt` (size and path per line), prints the
totals and exits non-zero when the archive would carry something it must not, or the validator
would warn.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tomllib
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from pathspec import PathSpec

import tools  # noqa: F401  (registers the package probe_select: the library's one import name)
from probe_select.probes.atomic import atomic_write

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
IGNORE_FILE = ".comfyignore"
# What comfy-cli's publish step runs (S102 exec, S307 eval, E702 `a; b`), plus E703 (a trailing
# semicolon), the same habit the registry says it will turn into an error.
VALIDATOR_RULES = ("S102", "S307", "E702", "E703")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf", ".npz")
# Folders and files that exist for development only: tests, benchmarks and their data, CI, tools.
DEV_ONLY_TOP_LEVEL = ("tests", "bench", "scripts", "devtools", ".ci", ".github", "Makefile",
                      "pytest.ini", "requirements-dev.txt")
# The zip comfy-cli uploads stays under 1 MB; unpacked (what lands in custom_nodes) under 2 MB: the
# templates (four families, a JSON graph, its API twin and a thumbnail each) are text that zips ~5:1.
MAX_ARCHIVE_BYTES = 1_000_000
MAX_UNPACKED_BYTES = 2_000_000


@dataclass(frozen=True)
class ArchiveEntry:
    path: str           # as stored in the zip (forward slashes, relative to the pack root)
    size: int           # bytes on disk


def load_ignore_spec(root: Path) -> Optional[PathSpec]:
    """`.comfyignore` as comfy-cli reads it; None when the file is missing or has no pattern."""
    ignore_path = root / IGNORE_FILE
    if not ignore_path.is_file():
        return None
    lines = ignore_path.read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not patterns:
        return None
    # comfy-cli asks for "gitwildmatch", which pathspec 1.x still serves (same rules) with a
    # DeprecationWarning; asking for the same factory keeps this file's matching identical to it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return PathSpec.from_lines("gitwildmatch", patterns)


def tracked_files(root: Path) -> list[str]:
    """`git ls-files` under root; [] when git is missing or root is no git checkout (comfy-cli then
    zips every file on disk)."""
    try:
        listing = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [line for line in listing.splitlines() if line.strip()]


def _forced(path: str, include_prefixes: list[str]) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in include_prefixes if prefix)


def _walk(root: Path, start: Path, ignored) -> Iterable[str]:
    for directory, dirs, files in os.walk(start):
        rel_dir = Path(directory).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if d != ".git" and not ignored(rel_dir + d)]
        for name in files:
            if not ignored(rel_dir + name):
                yield rel_dir + name


def archive_files(root: Path = ROOT) -> list[ArchiveEntry]:
    """The files the registry archive of the pack at `root` holds, sorted by path."""
    config = registry_config(root) if (root / "pyproject.toml").is_file() else {}
    includes = config.get("tool", {}).get("comfy", {}).get("includes", [])
    include_prefixes = [PurePosixPath(os.path.normpath(item.lstrip("/"))).as_posix() for item in includes]
    spec = load_ignore_spec(root)

    def ignored(path: str) -> bool:
        return spec is not None and not _forced(path, include_prefixes) and spec.match_file(path)

    tracked = tracked_files(root)
    if tracked:
        paths = {p for p in tracked if not ignored(p) and (root / p).is_file()}
    else:
        paths = set(_walk(root, root, ignored))
    for item, prefix in zip(includes, include_prefixes):
        target = root / prefix
        if target.is_file():
            paths.add(prefix)
        elif target.is_dir():
            paths.update(_walk(root, target, ignored))
    return [ArchiveEntry(p, (root / p).stat().st_size) for p in sorted(paths)]


def archive_problems(entries: list[ArchiveEntry]) -> list[str]:
    """What must never reach a user's custom_nodes folder: weights, tests, bench data, dev files,
    and an archive over MAX_UNPACKED_BYTES unpacked."""
    problems = []
    for entry in entries:
        top = entry.path.split("/", 1)[0]
        if entry.path.lower().endswith(WEIGHT_SUFFIXES) or "/weights/" in f"/{entry.path}":
            problems.append(f"weights: {entry.path}")
        elif top in DEV_ONLY_TOP_LEVEL:
            problems.append(f"development file: {entry.path}")
        elif "__pycache__" in entry.path.split("/") or entry.path.endswith(".pyc"):
            problems.append(f"bytecode: {entry.path}")
    total = sum(entry.size for entry in entries)
    if total > MAX_UNPACKED_BYTES:
        problems.append(f"archive holds {total} bytes, over {MAX_UNPACKED_BYTES}")
    return problems


def registry_config(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def validator_findings(root: Path = ROOT) -> list[str]:
    """ruff's findings for the registry's rules over the whole checkout, as the publish step runs
    it (from the pack root, `.`: ruff skips .venv and what .gitignore ignores)."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "-q", "--select", ",".join(VALIDATOR_RULES),
                           "--output-format", "concise", "--exit-zero", "--no-cache"],
                          cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ruff failed ({proc.returncode}): {proc.stderr.strip()}")
    return [line for line in proc.stdout.splitlines() if line.strip()]


def write_archive(entries: list[ArchiveEntry], root: Path, zip_path: Path) -> Path:
    def write(temp: Path) -> None:
        with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
            for entry in entries:
                archive.write(root / entry.path, entry.path)

    return atomic_write(zip_path, write)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    project = registry_config(ROOT)["project"]
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    entries = archive_files(ROOT)
    zip_path = write_archive(entries, ROOT, out / f"{project['name']}-{project['version']}.zip")
    listing = "".join(f"{entry.size:>9} {entry.path}\n" for entry in entries)
    atomic_write(out / "archive-files.txt", lambda temp: temp.write_text(listing, encoding="utf-8"))
    total = sum(entry.size for entry in entries)
    logger.info("%s: %d files, %d bytes (%d bytes compressed); list in %s", zip_path.relative_to(ROOT),
                len(entries), total, zip_path.stat().st_size, (out / "archive-files.txt").relative_to(ROOT))
    failures = archive_problems(entries) + [f"registry validator: {line}" for line in validator_findings(ROOT)]
    if zip_path.stat().st_size > MAX_ARCHIVE_BYTES:
        failures.append(f"the zip has {zip_path.stat().st_size} bytes, over {MAX_ARCHIVE_BYTES}")
    for failure in failures:
        logger.error("%s", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
