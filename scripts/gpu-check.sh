#!/usr/bin/env bash
# On a GPU host: the whole pipeline on the embedded model (SmolLM2-135M-Instruct) with every command
# on the accelerator, asserting the figures the CPU tests assert:
#   extract -> bake (bias, ortho, kl-lora) -> compare -> verify (transformers and a real vLLM run)
#   - the exact bakes (bias; ortho against runtime ablation) recover R >= 0.9999 in compare
#   - vLLM agrees with the transformers target on top-1 >= 0.99 (verify's own pass rule)
#   - verify passes bias and kl-lora in transformers and vLLM
#   - with two or more GPUs: kl-lora distilled again sharded over two processes (FSDP2, every
#     process reading only its rows of the checkpoint), on the same trajectories, gives the same
#     weights (within 5e-3, the CPU test's bound)
#
# Needs .venv (make install, with a CUDA build of torch on the GPU host) and a vLLM environment
# that can use the GPU: BAKERY_VLLM_PYTHON=/path/to/venv/bin/python (a CUDA vLLM; the .venv-vllm
# that `make vllm` builds is vLLM's CPU build).
#
# Settings (environment):
#   GPU_CHECK_DEVICE=cuda    the --device of every command (cpu runs the same checks on the CPU)
#   GPU_CHECK_DTYPE=float32  --dtype of compare and verify: the exactness thresholds are float32
#                            figures (bf16 rounding alone costs more than 1e-4 of R)
#   GPU_CHECK_QUICK=1        a small subset (short extraction, 4 prompts, a few distillation
#                            steps): a check of the script itself, e.g. on a CPU machine
#   GPU_CHECK_OUT=exports/gpu-check   outputs (replaced on every run)
#   GPU_CHECK_VECTOR=FILE    skip the extraction and bake this vector (its recommended layer)
#   GPU_CHECK_FSDP=auto      1: run the sharded stage anyway (on the CPU: two gloo processes);
#                            0: skip it; auto: with two or more CUDA devices
#   BAKERY_THREADS=N         --threads N for every command (CPU threads)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
DEV="${GPU_CHECK_DEVICE:-cuda}"
DTYPE="${GPU_CHECK_DTYPE:-float32}"
D="${GPU_CHECK_OUT:-exports/gpu-check}"
V=$D/vectors/pirate.safetensors
T=()
[[ -z "${BAKERY_THREADS:-}" ]] || T=(--threads "$BAKERY_THREADS")
ON=(--device "$DEV")
START=$SECONDS
stage() { printf '\n\033[1m== [%d:%02d] %s\033[0m\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60)) "$*"; }
fail() { echo "gpu-check FAILED: $*" >&2; exit 1; }

if [[ -n "${GPU_CHECK_QUICK:-}" ]]; then
  PROMPTS="$D/prompts.txt"
  EXTRACT=(--samples 1 --max-new-tokens 24 --batch-size 40)
  EVAL=(--prompts "$PROMPTS" --max-new-tokens 24)
  DISTILL=(--steps 4 --set num_prompts=20 --set val_prompts=2 --set samples_per_prompt=1
           --set max_new_tokens=24 --set val_every=4)  # 18 training prompts: distillation wants 16
else
  PROMPTS=""
  EXTRACT=()
  EVAL=()
  DISTILL=()  # the defaults: what the fidelity goal of issue 15 is about
fi

[[ -x .venv/bin/bakery ]] || fail "bakery is not installed: run make install"
python - "$DEV" <<'EOF' || fail "device $DEV is not usable here (see above)"
import sys, torch
from bakery.placement import resolve_device
d = resolve_device(sys.argv[1])
name = torch.cuda.get_device_name(d) if d.type == "cuda" else d.type
print(f"device {d} ({name}), torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
VLLM_PY="${BAKERY_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}"
[[ -x "$VLLM_PY" ]] || fail "no vLLM environment at $VLLM_PY: set BAKERY_VLLM_PYTHON to a vLLM venv's python"
export BAKERY_VLLM_PYTHON="$VLLM_PY"
KEEP=""
if [[ -n "${GPU_CHECK_VECTOR:-}" ]]; then  # kept aside: it may sit in the output folder of a previous run
  [[ -f "$GPU_CHECK_VECTOR" ]] || fail "GPU_CHECK_VECTOR=$GPU_CHECK_VECTOR is not a file"
  KEEP=$(mktemp --suffix=.safetensors)
  cp "$GPU_CHECK_VECTOR" "$KEEP"
fi
rm -rf "$D"
mkdir -p "$D"
if [[ -n "$PROMPTS" ]]; then
  printf '%s\n' "How do I cook rice?" "What should I do on a rainy day?" "Tell me about the sea." \
    "How can I sleep better?" > "$PROMPTS"
fi

if [[ -n "${GPU_CHECK_VECTOR:-}" ]]; then
  stage "extract: skipped, baking $GPU_CHECK_VECTOR"
  mkdir -p "$(dirname "$V")"
  mv "$KEEP" "$V"
else
  stage "extract on $DEV (default dtype: bfloat16 on an accelerator)"
  bakery extract "${T[@]}" "${ON[@]}" --recipe pirate "${EXTRACT[@]}" -o "$V" --force --no-cache
fi
L=$(bakery vectors info "$V" | awk '$1 == "recommended_layer:" { print $2 }')
[[ "$L" =~ ^[0-9]+$ ]] || fail "no recommended_layer in the metadata of $V"
echo "recommended layer: $L (output of block $((L - 1)))"

stage "steer on $DEV (default dtype)"
bakery steer "${T[@]}" "${ON[@]}" -v "$V" -l "$L" -c 2 --max-new-tokens 24 "How do I cook rice?"

stage "bake: bias, ortho (layer $L), kl-lora (distillation on $DEV)"
bakery bake "${T[@]}" "${ON[@]}" --method bias -v "$V" -l "$L" -c 2 -o "$D/bias" --force
bakery bake "${T[@]}" "${ON[@]}" --method ortho -v "$V" -l "$L" -o "$D/ortho" --force
bakery bake "${T[@]}" "${ON[@]}" --method kl-lora -v "$V" -l "$L" -c 2 --positions all "${DISTILL[@]}" \
  -o "$D/kl-lora" --force

FSDP="${GPU_CHECK_FSDP:-auto}"
if [[ "$FSDP" == auto ]]; then
  FSDP=$(python -c "import torch; print(int(torch.cuda.device_count() >= 2))")
fi
if [[ "$FSDP" == 1 ]]; then
  stage "bake: kl-lora again, sharded over two processes (FSDP2), on the same trajectories"
  accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no -m bakery bake "${T[@]}" --method kl-lora -v "$V" -l "$L" -c 2 --positions all \
    "${DISTILL[@]}" --set trajectories="$D/kl-lora.work/trajectories.jsonl" -o "$D/kl-lora-fsdp" --force
else
  stage "bake: the sharded (FSDP2) kl-lora stage NOT run (GPU_CHECK_FSDP=${GPU_CHECK_FSDP:-auto}: fewer than two CUDA devices, or 0)"
fi

stage "compare on $DEV in $DTYPE"
bakery compare "${T[@]}" "${ON[@]}" --dtype "$DTYPE" "${EVAL[@]}" "$D/bias" "$D/kl-lora"
bakery compare "${T[@]}" "${ON[@]}" --dtype "$DTYPE" "${EVAL[@]}" "$D/ortho"

stage "verify on $DEV in $DTYPE: transformers and a real vLLM run"
rc=0
bakery verify "${T[@]}" "${ON[@]}" --dtype "$DTYPE" "${EVAL[@]}" --engine transformers,vllm --json \
  "$D/bias" "$D/kl-lora" > "$D/verify.json" || rc=$?
[[ $rc == 0 || $rc == 1 ]] || fail "bakery verify stopped with exit status $rc"

stage "assert the figures"
python - "$D" "$rc" <<'EOF'
import json, sys
from pathlib import Path

d, rc = Path(sys.argv[1]), int(sys.argv[2])
EXACT_R, VLLM_TOP1 = 0.9999, 0.99
problems, lines = [], []
for name, exact in (("bias", True), ("ortho", True), ("kl-lora", False)):
    rep = json.loads((d / name / "compare" / "report.json").read_text())
    row = rep["rows"][rep["this_export"]]
    lines.append(f"compare {name}: R {row['R']:.6f}, KL {row['kl']:.3e}, top-1 {row['top1']:.4f}"
                 + (f", exact {row.get('exact')}" if exact else ""))
    if exact and not row["R"] >= EXACT_R:
        problems.append(f"{name}: R {row['R']:.6f} < {EXACT_R}")
if (d / "kl-lora-fsdp").is_dir():  # the sharded run against the one-process run, weight by weight
    from bakery.io.checkpoint import CheckpointReader

    a, b = CheckpointReader(d / "kl-lora"), CheckpointReader(d / "kl-lora-fsdp")
    worst = max(float((a.get(k).float() - b.get(k).float()).abs().max()) for k in a.keys())
    lines.append(f"kl-lora sharded (FSDP2, 2 processes) vs one process: max |weight difference| {worst:.2e}")
    if set(a.keys()) != set(b.keys()) or not worst <= 5e-3:
        problems.append(f"kl-lora sharded: max |weight difference| {worst:.2e} > 5e-3 (or other tensors)")
verdicts = json.loads((d / "verify.json").read_text())
for export, vs in verdicts.items():
    for v in vs:
        top1 = v.get("details", {}).get("bake_vs_target", {}).get("top1")
        lines.append(f"verify {Path(export).name} [{v['engine']}]: {v['label']}"
                     + (f", vLLM top-1 {top1:.4f}" if top1 is not None else ""))
        if not v["ok"]:
            problems.append(f"verify {export} [{v['engine']}]: {v['message']}")
        if v["engine"] == "vllm" and (top1 is None or top1 < VLLM_TOP1):
            problems.append(f"verify {export} [vllm]: top-1 {top1} < {VLLM_TOP1}")
if rc != 0 and not problems:
    problems.append(f"bakery verify exit status {rc}")
print("\n".join(lines))
if problems:
    print("gpu-check FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print("gpu-check passed")
EOF
stage "done: outputs in $D/"
