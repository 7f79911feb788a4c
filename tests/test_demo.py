"""The product's claim, tested on a real pretrained model: after the demo's training, SmolLM2-135M-Instruct
writes the four review sections on held-out papers, and the untuned base model does not.

Same path as `make demo`: `make data MODEL=smollm2` -> `make sft` (sft_recipes/smollm2_sample.yaml) ->
`make merge` -> `make predict` with the base model (BASE=1) and with the tuned one, into one metrics table.
"""

from __future__ import annotations

import csv
import json

import pytest
from conftest import ext_ok

pytestmark = pytest.mark.slow

N = 6  # held-out papers predicted here (the demo predicts all 12; 6 keeps the suite within its time)
BASE_TOKENS = 200  # the base model never writes the sections (0/12 in the demo at 400 tokens); half of it shows that


@pytest.fixture(scope="module")
def predicted(smollm2_workspace):
    ws = smollm2_workspace
    common = ["run", "predict", "--model", "smollm2", "--data", "sample", "--max-samples", str(N)]
    ext_ok(ws, *common, "--base", "--max-new-tokens", str(BASE_TOKENS))
    ext_ok(ws, *common)
    pred = ws / "runs/smollm2_sample/predict"
    rows = {r["run"]: r for r in csv.DictReader((pred / "metrics.csv").open())}
    return ws, pred, rows


def test_tuned_model_writes_the_four_sections_and_the_base_does_not(predicted):
    _, _, rows = predicted
    base, tuned = rows["base_temp_0.35"], rows["temp_0.35"]
    assert int(base["n"]) == int(tuned["n"]) == N
    base_pct, tuned_pct = float(base["all_sections_%"]), float(tuned["all_sections_%"])
    assert tuned_pct >= 75.0, rows  # measured: 12/12 on the demo's split, 19/20 on other ICLR 2022 papers
    assert base_pct <= 25.0, rows  # measured: 0/12
    assert tuned_pct - base_pct >= 50.0
    assert float(tuned["rouge-l"]) > float(base["rouge-l"])  # closer to the reference reviews, too


def test_tuned_reviews_end_at_the_end_of_turn_token(predicted):
    """Generation stops at <|im_end|> (the converted GGUF said eos = <|im_start|>; training would have taught
    the wrong stop): the merged model's eos is <|im_end|>, and the tuned reviews end by themselves before the
    400-token cap (measured on the demo's 12 papers: 10 stop at 219-322 tokens, 2 loop on to the cap; with the
    wrong eos every one runs to the cap), with no chat markers inside."""
    from transformers import AutoTokenizer, GenerationConfig

    ws, pred, _ = predicted
    merged = ws / "runs/smollm2_sample/merged"
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.eos_token == "<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert im_end in (eos if isinstance(eos, list) else [eos]), eos
    preds = [json.loads(x) for x in (pred / "temp_0.35/generated_predictions.jsonl").open()]
    assert len(preds) == N
    assert not any("<|im_start|>" in p["predict"] or "<|im_end|>" in p["predict"] for p in preds)
    lengths = [len(tok(p["predict"], add_special_tokens=False)["input_ids"]) for p in preds]
    assert sum(n < 390 for n in lengths) >= N - 2, lengths  # most stopped by themselves


def test_the_predicted_papers_sit_beside_the_reviews(predicted):
    _, pred, _ = predicted
    papers = [json.loads(x) for x in (pred / "papers.jsonl").open()]
    reviews = [json.loads(x) for x in (pred / "temp_0.35/reviews.jsonl").open()]
    assert [r["paper_id"] for r in reviews] == [p["paper_id"] for p in papers][:N]
