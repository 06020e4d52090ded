#!/usr/bin/env bash
# The README's main job: install lamina (into .venv), then run a local swarm of 3 run-node
# processes that split the embedded SmolLM2-135M-Instruct and answer a question through it with
# the client library.
set -euo pipefail
export LAMINA_DEMO_T0="${LAMINA_DEMO_T0:-$(date +%s.%N)}"   # demo.py reports the time to the first token from here
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python scripts/demo.py "$@"
