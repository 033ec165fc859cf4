# Two commands for a fresh machine:
#   make train   set up .venv and run the default training job (tiny model, synthetic data, CPU ok)
#   make test    set up .venv and run the test suite
VENV := .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: setup train test test-fast lint clean-venv

setup:
	bash scripts/setup.sh

# One torch thread (what accelerate launch sets anyway, stated here): on 2 shared cores a second
# thread had the same median step but a 5-10x slower tail whenever another job ran (README).
train: setup
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process 1 \
		--mixed_precision no --dynamo_backend no launch/train.py $(ARGS)

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check pg_train tests scripts launch
	$(VENV)/bin/ruff format --check pg_train tests scripts launch

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
