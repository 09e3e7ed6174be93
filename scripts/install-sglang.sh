#!/usr/bin/env bash
# Build sglang's own virtual environment for the CPU: bash scripts/install-sglang.sh PYTHON VENV
#
# sglang 0.5.23's registry dependencies are CUDA-only (sgl-kernel, flashinfer, flash-attn, ...) and
# pin torch 2.14.1, which would pull a CUDA torch plus gigabytes of nvidia wheels. So sglang is
# installed without dependencies, torch is held at the CPU build bakery uses, and sglang's
# pure-Python needs are installed by hand at pinned versions. Two imports it makes cannot be
# satisfied here (torchvision: the registry's build is CUDA-only; sgl_kernel: CUDA/AMX kernels);
# bakery/engines/sglang_stub.py stands in for them, installed by the .pth file written below only
# when BAKERY_SGLANG_STUB names that stub (so the venv stays untouched for any other use).
set -euo pipefail

PYTHON=${1:?usage: install-sglang.sh PYTHON VENV}
VENV=${2:?usage: install-sglang.sh PYTHON VENV}
start=$(date +%s)

"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip

# torch stays the CPU build; everything else is pinned to the set this script was measured with
# (2026-12-01; a few differ from sglang's own pins, e.g. compressed-tensors, and ran fine).
constraints="$(cd "$(dirname "$0")/.." && pwd)/requirements/sglang.txt"

"$PIP" install -q -c "$constraints" --no-deps torch==2.13.0 sglang==0.5.23 triton==3.8.0
# torch's own dependencies (sympy, networkx, jinja2, fsspec, filelock, typing-extensions)
"$PIP" install -q -c "$constraints" torch==2.13.0
"$PIP" install -q -c "$constraints" \
    transformers==5.19.0 apache-tvm-ffi==0.1.11 sentencepiece==0.2.1 openai==2.8.0 \
    orjson psutil pydantic requests tqdm packaging pyzmq msgspec pybase64 einops setproctitle \
    xxhash regex fastapi uvicorn uvloop aiohttp python-multipart prometheus-client \
    partial_json_parser interegular easydict distro pillow scipy zstandard watchfiles \
    python-dateutil ipython dill compressed-tensors gguf safetensors numpy xgrammar==0.2.7
# Nothing may have brought a CUDA torch or torchvision in.
"$VENV/bin/python" - <<'EOF'
import importlib.util, sys, torch
assert torch.version.cuda is None, f"CUDA torch got installed: {torch.__version__}"
assert importlib.util.find_spec("torchvision") is None, "torchvision got installed (CUDA build)"
print("torch", torch.__version__, "(CPU)")
EOF

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Runs at every interpreter start in this venv (the engine's spawned workers included), and does
# nothing unless BAKERY_SGLANG_STUB names the stub file.
cat >"$site/bakery_sglang_stub.pth" <<'EOF'
import os, runpy; os.environ.get("BAKERY_SGLANG_STUB") and runpy.run_path(os.environ["BAKERY_SGLANG_STUB"])
EOF

end=$(date +%s)
echo "sglang venv ready in $((end - start)) s: $(du -sh "$VENV" | cut -f1) at $VENV"
