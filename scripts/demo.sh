#!/usr/bin/env bash
# The README's main job: install lamina, write the embedded tiny model, and generate text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pipeline write-tiny .lamina/tiny >/dev/null
python3 -m pipeline generate --model .lamina/tiny --local --prompt "Once upon a time" --max-new-tokens 32
