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

# demo defaults: the embedded mini-Pile (see README). Every step is idempotent: a second `make demo`
# reuses the download cache, skips finished proxies and refits in minutes.
DATA ?= data
CACHE ?= cache
MAX_MB ?= 4
VOCAB ?= 8192
WORKERS ?= 2
TOKENS := $(DATA)/tok/tokens.json
# the proxy sweep: RegMix's 1M proxy (examples/proxy_1m.yaml) at CPU size
PROXIES ?= 8
PROXY_ITERS ?= 24
PROXY_EVAL ?= 4
PROXY_JOBS ?= 2
SWEEP ?= sweep/demo$(PROXIES)x$(PROXY_ITERS)
PROXY_FLAGS ?= --seq-length 512 --global-batch-size 16 --micro-batch-size 8 --eval-iters 1 --lr-warmup-iters 2
# surrogate and schedule: K stages on the proxies' evaluation grid (PROXY_ITERS/PROXY_EVAL evaluations)
STAGES ?= 6
FIT_FLAGS ?= --min-data-in-leaf 5
SURROGATE ?= $(SWEEP)/surrogate
SCHEDULE ?= $(SWEEP)/sched.json
TARGET_TOKENS ?= 1e9
CANDIDATES ?= 100000
# the target run on the searched schedule (CPU demo model; any examples/ config works)
TARGET_CONFIG ?= examples/demo_10m.yaml
TARGET_ITERS ?= 60
TARGET_SAVE ?= runs/target
TARGET_FLAGS ?=

.PHONY: venv demo test corpus tokenize proxies schedule target clean

venv: $(STAMP)
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(TORCH_STEP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: venv
	$(PY) -m pytest tests

demo: schedule

corpus: venv
	$(PY) -m tools.corpus --out $(DATA)/raw --cache $(CACHE) --max-mb-per-domain $(MAX_MB)

tokenize: corpus
	$(PY) -m tools.preprocess --input $(DATA)/raw --output $(DATA)/tok --vocab-size $(VOCAB) --workers $(WORKERS)

proxies: tokenize
	$(PY) -m tools.sweep sample $(SWEEP) --tokens $(TOKENS) --n $(PROXIES)
	$(PY) -m tools.sweep run $(SWEEP) --config examples/proxy_1m.yaml --jobs $(PROXY_JOBS) \
	    --train-iters $(PROXY_ITERS) --eval-interval $(PROXY_EVAL) -- $(PROXY_FLAGS)
	$(PY) -m tools.collect $(SWEEP)

schedule: proxies
	$(PY) -m tools.fit --sweep $(SWEEP) --out $(SURROGATE) --stages $(STAGES) $(FIT_FLAGS)
	$(PY) -m tools.search --surrogate $(SURROGATE) --out $(SCHEDULE) --tokens $(TOKENS) \
	    --target-tokens $(TARGET_TOKENS) --candidates $(CANDIDATES)
	$(PY) -m tools.schedule show $(SCHEDULE)

target: venv
	mkdir -p $(TARGET_SAVE)
	$(PY) pretrain_regmixd.py --config $(TARGET_CONFIG) --data-schedule $(SCHEDULE) \
	    --tokenizer-type SentencePieceTokenizer --tokenizer-model $(DATA)/tok/tokenizer.model \
	    --train-iters $(TARGET_ITERS) --save $(TARGET_SAVE) --load $(TARGET_SAVE) $(TARGET_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache
