# Two commands do all set-up on a fresh machine:
#   make demo   - a throwaway redis-server, the daemon, jobs pushed with redis-cli
#   make test   - lint, type-check and the whole test suite (chaos tests included)
# Everything lands in .venv; the tests start their own redis-server processes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint demo bench bench-peers install clean

$(BIN)/.installed: pyproject.toml
	./scripts/ensure-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check prioqd tests bench
	$(BIN)/ruff format --check prioqd
	$(BIN)/mypy prioqd

test: lint
	$(BIN)/pytest -ra

# Everything but the slow chaos/systemd tests, for a quick loop while editing.
test-fast: lint
	$(BIN)/pytest -ra -m 'not slow'

demo: setup
	./scripts/demo.sh

bench: setup
	$(BIN)/python bench/run.py

# prioqd beside Dramatiq and Huey, same workloads, 3 interleaved rounds; the peers are
# installed from PyPI into venvs under bench/.work/venvs (kept between runs).
# More: make bench-peers ARGS="--peers dramatiq,huey,rq --write-results"
bench-peers: setup
	$(BIN)/python bench/run.py --peers $(ARGS)

# As root: venv under /opt/prioqd, /etc/prioqd/config.toml, the systemd unit.
install:
	./scripts/install.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
