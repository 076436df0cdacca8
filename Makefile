# Every target does its own set-up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    ?= runs/demo
PAPER  ?= runs/paper

.PHONY: setup demo paper test test-fast docs bench lint clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulled in by the package would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lca demo configs/demo.yaml --out $(RUN)

# Zhu et al. on this machine's gettext catalogs (docs/paper.md); re-running resumes.
paper: setup
	$(VENV)/bin/lca paper configs/paper.yaml --out $(PAPER)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm"

# The documentation site (docs/, mkdocs.yml) into site/; --strict turns every warning (a broken
# link or anchor, a page missing from the nav, a docstring mkdocstrings cannot render) into a
# failure. NO_MKDOCS_2_WARNING silences the theme's notice about its own future.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: setup
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check replay analysis tests benchmarks

clean:
	rm -rf runs site .pytest_cache
