# One entry point. `make book` and `make test` each create the environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JB     := $(VENV)/bin/jupyter-book

.PHONY: book test unit notebooks strict-book bench check-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[book,test]'
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

book: $(STAMP)
	$(JB) build . --builder html
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Every test but the browser check; -rs names any test skipped (only the check of the book build's executed
# chapters is, where no build exists: `make test` passes the build and requires it).
UNIT := $(PY) -m pytest tests -q -rs --ignore=tests/browser

unit: $(STAMP)
	$(UNIT)

notebooks: $(STAMP)
	$(PY) -m pytest --nbval-lax notebooks -q -p no:cacheprovider

strict-book: $(STAMP)
	$(JB) build . --builder html -W -n --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Each chapter executes once, in the book build (what `make book` does). The nbval pass after it re-runs the
# chapters on the runs the build left in runs/ and checks their outputs without recomputing them; the unit tests
# then check the chapters' outputs as the build executed them, rather than executing the chapters again.
test: strict-book notebooks
	$(UNIT) --executed-chapters=_build/jupyter_execute/notebooks
	$(PY) -m pytest tests/browser -q -rs

bench: $(STAMP)
	$(PY) -m mctlib bench

# The acceptance check on a GPU: every gradient mode against CPU float64, determinism,
# resume, no host sync, then the CIFAR-10-shape timings; prints a table, writes JSON, fails on a failed
# check. `make test` runs its CPU form (tests/test_check.py). CHECK_PRECISION=tf32|bf16 to check those.
CHECK_PRECISION ?= fp32
check-gpu: $(STAMP)
	$(PY) -m mctlib check --device cuda --precision $(CHECK_PRECISION) --out runs/check/check-gpu-$(CHECK_PRECISION).json

clean:
	rm -rf _build
