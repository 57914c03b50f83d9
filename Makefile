# Every target sets up .venv itself on first use (the verified stack of ../shared/STACK.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 fbgemm-gpu-cpu==1.8.0
	# torchrec's metadata asks for the CUDA fbgemm-gpu; fbgemm-gpu-cpu provides the module.
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mari_fx.testing.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.serving

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
