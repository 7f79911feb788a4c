# Paper-reviewer LLMs on LLaMA-Factory. `make demo` runs everything on CPU; `make test` runs the tests.
# Every target installs what it needs first (`make install`, quick when already done).
#
#   make data    MODEL=mistral IN=/path/to/paper_review.jsonl      (convert, split, truncate, register)
#   make sft     MODEL=mistral DATA=15k [ROPE=linear|dynamic] [RESUME=auto|never|path] [NPROC=8] [DRY_RUN=1]
#   make merge   MODEL=mistral DATA=15k
#   make predict MODEL=mistral DATA=15k [TEMP=0.35 | TEMPS="0.35 0.5"] [MAX_SAMPLES=N] [BACKEND=vllm]
#   make judge   MODEL=mistral DATA=15k JUDGE_URL=https://api.openai.com/v1 JUDGE_MODEL=gpt-4o
#   make review  MODEL=mistral DATA=15k PAPER=paper.pdf
#   make webui   [PORT=6006] [HOST=127.0.0.1] [WEBUI_AUTH=user:password]
#   make doctor | make plan MODEL=gemma DATA=15k GPU=a40 | make bench-data | make lint | make clean
# Without MODEL/DATA: the tiny model on the 36-paper sample (MODEL=tiny DATA=sample).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
EXT    := $(BIN)/llamafactory-ext
STAMP  := $(VENV)/.installed

MODEL ?= tiny
DATA  ?= sample

# The embedded default never touches a model hub: the tiny models are built locally. (The real
# recipes name hub IDs; they download once unless you pass MODEL_PATH=/local/copy.)
ifneq ($(filter tiny tiny_gemma,$(MODEL)),)
export HF_HUB_OFFLINE ?= 1
endif
demo test tiny: export HF_HUB_OFFLINE := 1
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM ?= false
export GRADIO_ANALYTICS_ENABLED ?= False

# Variables given on the command line (`make sft MODEL=mistral NPROC=8`) reach the commands' environment,
# where `llamafactory-ext run` / `webui` read them. Nothing is exported empty: LLaMA-Factory's launcher
# reads NNODES/NODE_RANK/MASTER_* with os.getenv and crashes on an empty string.

.PHONY: help install test demo tiny data sft merge predict judge review webui doctor plan bench-data lint clean

help:
	@sed -n '1,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

# ---- install: one venv, the pinned set from pyproject.toml, re-run only when pyproject changes ----
install: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# ---- the embedded default: tiny models + the 36-paper sample ----
tiny: $(STAMP)
	$(EXT) tiny

data: $(STAMP)
ifeq ($(filter tiny tiny_gemma,$(MODEL)),)
	@test -n "$(IN)" || { echo "error: make data MODEL=$(MODEL) needs IN=/path/to/paper_review.jsonl"; exit 2; }
	$(EXT) data --model $(MODEL) --in "$(IN)" $(if $(MODEL_PATH),--model-path "$(MODEL_PATH)") \
	    $(if $(TEST_SIZE),--test-size $(TEST_SIZE)) $(if $(SIZES),--sizes $(SIZES))
else
	$(EXT) data
endif

# ---- train / merge / predict: LLaMA-Factory's own entry points, resolved by llamafactory-ext run ----
sft: $(STAMP)
	@if [ "$(DATA)" = sample ] && [ ! -f data/build/sample/train.jsonl ]; then $(EXT) data; fi
	@if [ "$(MODEL)" = tiny ] || [ "$(MODEL)" = tiny_gemma ]; then $(EXT) tiny; fi
	$(EXT) run sft

merge: $(STAMP)
	$(EXT) run merge

predict: $(STAMP)
	$(EXT) run predict

demo: $(STAMP)
	@start=$$(date +%s); \
	$(EXT) data && \
	$(EXT) run sft --model tiny --data sample --resume never && \
	$(EXT) run merge --model tiny --data sample && \
	$(EXT) run predict --model tiny --data sample && \
	echo && echo "demo finished in $$(( $$(date +%s) - start )) s:" && \
	echo "  adapter:      runs/tiny_sample/adapter" && \
	echo "  loss plot:    runs/tiny_sample/adapter/training_loss.png" && \
	echo "  merged model: runs/tiny_sample/merged" && \
	echo "  predictions:  runs/tiny_sample/predict/temp_0.35/generated_predictions.jsonl" && \
	echo "  reviews:      runs/tiny_sample/predict/temp_0.35/reviews.jsonl" && \
	echo "  metrics:      runs/tiny_sample/predict/metrics.md" && \
	cat runs/tiny_sample/predict/metrics.md 2>/dev/null || true

# HOST/PORT count only when given on the make command line: a shell's own $HOST (tcsh exports the
# machine's name) must never silently move the UI onto the network.
webui: $(STAMP)
	$(EXT) webui $(if $(filter command line,$(origin HOST)),--host $(HOST)) \
	    $(if $(filter command line,$(origin PORT)),--port $(PORT))

doctor: $(STAMP)
	$(EXT) doctor $(if $(wildcard sft_recipes/$(MODEL)_$(DATA).yaml),--recipe sft_recipes/$(MODEL)_$(DATA).yaml)

plan: $(STAMP)
	$(EXT) plan sft_recipes/$(MODEL)_$(DATA).yaml $(if $(GPU),--gpu $(GPU)) $(if $(GPU_MEM),--gpu-mem $(GPU_MEM))

# ---- evaluation ----
# make judge JUDGE_URL=https://api.openai.com/v1 JUDGE_MODEL=gpt-4o  (key from OPENAI_API_KEY)
#   B side: JUDGE_B=reviews.jsonl (default: GPT-4o's reviews of the sample papers); PAPERS=papers.jsonl
#   (default: the test split that was predicted, which holds paper_id + paper text).
ifneq ($(filter tiny tiny_gemma,$(MODEL)),)
PAPERS ?= data/build/sample/test.jsonl
else
PAPERS ?= data/build/paper_review/$(MODEL)/test.jsonl
endif
judge: $(STAMP)
	@test -n "$(JUDGE_URL)" -a -n "$(JUDGE_MODEL)" || { echo "error: make judge needs JUDGE_URL=... JUDGE_MODEL=..."; exit 2; }
	$(EXT) judge --a runs/$(MODEL)_$(DATA)/predict/temp_$(or $(TEMP),0.35)/reviews.jsonl \
	    $(if $(JUDGE_B),--b $(JUDGE_B)) --papers $(PAPERS) --base-url $(JUDGE_URL) --model $(JUDGE_MODEL) \
	    --out runs/$(MODEL)_$(DATA)/judge_temp_$(or $(TEMP),0.35)

# make review PAPER=paper.pdf  (with the merged model of MODEL x DATA)
review: $(STAMP)
	@test -n "$(PAPER)" || { echo "error: make review needs PAPER=path/to/paper.pdf"; exit 2; }
	$(EXT) review "$(PAPER)" --model runs/$(MODEL)_$(DATA)/merged

# ---- tests ----
test: $(STAMP)
	$(BIN)/python -m pytest tests -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench-data: $(STAMP)
	@command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq; }  # the seed's tool, to compare
	$(BIN)/python tests/bench_data.py

clean:
	rm -rf runs build data/build test-artifacts llamaboard_cache llamaboard_config saves
