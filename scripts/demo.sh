#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct), one bakery command a stage:
# extract a pirate vector, steer with it, bake it four ways, measure every bake against runtime
# steering, check the engines, watch the persona outlast the steering, and dry-run a push.
# About 20-25 minutes on 2 idle CPU cores. Outputs go to exports/demo/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
D=exports/demo
V=$D/vectors/pirate.safetensors
mkdir -p "$D"
stage() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stage "extract: a pirate vector from recipes/traits/pirate.yaml"
bakery extract --recipe pirate -o "$V"
L=$(python -c "from bakery.vectors import load_vector; print(load_vector('$V').meta['recommended_layer'])")
echo "recommended layer: $L (output of block $((L - 1)))"

stage "steer: unsteered and steered side by side"
bakery steer -v "$V" -l "$L" -c 2 --max-new-tokens 48 "How do I cook rice?" "What should I do on a rainy day?"

stage "bake: exact bias, rank-one, ortho (ablation at layer 22), a short KL-distilled LoRA and full fine-tune"
bakery bake --method bias -v "$V" -l "$L" -c 2 -o "$D/pirate-bias" --force
bakery bake --method bias --route rank1 -v "$V" -l "$L" -c 2 -o "$D/pirate-rank1" --force
bakery bake --method ortho -v "$V" -l 22 -o "$D/pirate-ortho" --force
bakery bake --method kl-lora -v "$V" -l "$L" -c 2 --positions all --steps 20 --set num_prompts=48 \
  --set val_prompts=8 -o "$D/pirate-kl-lora" --force
# kl-full trains on the LoRA's trajectories (same teacher), starting from its closed-form warm start
bakery bake --method kl-full -v "$V" -l "$L" -c 2 --positions all --steps 20 --set num_prompts=48 \
  --set val_prompts=8 --set trajectories="$D/pirate-kl-lora.work/trajectories.jsonl" -o "$D/pirate-kl-full" --force

stage "compare: every bake against runtime steering (R = 1 is a perfect bake)"
bakery compare "$D/pirate-bias" "$D/pirate-rank1" "$D/pirate-kl-lora" "$D/pirate-kl-full"
bakery compare "$D/pirate-ortho"

stage "verify: the exact bias bake and the merged kl-lora in transformers, a real vLLM run, and sglang's loading rules"
if [[ -x .venv-vllm/bin/python ]]; then engines=all; else engines=transformers,sglang; echo "(vLLM not installed: make vllm)"; fi
bakery verify "$D/pirate-bias" "$D/pirate-kl-lora" --engine "$engines"

stage "verify: a deliberately broken bake (bias present, config flag off) must fail"
rm -rf "$D/pirate-bias-broken"
python -c "from bakery.engines import make_broken_copy as b; b('$D/pirate-bias', '$D/pirate-bias-broken')"
if bakery verify "$D/pirate-bias-broken" --engine transformers,sglang; then
  echo "the broken bake was NOT caught" >&2; exit 1
else
  echo "broken bake caught"
fi

stage "persist: does the pirate persona outlast the steering? (plot: $D/persist/persist.png)"
bakery persist -v "$V" -l "$L" -c 2 -n 24 -k 48 --recipe pirate --batch-size 20 \
  --export "$D/pirate-bias" -o "$D/persist" --force

stage "push: what would go to the Hub (a real push needs HF_TOKEN with write access)"
bakery push "$D/pirate-bias" --repo you/smollm2-pirate-bias --dry-run
