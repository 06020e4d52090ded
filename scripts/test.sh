#!/usr/bin/env bash
# Installs lamina and its test dependencies (into .venv) and runs the whole suite. `.ci/run`
# calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
