#!/usr/bin/env bash
# llama-cpp-python built from source for the CPU in its own virtual environment.
#
#   bash scripts/install-llamacpp.sh PYTHON VENV     (what `make llamacpp` runs)
#
# The registry has llama-cpp-python as a source distribution only (llama.cpp vendored), so it is
# compiled: about 8 minutes on 2 cores, 0.7 GB peak. The wheel is built once per CPU into
# $BAKERY_WHEELS (default ~/.cache/bakery/wheels) and every later install, in any clone, reuses it.
# Only the shared library is built: no llava, tests, examples, tools or server. Versions are pinned in
# requirements/llamacpp.txt. `bakery verify --engine llama.cpp` finds the result through
# BAKERY_LLAMACPP_PYTHON (VENV/bin/python).
set -euo pipefail
PYTHON="${1:?usage: install-llamacpp.sh PYTHON VENV}"
VENV="${2:?usage: install-llamacpp.sh PYTHON VENV}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PINS="$HERE/requirements/llamacpp.txt"
PIN="$(grep -m1 '^llama-cpp-python==' "$PINS")"
# GGML_NATIVE tunes for this CPU: the wheel is only good on machines with the same instructions,
# so its folder is named after them.
CPU="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-12)"
WHEELS="${BAKERY_WHEELS:-$HOME/.cache/bakery/wheels}/llamacpp-${PIN#*==}-$CPU"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building $PIN for this CPU (once; kept in $WHEELS)"
  mkdir -p "$WHEELS"
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$VENV/bin/pip" wheel -q --no-deps --no-binary llama-cpp-python -w "$WHEELS.tmp" "$PIN"
  mv "$WHEELS.tmp"/llama_cpp_python-*.whl "$WHEELS"/ && rmdir "$WHEELS.tmp"
fi
"$VENV/bin/pip" install -q -c "$PINS" --find-links "$WHEELS" --only-binary llama-cpp-python -r "$PINS"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
