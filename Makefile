# Two commands do all set-up on a fresh machine:
#   make demo   - a throwaway redis-server, the daemon, jobs pushed with redis-cli
#   make test   - lint, type-check and the whole test suite (chaos tests included)
# Everything lands in .venv; the tests start their own redis-server processes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint demo bench bench-peers install clean screenshots

$(BIN)/.installed: pyproject.toml
	./scripts/ensure-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Coverage of subprocesses (daemons, CLI runs, workers): every Python of the venv runs
# coverage.process_startup() at start when COVERAGE_PROCESS_START is set (by `make
# test`); otherwise coverage is not even imported (the benchmark measures memory).
$(BIN)/.coverage-hook: $(BIN)/.installed
	echo 'import os; os.environ.get("COVERAGE_PROCESS_START") and __import__("coverage").process_startup()' \
		>"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/prioqd-coverage.pth"
	touch $@

setup: $(BIN)/.installed $(BIN)/.coverage-hook

lint: setup
	$(BIN)/ruff check prioqd tests bench
	$(BIN)/ruff format --check prioqd
	$(BIN)/mypy prioqd

# Every test, with branch coverage of prioqd/ in this process and every subprocess;
# the per-module report, with the lines not run, is printed at the end. CI (.ci/run)
# sets PRIOQD_TEST_STRICT=1, which turns "cannot run here" skips (nspawn, TLS,
# systemd-analyze) into failures. The exit status is pytest's, or 1 if the tests
# passed but no report could be made (no data: the coverage hook did not run).
# The tests run in TEST_JOBS processes (pytest-xdist): most of their time is spent
# waiting on daemons and redis-servers of their own, so 4 on 2 CPUs take a third of
# the time of one; each process has its own redis-server and ports.
TEST_JOBS ?= 4
test: lint
	rm -f .coverage .coverage.*
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml COVERAGE_FILE=$(CURDIR)/.coverage \
		$(BIN)/pytest -ra -n $(TEST_JOBS) --durations=25; status=$$?; \
	$(BIN)/coverage combine -q || true; rm -f .coverage.*; \
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/coverage report --show-missing \
		|| { echo "make test: coverage report failed" >&2; [ $$status -ne 0 ] || status=1; }; \
	exit $$status

# Everything but the slow chaos/systemd tests, for a quick loop while editing.
test-fast: lint
	$(BIN)/pytest -ra -n $(TEST_JOBS) -m 'not slow'

demo: setup
	./scripts/demo.sh

bench: setup
	$(BIN)/python bench/run.py

# docs/img/*.png for the README: the dashboard in headless Chromium.
screenshots: setup
	$(BIN)/python scripts/screenshots.py

# prioqd beside Dramatiq and Huey, same workloads, 3 interleaved rounds; the peers are
# installed from PyPI into venvs under bench/.work/venvs (kept between runs).
# More: make bench-peers ARGS="--peers dramatiq,huey,rq --write-results"
bench-peers: setup
	$(BIN)/python bench/run.py --peers $(ARGS)

# As root: venv under /opt/prioqd, /etc/prioqd/config.toml, the systemd unit.
install:
	./scripts/install.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info .coverage .coverage.*
