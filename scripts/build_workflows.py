#!/usr/bin/env python
"""Write (or check) the example workflows of Probe-Select: example_workflows/<name>.json and their API twins.

    .venv/bin/python scripts/build_workflows.py            # (re)write every file
    .venv/bin/python scripts/build_workflows.py --check    # exit 1 if any file is missing or stale
    .venv/bin/python scripts/build_workflows.py --thumbnails   # also redraw every example_workflows/<name>.jpg

The graphs are declared in scripts/templates_selection.py and scripts/templates_analysis.py; the
machinery (declaring, checking against ComfyUI's node schemas, layout, UI -> API, staleness) is
scripts/workflow_graph.py. Its names are re-exported here for the tests.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

# The declaration modules import the machinery as `workflow_graph`, a sibling file: this folder
# goes on sys.path whether the script is run, imported by path (tests) or run with -m.
_SCRIPTS = str(Path(__file__).resolve().parent)
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)

import json  # noqa: E402

import templates_analysis  # noqa: E402,F401  (registers its workflows)
import templates_selection  # noqa: E402,F401  (registers its workflows)
from workflow_graph import *  # noqa: E402,F401,F403  (the machinery, for the tests)
from thumbnails import picture_thumbnail, thumbnail, thumbnail_path  # noqa: E402
from workflow_graph import API_DIR, ROOT, WORKFLOWS, render, stale  # noqa: E402


def thumbnails_to_write(files: dict[Path, str], rewritten: list[Path], force: bool = False) -> dict[Path, bytes]:
    """UI file's thumbnail path -> JPEG bytes, for those missing, whose UI file is rewritten, or all (`force`).

    A thumbnail is compared by existence only: the JPEG encoder's bytes may differ between Pillow
    builds, and the picture follows the UI file it is drawn from.
    """
    out = {}
    for path, text in files.items():
        if path.parent == API_DIR:
            continue
        jpg = thumbnail_path(path)
        if force or path in rewritten or not jpg.exists():
            picture = WORKFLOWS[path.stem]().picture
            out[jpg] = (picture_thumbnail(ROOT / picture, path.stem) if picture
                        else thumbnail(json.loads(text), path.stem))
    return out


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is missing or stale")
    parser.add_argument("--thumbnails", action="store_true", help="redraw every thumbnail")
    args = parser.parse_args(argv)
    files = render()
    # --check asks whether a file means something else than its declaration; a rewrite also brings
    # layout and outputs up to date with the ComfyUI it runs on.
    out_of_date = stale(files, exact=not args.check)
    if args.check:
        out_of_date += [thumbnail_path(p) for p in files if p.parent != API_DIR and not thumbnail_path(p).exists()]
        for path in out_of_date:
            print(f"stale: {path.relative_to(ROOT)} (run {Path(__file__).relative_to(ROOT)})", file=sys.stderr)
        return 1 if out_of_date else 0
    for path in out_of_date:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path.relative_to(ROOT)}")
    for path, data in thumbnails_to_write(files, out_of_date, force=args.thumbnails).items():
        path.write_bytes(data)
        print(f"wrote {path.relative_to(ROOT)} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
