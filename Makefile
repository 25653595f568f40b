# The two commands of README.md: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-cli airflow test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup
	$(PY) -m operators.demo

demo-cli: setup
	$(VENV)/bin/voxflow demo --dir demo-output

airflow: setup
	$(PY) -m operators.local

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/inference.py
	$(PY) bench/task_queue.py
	$(PY) bench/blend.py

clean:
	rm -rf demo-output .pytest_cache .airflow
