# motif_train: `make demo` and `make test` work on a fresh CPU machine (they install first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every install goes through the constraints file: it pins the local CPU torch wheel so that
# no dependency can pull a multi-GB CUDA build.
PIP    := $(BIN)/pip install -q -c constraints.txt
TORCH  := torch==2.13.0

.PHONY: install demo test test-fast bench flops sky clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	$(BIN)/python -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

demo: install
	OMP_NUM_THREADS=2 $(BIN)/python scripts/demo_spine.py --out runs/demo_spine
	$(BIN)/python scripts/demo.py --run-dir runs/demo

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/unit -x -q

bench: install
	OMP_NUM_THREADS=2 $(BIN)/python scripts/bench_model.py --out docs/bench/cpu_small.json
	$(BIN)/python scripts/bench_train.py --out docs/bench/train_cpu.json

flops: install
	$(BIN)/motif-flops

# SkyPilot pins an older `click` than wandb: it gets its own venv.
sky: .venv-sky/.installed
.venv-sky/.installed:
	test -x .venv-sky/bin/python || $(PYTHON) -m venv .venv-sky
	.venv-sky/bin/pip install -q 'skypilot>=0.10'
	touch $@

clean:
	rm -rf $(VENV) .venv-sky *.egg-info .pytest_cache
