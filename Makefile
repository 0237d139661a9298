# One entry point. `make book` and `make test` each create the environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JB     := $(VENV)/bin/jupyter-book

.PHONY: book test unit notebooks strict-book data bench check-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[book,test]'
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

# Fashion-MNIST, which the experiments chapter reads: nothing to do where the loader finds it (the data root or
# Debian's copy); as root with apt, Debian's package; elsewhere one line, and the chapter then stops with the
# loader's message, which also names download=True for a machine with internet access.
FASHION_MNIST_DEB := dataset-fashion-mnist
data: $(STAMP)
	@$(PY) -c "from mctlib.sources import find_idx_files; raise SystemExit(find_idx_files('fashion_mnist') is None)" \
	|| if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Fashion-MNIST: apt-get install $(FASHION_MNIST_DEB)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FASHION_MNIST_DEB) >/dev/null) \
	  || echo "Fashion-MNIST: apt-get install $(FASHION_MNIST_DEB) failed; the experiments chapter will say how else to get it"; \
	else \
	  echo "Fashion-MNIST is not installed: run 'apt-get install $(FASHION_MNIST_DEB)' as root, or the experiments chapter will say how else to get it"; \
	fi

book: $(STAMP) data
	$(JB) build . --builder html
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Every test but the browser check; -rs names any test skipped (only the check of the book build's executed
# chapters is, where no build exists: `make test` passes the build and requires it).
UNIT := $(PY) -m pytest tests -q -rs --ignore=tests/browser

unit: $(STAMP)
	$(UNIT)

notebooks: $(STAMP) data
	$(PY) -m pytest --nbval-lax notebooks -q -p no:cacheprovider

strict-book: $(STAMP) data
	$(JB) build . --builder html -W -n --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

# Each chapter executes once, in the book build (what `make book` does). The nbval pass after it re-runs the
# chapters on the runs the build left in runs/ and checks their outputs without recomputing them; the unit tests
# then check the chapters' outputs as the build executed them, rather than executing the chapters again.
test: strict-book notebooks
	$(UNIT) --executed-chapters=_build/jupyter_execute/notebooks
	$(PY) -m pytest tests/browser -q -rs

# The developer benchmarks (benchmarks/, not part of the installed package): prints the tables, writes
# runs/bench/bench.json and the book's figures. BENCH_ARGS=--quick for a smoke test of about a minute.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m benchmarks --figures runs/bench/figures --markdown runs/bench/bench.md $(BENCH_ARGS)

# The acceptance check on a GPU: every gradient mode against CPU float64, determinism,
# resume, no host sync, then the CIFAR-10-shape timings; prints a table, writes JSON, fails on a failed
# check. `make test` runs its CPU form (tests/test_check.py). CHECK_PRECISION=tf32|bf16 to check those.
CHECK_PRECISION ?= fp32
check-gpu: $(STAMP)
	$(PY) -m mctlib check --device cuda --precision $(CHECK_PRECISION) --out runs/check/check-gpu-$(CHECK_PRECISION).json

clean:
	rm -rf _build
