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

# demo defaults: the embedded mini-Pile (see README and docs/SIZING.md for why these sizes). Every
# step is a file: a second `make demo` skips what exists (delete a file to redo its step).
DATA ?= data
CACHE ?= cache
MAX_MB ?= 4
VOCAB ?= 2048
WORKERS ?= 2
RAW := $(DATA)/raw/manifest.json
TOKENS := $(DATA)/tok/tokens.json
# the proxy sweep: RegMix's 1M proxy (examples/proxy_1m.yaml) with the CPU recipe of docs/SIZING.md:
# 96 steps of 16 x 128 tokens at a constant LR 3e-3, evaluated every 16 steps (6 points = the K-stage grid)
PROXIES ?= 8
PROXY_ITERS ?= 96
PROXY_EVAL ?= 16
PROXY_JOBS ?= 2
SWEEP ?= sweep/demo$(PROXIES)x$(PROXY_ITERS)
PROXY_FLAGS ?= --seq-length 128 --global-batch-size 16 --micro-batch-size 8 --eval-iters 4 \
    --lr 3e-3 --min-lr 3e-3 --lr-warmup-iters 8 --log-interval 16
# surrogate and schedules: K stages on the proxies' evaluation grid (PROXY_ITERS/PROXY_EVAL evaluations),
# searched for the demo target's own token count (tools.compare reads it from the launcher flags)
STAGES ?= 6
FIT_FLAGS ?= --min-data-in-leaf 5
SEARCH_FLAGS ?=
CANDIDATES ?= 100000
# the comparison: the same target model, tokens, seeds and evaluation data for every arm
TARGET_CONFIG ?= examples/demo_target.yaml
TARGET_ITERS ?= 96
TARGET_EVAL ?= 16
TARGET_FLAGS ?= --train-iters $(TARGET_ITERS) --eval-interval $(TARGET_EVAL) --save-interval $(TARGET_ITERS)
DEMO ?= runs/demo
REPORT ?= report
DEMO_ARMS ?= natural,regmix,regmixd_offline
DEMO_JOBS ?= 1
COMPARE ?= runs/compare
COMPARE_ARMS ?= natural,uniform,regmix,regmixd_offline,doremi,regmixd_online
SEEDS ?= 1,2,3
BUDGETS ?= 25,50,100
# `make compare` sweeps its own COMPARE_PROXIES proxies (same recipe): a 25% budget of 8 would be 2 proxies,
# too few for RegMix's static fit (tools.fit refuses a constant model)
COMPARE_PROXIES ?= 32
COMPARE_SWEEP := sweep/demo$(COMPARE_PROXIES)x$(PROXY_ITERS)
COMPARE_ARGS = --tokens $(TOKENS) --config $(TARGET_CONFIG) --stages $(STAGES) \
    --candidates $(CANDIDATES) --fit-flags="$(FIT_FLAGS)" --search-flags="$(SEARCH_FLAGS)"
# `make target`: one more run (any TARGET_CONFIG) on the demo's RegMix-D schedule (a fraction schedule)
SCHEDULE ?= $(DEMO)/schedules/regmixd_offline_b100/sched.json
TARGET_SAVE ?= runs/target

.PHONY: venv demo test corpus tokenize proxies schedule target compare clean

venv: $(STAMP)
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(TORCH_STEP)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: venv
	$(PY) -m pytest tests

corpus: $(RAW)
$(RAW): | $(STAMP)
	$(PY) -m tools.corpus --out $(DATA)/raw --cache $(CACHE) --max-mb-per-domain $(MAX_MB)

tokenize: $(TOKENS)
$(TOKENS): $(RAW)
	$(PY) -m tools.preprocess --input $(DATA)/raw --output $(DATA)/tok --vocab-size $(VOCAB) --workers $(WORKERS)

proxies: $(SWEEP)/trajectories.csv
$(SWEEP)/trajectories.csv: $(TOKENS)
	$(PY) -m tools.sweep sample $(SWEEP) --tokens $(TOKENS) --n $(PROXIES)
	$(PY) -m tools.sweep run $(SWEEP) --config examples/proxy_1m.yaml --jobs $(PROXY_JOBS) \
	    --train-iters $(PROXY_ITERS) --eval-interval $(PROXY_EVAL) -- $(PROXY_FLAGS)
	$(PY) -m tools.collect $(SWEEP)

schedule: proxies
	$(PY) -m tools.compare --sweep $(SWEEP) $(COMPARE_ARGS) --out $(DEMO) --arms $(DEMO_ARMS) --seeds 1 \
	    --budgets 100 --schedules-only -- $(TARGET_FLAGS)
	$(PY) -m tools.schedule show $(SCHEDULE)

# corpus -> tokens -> proxies -> fit -> schedules -> one target run per arm -> report (every step resumable)
demo: schedule
	$(PY) -m tools.compare --sweep $(SWEEP) $(COMPARE_ARGS) --out $(DEMO) --arms $(DEMO_ARMS) --seeds 1 \
	    --budgets 100 --jobs $(DEMO_JOBS) -- $(TARGET_FLAGS)
	$(PY) -m tools.report --compare $(DEMO) --out $(REPORT)

# every arm, SEEDS, proxy BUDGETS (% of the sweep) for RegMix and RegMix-D offline/online: hours on 2 cores
compare: $(TOKENS)
	$(MAKE) proxies PROXIES=$(COMPARE_PROXIES)
	$(PY) -m tools.compare --sweep $(COMPARE_SWEEP) $(COMPARE_ARGS) --out $(COMPARE) --arms $(COMPARE_ARMS) --seeds $(SEEDS) \
	    --budgets $(BUDGETS) -- $(TARGET_FLAGS)
	$(PY) -m tools.report --compare $(COMPARE) --out $(COMPARE)/report

target: venv
	@test -f $(SCHEDULE) || { echo "error: no $(SCHEDULE): run make schedule (or make demo) first"; exit 2; }
	mkdir -p $(TARGET_SAVE)
	$(PY) pretrain_regmixd.py --config $(TARGET_CONFIG) --data-schedule $(SCHEDULE) \
	    --tokenizer-type SentencePieceTokenizer --tokenizer-model $(DATA)/tok/tokenizer.model \
	    $(TARGET_FLAGS) --save $(TARGET_SAVE) --load $(TARGET_SAVE)

clean:
	rm -rf $(VENV) .pytest_cache
