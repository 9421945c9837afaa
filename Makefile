# The two set-up commands of the README:
#   make demo   install, then run the whole workflow on the embedded offline demo source
#   make test   install, then run the test suite (TESTS="tests/test_x.py ..." runs only those)
# PYTHON picks the interpreter. The default python3 installs into .venv, any other into its own
# .venv-X.Y, so that e.g. `make PYTHON=python3.13 demo` and `make demo` coexist.
PYTHON ?= python3
# The interpreter's path. pyenv's shims run only pyenv's selected versions, so a PYTHON they refuse
# (e.g. python3.13 while 3.11 is selected) is looked up among pyenv's other versions.
PYTHON_EXE := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || { \
  v=$$(pyenv whence $(PYTHON) 2>/dev/null | tail -1); test -n "$$v" && echo "$$(pyenv root)/versions/$$v/bin/$(PYTHON)"; })
PY_VERSION := $(if $(PYTHON_EXE),$(shell $(PYTHON_EXE) -c 'import sys; print("%d.%d" % sys.version_info[:2])'))
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(PY_VERSION))
BIN := $(VENV)/bin
CORES ?= all
TESTS ?=

.PHONY: install demo test dry-run lint clean-demo

install: $(VENV)/.installed

# pip takes the CPU build of torch (pinned exactly in pyproject.toml) where one is offered (here: a
# local wheel for Python 3.11); otherwise PyPI's build with CUDA, ~4.7 GB installed.
$(VENV)/.installed: pyproject.toml
	@test -n "$(PY_VERSION)" || { echo "make: PYTHON=$(PYTHON) does not run. Give an interpreter of Python 3.11 or newer," \
	  "e.g. make PYTHON=python3.13, or its path" >&2; exit 1; }
	$(PYTHON_EXE) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[demo,test,interop]"
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES)

dry-run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake -n --configfile config/demo.yaml --cores $(CORES)

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(TESTS)

lint: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint --configfile config/demo.yaml

clean-demo:
	rm -rf results work logs .snakemake
