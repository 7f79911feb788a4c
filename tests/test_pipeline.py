"""The whole pipeline, for both tiny architectures, through LLaMA-Factory's own entry points: `make data`
(convert -> split -> truncate -> register the real sample papers) -> `llamafactory-cli train` (4-bit QLoRA SFT)
-> `llamafactory-cli export` (merge) -> `llamafactory-cli train` with do_predict -> `llamafactory-ext extract`.
One run per architecture, several checks on it: tiny (Mistral's template) is the README walkthrough's run
(conftest.py `walkthrough_ws`: your own data, the family's base recipe); tiny_gemma overfits 4 sample papers here.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from conftest import ext, ext_ok, project

from llamafactory_ext import REVIEWER_INSTRUCTION, families

pytestmark = pytest.mark.slow

CASES = {  # MODEL name -> (run folder, DATA, prompt head, prompt tail) in the template's exact chat format
    "tiny": ("tiny_mine", "mine", f"<s>[INST] {REVIEWER_INSTRUCTION}\n", "[/INST]"),
    "tiny_gemma": ("tiny_gemma_sample", "sample", f"<bos><start_of_turn>user\n{REVIEWER_INSTRUCTION}\n",
                   "<end_of_turn>\n<start_of_turn>model\n"),
}
# Overfit a handful of papers so the loss must visibly fall.
OVERFIT = ["max_samples=4", "num_train_epochs=12", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
           "learning_rate=1.0e-2", "logging_steps=1", "save_steps=1000", "report_to=none"]


@pytest.fixture(scope="module")
def gemma_run(tiny_models, tmp_path_factory) -> dict:
    """tiny_gemma: the sample data built as `make data MODEL=tiny_gemma` does it, overfit, merged, predicted."""
    ws = project(tmp_path_factory.mktemp("pipeline"))
    common = ["--model", "tiny_gemma", "--data", "sample"]
    logs = {"data": ext_ok(ws, "data", "--model", "tiny_gemma"),
            "sft": ext_ok(ws, "run", "sft", *common, *OVERFIT),
            "merge": ext_ok(ws, "run", "merge", *common),
            "predict": ext_ok(ws, "run", "predict", *common, "--max-new-tokens", "24")}
    return {"model": "tiny_gemma", "dir": ws / "runs/tiny_gemma_sample", "ws": ws, "logs": logs}


@pytest.fixture(params=sorted(CASES))
def run(request) -> dict:
    if request.param == "tiny":  # the walkthrough's run (conftest.py), read, never changed
        ws = request.getfixturevalue("walkthrough_ws")
        return {"model": "tiny", "dir": ws / "runs/tiny_mine", "ws": ws, "logs": {"sft": (ws / "walkthrough.log").read_text()}}
    return request.getfixturevalue("gemma_run")


def test_data_is_registered_and_split_by_paper(run):
    info = json.loads((run["ws"] / "dataset_info.json").read_text())
    data = CASES[run["model"]][1]
    names = {"mine": ("mine_train", "mine_test"), "sample": (f"{families.get(run['model']).sample}_train",
                                                           f"{families.get(run['model']).sample}_test")}[data]
    train = [json.loads(x) for x in (run["ws"] / info[names[0]]["file_name"]).open()]
    test = [json.loads(x) for x in (run["ws"] / info[names[1]]["file_name"]).open()]
    assert len(train) + len(test) == 36 and len(test) == 6
    assert not {r["paper_id"] for r in train} & {r["paper_id"] for r in test}
    assert all(r["instruction"] == REVIEWER_INSTRUCTION for r in train + test)


def test_adapter_written_and_loss_falls(run):
    adapter = run["dir"] / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (adapter / "training_loss.png").is_file()
    assert "Quantizing model to 4 bit with bitsandbytes" in run["logs"]["sft"]
    hist = json.loads((adapter / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in hist if "loss" in h]
    # OVERFIT: 4 papers x 12 epochs / batch 2 = 24 logged steps; the walkthrough's recipe: 30 papers / (batch 2 x
    # accumulation 2) = 8 steps x 4 epochs = 32 steps, logged every 2nd
    assert len(losses) == (24 if run["model"] == "tiny_gemma" else 16) and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # a 2-layer random model with a frozen 4-bit base moves slowly; a broken run stays within +-0.03
    assert last < first - 0.2, f"loss did not fall while training: {first:.3f} -> {last:.3f}"


def test_merged_model_equals_base_plus_adapter(run):
    """The merged model computes what the base model with the trained adapter computes (and not what the
    base alone computes): the merge baked the adapter in, onto the unquantized base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = run["dir"] / "merged"
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg, "merged onto the unquantized base"
    base_path = yaml.safe_load((run["dir"] / "sft_args.yaml").read_text())["model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("The paper proposes a new method for reviewing papers.", return_tensors="pt")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(run["ws"] / base_path, dtype=torch.float32)
        plain = base(**ids).logits
        want = PeftModel.from_pretrained(base, run["dir"] / "adapter")(**ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (got - plain).abs().max() > 1e-3, "the adapter changed nothing: the merge cannot be told from the base"


def test_predictions_use_the_exact_chat_template(run):
    _, _, head, tail = CASES[run["model"]]
    preds = [json.loads(x) for x in (run["dir"] / "predict/temp_0.35/generated_predictions.jsonl").open()]
    assert len(preds) == 6  # one line per test paper
    for p in preds:
        assert p["prompt"].startswith(head), p["prompt"][:200]
        assert p["prompt"].endswith(tail), p["prompt"][-200:]
        assert REVIEWER_INSTRUCTION in p["prompt"]
        assert p["label"].lstrip().startswith("[Significance and novelty]")  # mistral: " {answer}"
    args = (run["dir"] / "predict/predict_args_temp_0.35.yaml").read_text()
    assert "do_sample: true" in args and "temperature: 0.35" in args


def test_metrics_are_written(run):
    res = json.loads((run["dir"] / "predict/temp_0.35/predict_results.json").read_text())
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert math.isfinite(res[key]) and res[key] >= 0
    rows = {r["run"]: r for r in csv.DictReader((run["dir"] / "predict/metrics.csv").open())}
    assert "temp_0.35" in rows  # (the walkthrough also predicted with the base model: base_temp_0.35)
    # our extract scores exactly as LLaMA-Factory's predict does (its own ComputeSimilarity)
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert float(rows["temp_0.35"][key]) == pytest.approx(res[f"predict_{key}"], abs=1e-3), key
    assert (run["dir"] / "predict/metrics.md").is_file()
    reviews = [json.loads(x) for x in (run["dir"] / "predict/temp_0.35/reviews.jsonl").open()]
    assert len(reviews) == 6 and all(r["paper_id"] for r in reviews)



def test_vllm_backend_uses_the_same_prompts(run):
    """BACKEND=vllm encodes the test split with LLaMA-Factory exactly as its HF predict did; only the
    decoding is vLLM's (GPU only: here it must refuse clearly)."""
    from llamafactory_ext.eval.vllm_predict import encode_test_split

    fam = families.get(run["model"])
    test_split = "mine_test" if run["model"] == "tiny" else fam.datasets()[1]
    rows, _ = encode_test_split(str(run["dir"] / "merged"), fam.template, test_split, dataset_dir=str(run["ws"]))
    preds = [json.loads(x) for x in (run["dir"] / "predict/temp_0.35/generated_predictions.jsonl").open()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in preds]
    assert [r["label"] for r in rows] == [p["label"] for p in preds]
    p = ext(run["ws"], "run", "predict", "--model", run["model"], "--data", CASES[run["model"]][1], "--backend", "vllm",
            "--max-new-tokens", "4")
    assert p.returncode == 2 and "BACKEND=vllm needs vLLM" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
