# The README's two commands: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: serve test test-fast test-all test-python test-mypyc mypyc mypyc-clean lint typecheck bench bench-tools bench-compare fleet-sim loadtest fuzz-long clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Marker files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# curl is a real client in the end-to-end tests, and promtool (Debian's prometheus
# package) checks contrib/'s alert rules, and openssl verifies attested documents,
# and the fleet tests run real etcd members (etcd-server) and etcdctl (etcd-client);
# install them if the machine lacks them.
system-deps:
	@missing=""; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	{ command -v etcd >/dev/null 2>&1 || [ -x /usr/bin/etcd ]; } || missing="$$missing etcd-server"; \
	command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "install with apt-get:$$missing (needed by the tests)" >&2; exit 1; fi; \
	fi

serve: $(VENV)/.installed
	@echo "Try: curl -H Metadata:true 'http://127.0.0.1:$(PORT)/metadata/instance?api-version=2021-02-01'"
	$(BIN)/fastimds serve --port $(PORT)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check fastimds tests bench loadtest
	$(BIN)/ruff format --check fastimds tests bench loadtest

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

# Every test: tests/unit, tests/fuzz (CI budget), tests/e2e (real server processes) and
# bench/'s ladder as a smoke test (testpaths in pyproject.toml).
test-all: $(VENV)/.installed-test system-deps
	$(BIN)/pytest

# Both builds (docs/architecture.md, "Two builds"): the whole suite on the pure-Python modules,
# then again on the mypyc-compiled ones. FASTIMDS_EXPECT_BUILD makes tests/unit/test_build.py
# fail if the build asked for is not the one imported (a stale or missing extension).
test: lint typecheck test-python test-mypyc

test-python: $(VENV)/.installed-test system-deps
	FASTIMDS_EXPECT_BUILD=python $(BIN)/pytest

# Builds the extensions in place, runs the whole suite on them, and removes them even when it fails.
test-mypyc: $(VENV)/.installed-mypyc system-deps
	$(MAKE) mypyc
	FASTIMDS_EXPECT_BUILD=mypyc $(BIN)/pytest; status=$$?; $(MAKE) mypyc-clean; exit $$status

# The optional compiled build: mypyc compiles setup.py's HOT_MODULES into C extensions beside
# their .py files (fastimds/http/*.so, and the group's runtime fastimds/http/hot__mypyc.*.so), which
# Python imports in their place until `make mypyc-clean`. Needs gcc and the Python headers; a
# plain `pip install -e .` or `make serve` never compiles. Rebuild after editing a compiled module:
# the extension, not the edited .py, is what runs.
mypyc: $(VENV)/.installed-mypyc
	FASTIMDS_MYPYC=1 $(BIN)/python setup.py --quiet build_ext --inplace
	@test "$$($(BIN)/python -c 'import fastimds; print(fastimds.build_kind())')" = mypyc
	@$(BIN)/fastimds --version

mypyc-clean:
	find fastimds -name '*.so' -delete
	rm -rf build/fastimds build/temp.* build/lib.*

# setup.py reads pyproject.toml's SPDX license, which setuptools reads from 77 on.
$(VENV)/.installed-mypyc: $(VENV)/.installed-test pyproject.toml
	$(BIN)/pip install --quiet 'setuptools>=77'
	touch $@

# The fast subset, for the edit-test loop: no server process (tests/unit/test_layout.py
# checks), the fuzz suites at their fixed CI budget. About 35 s on two cores.
test-fast: $(VENV)/.installed-test system-deps
	$(BIN)/pytest -p no:cacheprovider tests/unit tests/fuzz

$(VENV)/.installed-bench: $(VENV)/.installed-test pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

# The micro ladder (pytest-benchmark); saved runs compare with `pytest-benchmark compare`.
bench: $(VENV)/.installed-test
	$(BIN)/pytest bench --benchmark-enable --benchmark-only --benchmark-autosave

# The load generator and the C reference come from Debian, for the bench only.
bench-tools:
	@if command -v wrk >/dev/null 2>&1 && { command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; }; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk nginx-light; \
	else echo "install wrk and nginx-light (apt-get) for the side-by-side bench" >&2; exit 1; fi

# Side by side with nginx, uvicorn and granian on loopback (bench/compare.py).
bench-compare: $(VENV)/.installed-bench bench-tools
	$(BIN)/python -m bench.compare $(ARGS)

# The fleet simulation (bench/fleet_sim.py): three etcd members and 50 fleet-mode hosts on loopback, timed from
# sync through an etcd outage; needs Debian's etcd-server (system-deps). ARGS="--quick" is a smoke run under a minute.
fleet-sim: $(VENV)/.installed-bench system-deps
	$(BIN)/python -m bench.fleet_sim $(ARGS)

# Locust at a fixed rate against latency SLOs (loadtest/run.py); non-zero when one is broken.
loadtest: $(VENV)/.installed-test
	$(BIN)/python -m loadtest.run $(ARGS)

# The long fuzz run (reliability.md): the two fuzz suites with FUZZ_EXAMPLES random
# examples per test instead of `make test`'s fixed, derandomised CI budget.
FUZZ_EXAMPLES ?= 20000
fuzz-long: $(VENV)/.installed-test
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -p no:cacheprovider --hypothesis-show-statistics tests/fuzz

clean: mypyc-clean
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks .hypothesis
