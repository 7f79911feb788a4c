"""The whole pipeline on the embedded default, for both tiny architectures, through LLaMA-Factory's own
entry points: `make data` (convert -> split -> truncate -> register the real sample papers) ->
`llamafactory-cli train` (4-bit QLoRA SFT) -> `llamafactory-cli export` (merge) -> `llamafactory-cli
train` with do_predict -> `llamafactory-ext extract`. One run per architecture, several checks on it.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env

from llamafactory_ext import REVIEWER_INSTRUCTION, families

pytestmark = pytest.mark.slow

CASES = {  # MODEL name -> (run folder, prompt head, prompt tail) in the template's exact chat format
    "tiny": ("tiny_sample", f"<s>[INST] {REVIEWER_INSTRUCTION}\n", "[/INST]"),
    "tiny_gemma": ("tiny_gemma_sample", f"<bos><start_of_turn>user\n{REVIEWER_INSTRUCTION}\n",
                   "<end_of_turn>\n<start_of_turn>model\n"),
}
# Overfit a handful of papers so the loss must visibly fall.
OVERFIT = ["max_samples=4", "num_train_epochs=12", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
           "learning_rate=1.0e-2", "logging_steps=1", "save_steps=1000", "report_to=none"]


def ext(ws: Path, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *args], cwd=ws, env=cli_env(),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"llamafactory-ext {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def data_ws(tiny_models, tmp_path_factory) -> Path:
    """A project-shaped folder with the sample data prepared exactly as `make data` does it."""
    ws = tmp_path_factory.mktemp("pipeline")
    for d in ("sft_recipes", "deepspeed", "build", "data/sample"):
        (ws / d).parent.mkdir(parents=True, exist_ok=True)
        (ws / d).symlink_to(ROOT / d)
    shutil.copy(ROOT / "dataset_info.json", ws / "dataset_info.json")
    ext(ws, "data")
    return ws


@pytest.fixture(scope="module", params=sorted(CASES))
def run(request, data_ws) -> dict:
    model = request.param
    name = CASES[model][0]
    logs = {
        "sft": ext(data_ws, "run", "sft", "--model", model, "--data", "sample", *OVERFIT),
        "merge": ext(data_ws, "run", "merge", "--model", model, "--data", "sample"),
        "predict": ext(data_ws, "run", "predict", "--model", model, "--data", "sample", "--max-new-tokens", "24"),
    }
    return {"model": model, "dir": data_ws / "runs" / name, "ws": data_ws, "logs": logs}


def test_data_is_registered_and_split_by_paper(data_ws):
    info = json.loads((data_ws / "dataset_info.json").read_text())
    train = [json.loads(x) for x in (data_ws / info["sample_train"]["file_name"]).open()]
    test = [json.loads(x) for x in (data_ws / info["sample_test"]["file_name"]).open()]
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
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # a 2-layer random model with a frozen 4-bit base moves slowly; a broken run stays within +-0.03
    assert last < first - 0.2, f"loss did not fall while overfitting 4 papers: {first:.3f} -> {last:.3f}"


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
    _, head, tail = CASES[run["model"]]
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
    rows = list(csv.DictReader((run["dir"] / "predict/metrics.csv").open()))
    assert [r["run"] for r in rows] == ["temp_0.35"]
    assert float(rows[0]["bleu-4"]) == pytest.approx(res["predict_bleu-4"], abs=1e-3)
    assert (run["dir"] / "predict/metrics.md").is_file()
    reviews = [json.loads(x) for x in (run["dir"] / "predict/temp_0.35/reviews.jsonl").open()]
    assert len(reviews) == 6 and all(r["paper_id"] for r in reviews)



def test_vllm_backend_uses_the_same_prompts(run):
    """BACKEND=vllm encodes the test split with LLaMA-Factory exactly as its HF predict did; only the
    decoding is vLLM's (GPU only: here it must refuse clearly)."""
    from llamafactory_ext.vllm_predict import encode_test_split

    fam = families.get(run["model"])
    rows, _ = encode_test_split(str(run["dir"] / "merged"), fam.template, fam.datasets()[1], dataset_dir=str(run["ws"]))
    preds = [json.loads(x) for x in (run["dir"] / "predict/temp_0.35/generated_predictions.jsonl").open()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in preds]
    assert [r["label"] for r in rows] == [p["label"] for p in preds]
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "run", "predict", "--model", run["model"],
                        "--data", "sample", "--backend", "vllm", "--max-new-tokens", "4"], cwd=run["ws"],
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "BACKEND=vllm needs vLLM" in p.stderr, p.stderr[-2000:]
