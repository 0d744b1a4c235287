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

# Debian packages the tests use (PostgreSQL 15 + PL/Python, Chromium) and Azurite from npm;
# installs only what is missing.
system-deps:
	@bash scripts/install-system-deps.sh
	@bash scripts/install-azurite.sh

# Render the sample set, run the whole pipeline on SQLite, and ask for the 10 most similar to one image.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/lookalike samples $(DEMO)/samples
	$(BIN)/lookalike --db sqlite:///$(DEMO)/lookalike.db run $(DEMO)/samples/manifest.tsv --plot $(DEMO)/evaluation.png
	$(BIN)/lookalike -q samples $(DEMO)/new --per-label 1 --seed 7 --copy-share 0 >/dev/null
	$(BIN)/lookalike --db sqlite:///$(DEMO)/lookalike.db similar $(DEMO)/new/leopard/leopard_0001.jpg --sheet $(DEMO)/similar.png

# Two workers, a test file each at a time: much of the suite waits on servers and subprocesses.
test: $(STAMP) system-deps
	CI=$${CI:-1} $(BIN)/pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(DEMO) bench/out test-artifacts
