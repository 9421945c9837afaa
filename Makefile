# The two set-up commands of the README:
#   make demo   install, then run the whole workflow on the embedded offline demo source
#   make test   install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: install demo test dry-run lint clean-demo

install: $(VENV)/.installed

# pip takes the CPU build of torch (pinned exactly in pyproject.toml) where one is offered.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[demo,test,interop]"
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES)

dry-run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake -n --configfile config/demo.yaml --cores $(CORES)

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

lint: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint --configfile config/demo.yaml

clean-demo:
	rm -rf results work logs .snakemake
