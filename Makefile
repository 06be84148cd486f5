# The two commands of the quick start: `make demo` and `make test`. Each creates .venv with pip
# when it is missing (or when the lock file changed) and installs from requirements.lock.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= examples/sba-loans/flywheel.yaml
LORA_CONFIG ?= examples/constitution-lora/flywheel.yaml

.PHONY: demo finetune flights bikeshare test lint docs lock lock-airflow clean-state

$(STAMP): requirements.lock pyproject.toml scripts/make-venv.sh
	# The lock's venv is built once per lock under ~/.cache/flywheel/venvs and copied (hard links)
	# into .venv; then this checkout is installed into it. See scripts/make-venv.sh.
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/make-venv.sh

demo: $(STAMP)
	$(BIN)/flywheel demo --config $(CONFIG)

# LoRA fine-tuning of SmolLM2-135M on the Constitution of India (about 10 minutes on 2 cores).
finetune: $(STAMP)
	$(BIN)/flywheel finetune --config $(LORA_CONFIG)

# The regression and multiclass examples on their full data (a minute or two each).
flights: $(STAMP)
	$(BIN)/flywheel example flights

bikeshare: $(STAMP)
	$(BIN)/flywheel example bikeshare

# Two passes: everything but `serial` tests on two workers (a module that shares one trained model
# or server stays on one worker: xdist_group), then the `serial` tests alone.
test: $(STAMP)
	scripts/ensure-services.sh
	scripts/ensure-docker.sh
	scripts/ensure-chromium.sh
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not serial" --durations=15
	$(BIN)/python -m pytest -m serial

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks deploy examples docs/hooks
	$(BIN)/mypy
	$(BIN)/lint-imports

# The documentation site on http://127.0.0.1:8001 (not 8000: that is `flywheel serve`'s port),
# rebuilt on each save; `mkdocs build` writes it to site/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8001

# Re-pin after changing pyproject.toml's bounds: fresh venv, install, freeze.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)-lock/bin/python -m pip install --quiet -e ".[all,dev]"
	$(VENV)-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
	rm -rf $(VENV)-lock

# Re-pin Airflow's own environment (its DAG test makes one from this lock, in the download cache).
lock-airflow:
	rm -rf .airflow-venv && $(PYTHON) -m venv .airflow-venv
	.airflow-venv/bin/python -m pip install --quiet "apache-airflow>=3.3.2,<3.4"
	.airflow-venv/bin/python -m pip freeze > deploy/airflow/requirements.lock
	rm -rf .airflow-venv

clean-state:
	rm -rf examples/*/.flywheel
