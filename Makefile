# motif_train: `make demo` and `make test` work on a fresh CPU machine (they install first).
# Every install comes from a committed lock (locks/*.txt, with hashes; see docs/dependencies.md):
# `make install` syncs .venv to exactly locks/cpu.txt, `make lock` re-resolves the locks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
UV     := $(BIN)/uv
STAMP  := $(VENV)/.installed
# Where the CPU torch wheel (torch-2.13.0+cpu) lies: a folder or an index URL.
TORCH_WHEELS ?= /opt/wheels
# One platform for every lock: Linux x86_64, CPython 3.11 (the machines this project runs on).
LOCK   := $(UV) pip compile --quiet --generate-hashes --python-version 3.11 \
          --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -c constraints.txt

.PHONY: install install-gpu install-gpu-fa4 lock demo test test-fast bench flops sky clean

install: $(STAMP)

# launch/install.sh makes the venv exactly locks/cpu.txt (uv sync, hashes required) plus the project.
$(STAMP): locks/cpu.txt locks/bootstrap.txt pyproject.toml launch/install.sh
	PYTHON=$(PYTHON) TORCH_WHEELS=$(TORCH_WHEELS) launch/install.sh cpu $(VENV)
	$(BIN)/python -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

# A GPU node: the same set with the index's CUDA build of torch (locks/gpu.txt).
install-gpu:
	PYTHON=$(PYTHON) launch/install.sh gpu $(VENV)

# ...plus the FlashAttention-4 kernels (model.flash_impl=fa4, Hopper / Blackwell).
install-gpu-fa4:
	PYTHON=$(PYTHON) launch/install.sh gpu-fa4 $(VENV)

# Re-resolve every lock from pyproject.toml (needs uv: run `make install` first). Review the diff.
lock:
	$(LOCK) pyproject.toml locks/build.in --extra dev -c locks/cpu-torch.txt --find-links $(TORCH_WHEELS) -o locks/cpu.txt
	$(LOCK) pyproject.toml locks/build.in --extra dev -c locks/gpu-torch.txt -o locks/gpu.txt
	$(LOCK) pyproject.toml locks/build.in --extra dev --extra fa4 -c locks/gpu.txt -o locks/gpu-fa4.txt
	$(LOCK) locks/sky.in -o locks/sky.txt
	echo uv | $(LOCK) - -c locks/cpu.txt -o locks/bootstrap.txt

demo: install
	OMP_NUM_THREADS=2 $(BIN)/python scripts/demo_spine.py --out runs/demo_spine
	$(BIN)/python scripts/demo.py --run-dir runs/demo

# The single-process unit tests on two workers (one per core); the torchrun / gloo tests start two
# ranks each, so they run one at a time.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/unit -n 2
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/distributed tests/faults tests/smoke

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests/unit -x -q

bench: install
	OMP_NUM_THREADS=2 $(BIN)/python scripts/bench_model.py --out docs/bench/cpu_small.json
	$(BIN)/python scripts/bench_train.py --out docs/bench/train_cpu.json

flops: install
	$(BIN)/motif-flops

# SkyPilot pins an older `click` than wandb: it gets its own venv, from its own lock.
sky: .venv-sky/.installed
.venv-sky/.installed: locks/sky.txt $(STAMP)
	test -x .venv-sky/bin/python || $(PYTHON) -m venv .venv-sky
	$(UV) pip sync -q --python .venv-sky/bin/python --require-hashes locks/sky.txt
	touch $@

clean:
	rm -rf $(VENV) .venv-sky *.egg-info .pytest_cache
