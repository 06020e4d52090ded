#!/usr/bin/env bash
# The README's main job: install lamina, then run a local swarm of 3 run-node processes on the
# embedded tiny model and generate text through it with the client library.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 scripts/demo.py "$@"
