# Two commands a user needs (README): `make quickstart` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The torch build for this platform; on a CUDA machine install your CUDA build into .venv first
# (or set TORCH_SPEC), and the existing torch is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv quickstart test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

quickstart: venv
	$(PY) examples/quickstart.py

test: venv
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

clean:
	rm -rf build megafim/_native/*.so
