# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
EXTRAS ?= train,gguf,plot,eval,test
STAMP  := $(VENV)/.kvroute-installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test demo assets test-assets test-vllm bench clean

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

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
