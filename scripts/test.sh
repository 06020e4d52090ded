#!/usr/bin/env bash
# Installs test dependencies and runs the whole suite. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
python3 -m pytest -q -p no:cacheprovider "$@"
