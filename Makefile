# The two commands of README.md: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-cli airflow test bench clean

setup: $(STAMP)

# cloudbox: the tests' Pub/Sub emulator. It declares Python >= 3.14 but its Pub/Sub server runs
# on 3.11 through tests/pubsub_emulator.py; what that server imports is already installed.
# chromium: Debian's browser for the console's browser tests (tests/test_console.py).
$(STAMP): requirements.txt pyproject.toml
	test -x /usr/bin/chromium || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python cloudbox==0.2.3
	touch $(STAMP)

demo: setup
	$(PY) -m operators.demo

demo-cli: setup
	$(VENV)/bin/voxflow demo --dir demo-output

airflow: setup
	$(PY) -m operators.local

# Two processes (pytest-xdist): the Airflow-bound tests share one (tests/conftest.py groups
# them, so their Airflow starts once), the others spread over both. `make test TESTS=-n0`
# runs them in one process.
TESTS ?= -n 2 --dist loadgroup
test: setup
	$(PY) -m pytest -q $(TESTS)

bench: setup
	$(PY) bench/inference.py
	$(PY) bench/task_queue.py
	$(PY) bench/blend.py
	$(PY) bench/pubsub_queue.py

clean:
	rm -rf demo-output .pytest_cache .airflow
