# The two commands (README): `make demo` and `make test`. Both build .venv on first use and
# reinstall the project only when pyproject.toml is newer than the install stamp.
# `make agent-exe` builds the single-file agent into dist/ (docs/install-agent.md); `make
# test-floors` runs the unit and integration tests on the lowest dependency releases
# pyproject.toml allows, in .venv-floors.

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

FLOORS := .venv-floors

.PHONY: test check demo bench lint typecheck unit clean-demo browser agent-exe test-floors

# The whole check, as CI runs it: lint, types, the suite, then the unit and integration tests
# again on the dependency floors. `make check` is the first three alone, for a quicker loop.
test: check test-floors

check: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/xon-sim demo

# Benchmarks print figures and assert nothing; CI does not run them (bench/README.md).
bench: $(STAMP)
	$(BIN)/python -m bench all

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit

clean-demo:
	rm -rf demo-data

# Skips the build when nothing it is made of changed (packaging/build_agent.py).
agent-exe: $(STAMP)
	$(BIN)/python packaging/build_agent.py

# A fresh venv whenever pyproject.toml changes, so no newer release lingers from before.
$(FLOORS)/.installed: pyproject.toml packaging/lowest_constraints.py
	rm -rf $(FLOORS)
	python3 -m venv $(FLOORS)
	python3 packaging/lowest_constraints.py --extra redis --extra fast > $(FLOORS)/constraints.txt
	$(FLOORS)/bin/python -m pip install --quiet --disable-pip-version-check \
	  -c $(FLOORS)/constraints.txt -e '.[dev]'
	touch $@

test-floors: $(FLOORS)/.installed
	$(FLOORS)/bin/pytest tests/unit tests/integration -p no:cacheprovider

$(BIN)/python:
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The page tests render in headless Chromium (Debian package). Installed when missing and we are
# root (CI is); elsewhere those tests skip with the install command.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; browser tests will fail under CI" >&2; \
	  else echo "note: chromium not installed (sudo apt-get install chromium); browser tests skip" >&2; fi; }
