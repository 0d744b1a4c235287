# Two commands do all set-up: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: demo test bench system-deps clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt -e .
	touch $(STAMP)

# Debian packages the tests use (PostgreSQL 15 + PL/Python); installs only what is missing.
system-deps:
	@bash scripts/install-system-deps.sh

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/lookalike samples $(DEMO)/samples
	$(BIN)/lookalike --db sqlite:///$(DEMO)/lookalike.db load $(DEMO)/samples/manifest.tsv
	$(BIN)/lookalike --db sqlite:///$(DEMO)/lookalike.db status

test: $(STAMP) system-deps
	CI=$${CI:-1} $(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(DEMO) bench/out test-artifacts
