# The two commands of the quick start: `make demo` and `make test`. Each creates .venv with pip
# when it is missing (or when the lock file changed) and installs from requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= examples/sba-loans/flywheel.yaml
LORA_CONFIG ?= examples/constitution-lora/flywheel.yaml

.PHONY: demo finetune test lint lock lock-airflow clean-state

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# CPU build of PyTorch first: any other order lets pip pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/flywheel demo --config $(CONFIG)

# LoRA fine-tuning of SmolLM2-135M on the Constitution of India (about 10 minutes on 2 cores).
finetune: $(STAMP)
	$(BIN)/flywheel finetune --config $(LORA_CONFIG)

test: $(STAMP)
	scripts/ensure-services.sh
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks deploy
	$(BIN)/mypy

# Re-pin after changing pyproject.toml's bounds: fresh venv, install, freeze.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)-lock/bin/python -m pip install --quiet -e ".[dev]"
	$(VENV)-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
	rm -rf $(VENV)-lock

# Airflow's own environment (its DAG test makes it from this lock when missing).
lock-airflow:
	rm -rf .airflow-venv && $(PYTHON) -m venv .airflow-venv
	.airflow-venv/bin/python -m pip install --quiet "apache-airflow>=3.3.2,<3.4"
	.airflow-venv/bin/python -m pip freeze > deploy/airflow/requirements.lock
	touch .airflow-venv/.installed

clean-state:
	rm -rf examples/*/.flywheel
