# regmixd: the two commands a newcomer needs are `make demo` and `make test`.
# Each sets up its own virtual environment (.venv) first; the set-up is idempotent.
#
# TORCH decides how PyTorch gets into the venv:
#   TORCH=cpu     (default) install $(TORCH_SPEC), the CPU build, before anything else, so nothing
#                 pulls a multi-GB CUDA build. Extra pip arguments for it (an index that serves CPU
#                 wheels, say) go in TORCH_PIP_ARGS.
#   TORCH=system  keep the torch already installed in the base Python (an NGC container's, say):
#                 the venv sees the system site-packages and torch is never reinstalled.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TORCH)

ifeq ($(TORCH),system)
VENV_ARGS := --system-site-packages
TORCH_STEP := @$(PY) -c "import torch; print('using system torch', torch.__version__)"
else
VENV_ARGS :=
TORCH_STEP := $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
endif

# demo defaults: the embedded mini-Pile (see README)
DATA ?= data
CACHE ?= cache
MAX_MB ?= 4
VOCAB ?= 8192
WORKERS ?= 2

.PHONY: venv demo test corpus tokenize bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(TORCH_STEP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: venv
	$(PY) -m pytest tests

corpus: venv
	$(PY) -m tools.corpus --out $(DATA)/raw --cache $(CACHE) --max-mb-per-domain $(MAX_MB)

tokenize: corpus
	$(PY) -m tools.preprocess --input $(DATA)/raw --output $(DATA)/tok --vocab-size $(VOCAB) --workers $(WORKERS)

demo: tokenize

clean:
	rm -rf $(VENV) .pytest_cache
