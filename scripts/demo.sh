#!/usr/bin/env bash
# The main job on the embedded default model; each stage is one bakery command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
echo "== steer: a pirate vector at layer 16 (output of block 15)"
python scripts/demo_vector.py exports/demo/pirate_quick.safetensors
bakery steer -v exports/demo/pirate_quick.safetensors -l 16 -c 1.5 --max-new-tokens 48 \
  "How do I cook rice?" "What should I do this weekend?"
