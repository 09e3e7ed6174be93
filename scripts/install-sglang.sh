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

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# torch stays the CPU build; everything else is pinned to the set this script was measured with
# (2026-12-01; a few differ from sglang's own pins, e.g. compressed-tensors, and ran fine).
cat >"$constraints" <<'EOF'
torch==2.13.0
sglang==0.5.23
triton==3.8.0
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
apache-tvm-ffi==0.1.11
asttokens==3.0.2
attrs==26.1.0
certifi==2026.10.19.post1
charset-normalizer==3.5.3
click==8.5.1
compressed-tensors==0.20.1
dill==0.4.1
distro==1.9.0
easydict==1.14
einops==0.8.2
executing==2.3.0
fastapi==0.165.0
filelock==4.3.1
frozenlist==1.8.0
fsspec==2026.9.0
gguf==0.19.0
h11==0.16.0
hf-xet==1.8.0
httpcore2==2.16.2
httpcore==1.0.9
httpx2==2.16.2
httpx==0.28.1
huggingface_hub==2.4.0
idna==3.20
interegular==0.3.3
ipython==9.18.1
ipython_pygments_lexers==1.1.1
jedi==0.20.1
Jinja2==3.1.6
jiter==0.19.0
loguru==0.7.3
markdown-it-py==4.3.0
MarkupSafe==3.0.4
matplotlib-inline==0.2.2
mdurl==0.1.2
mpmath==1.3.0
msgspec==0.23.0
multidict==7.2.1
networkx==3.6.1
numpy==2.4.6
openai==2.8.0
opentelemetry-api==1.45.2
orjson==3.13.0
packaging==26.4
parso==0.8.7
partial-json-parser==0.2.1.1.post7
pexpect==4.9.0
pillow==13.0.0
prometheus_client==0.26.0
prompt_toolkit==3.0.53
propcache==0.5.4
psutil==7.2.2
ptyprocess==0.7.0
pure_eval==0.2.4
pybase64==1.5.1
pydantic==2.14.4
pydantic_core==2.50.5
Pygments==2.21.0
python-dateutil==4.0.0
python-multipart==0.0.34
PyYAML==6.0.4
pyzmq==27.3.0
regex==2026.11.19
requests==2.34.2
rich==15.0.0
safetensors==0.8.0
scipy==1.17.1
sentencepiece==0.2.1
setproctitle==1.3.8
shellingham==1.5.4
sniffio==1.3.1
stack-data==0.6.3
starlette==1.10.0
sympy==1.14.0
tokenizers==0.23.3
tqdm==4.70.1
traitlets==5.16.1
transformers==5.19.0
truststore==0.10.5
typer==0.29.2
typing-inspection==0.4.5
typing_extensions==4.16.0
tzdata==2026.6
urllib3==2.8.0
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
wcwidth==0.9.4
xgrammar==0.2.7
xxhash==4.1.0
yarl==1.25.1
zstandard==0.25.0
EOF

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
