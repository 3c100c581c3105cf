# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, train VGG split across processes on bundled data
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo

.PHONY: demo test test-fast clean

$(BIN)/sparse-zmq: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/sparse-zmq
	$(BIN)/sparse-zmq run hybrid-off-device --out $(OUT)

test: $(BIN)/sparse-zmq
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/sparse-zmq
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs *.egg-info
