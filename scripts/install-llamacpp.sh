#!/usr/bin/env bash
# llama-cpp-python built from source for the CPU in its own virtual environment.
#
#   bash scripts/install-llamacpp.sh PYTHON VENV     (what `make llamacpp` runs)
#
# The registry has llama-cpp-python as a source distribution only (llama.cpp vendored), so pip
# compiles it: about 8 minutes on 2 cores, 0.7 GB peak. pip caches the built wheel, so a second
# install is quick. Only the shared library is built: no llava, tests, examples, tools or server.
# `bakery verify --engine llama.cpp` finds the result through BAKERY_LLAMACPP_PYTHON (VENV/bin/python).
set -euo pipefail
PYTHON="${1:?usage: install-llamacpp.sh PYTHON VENV}"
VENV="${2:?usage: install-llamacpp.sh PYTHON VENV}"
PIN="llama-cpp-python==0.3.36"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q numpy
# GGML_NATIVE tunes for this CPU; the wheel is only good on machines with the same instructions.
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$VENV/bin/pip" install -q --no-binary llama-cpp-python "$PIN"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
