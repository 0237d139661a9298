# One entry point. `make book` and `make test` each create the environment first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
JB     := $(VENV)/bin/jupyter-book

.PHONY: book test unit notebooks strict-book bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[book,test]'
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	touch $(STAMP)

book: $(STAMP)
	$(JB) build . --builder html
	@echo "Book: $(CURDIR)/_build/html/index.html"

unit: $(STAMP)
	$(PY) -m pytest tests -q --ignore=tests/browser

notebooks: $(STAMP)
	$(PY) -m pytest --nbval-lax notebooks -q -p no:cacheprovider

strict-book: $(STAMP)
	$(JB) build . --builder html -W -n --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

test: unit notebooks strict-book
	$(PY) -m pytest tests/browser -q -rs

bench: $(STAMP)
	$(PY) -m mctlib bench

clean:
	rm -rf _build
