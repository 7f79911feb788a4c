"""The whole data layer on the sample data, then LLaMA-Factory itself loads and trains on the result:
convert -> truncate (tiny Mistral, template mistral) -> split -> register -> LF get_dataset + 2-step SFT.

Proves the prompt LLaMA-Factory builds holds the reviewer instruction and the paper, and that its
cutoff_len cuts nothing (every review is trained on whole, with its end-of-sequence token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamafactory_ext import REVIEWER_INSTRUCTION
from llamafactory_ext.cli import main

BUDGET = 1024  # the tiny byte-level tokenizer makes ~450-900-token reviews; real models' reviews are ~1K tokens


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sample_jsonl, tiny_models):
    """Run the four commands as a user would; return the work folder."""
    work = tmp_path_factory.mktemp("pipeline")
    tok = str(tiny_models["mistral"])
    assert main(["convert", str(sample_jsonl), str(work / "reviews.jsonl")]) == 0
    assert main(["truncate", str(work / "reviews.jsonl"), str(work / "reviews_1k.jsonl"), "--tokenizer", tok,
                 "--template", "mistral", "--max-tokens", str(BUDGET)]) == 0
    assert main(["split", str(work / "reviews_1k.jsonl"), "--test-size", "6", "--sizes", "10,20", "--seed", "3"]) == 0
    info = work / "dataset_info.json"
    for name in ("train", "test", "train_10", "train_20"):
        assert main(["register", f"reviews_{name}", str(work / f"reviews_1k_{name}.jsonl"),
                     "--dataset-info", str(info)]) == 0
    return work


def test_files_and_registration(pipeline, sample_jsonl):
    work = pipeline
    n = len(read_jsonl(sample_jsonl))
    assert len(read_jsonl(work / "reviews_1k.jsonl")) == n  # nothing dropped at this budget
    train, test = read_jsonl(work / "reviews_1k_train.jsonl"), read_jsonl(work / "reviews_1k_test.jsonl")
    assert len(train) + len(test) == n and len(test) == 6
    assert not {r["paper_id"] for r in train} & {r["paper_id"] for r in test}
    assert read_jsonl(work / "reviews_1k_train_10.jsonl") == train[:10]
    assert (work / "reviews_1k.lengths.png").exists()
    info = json.loads((work / "dataset_info.json").read_text())
    assert info["reviews_train_20"] == {"file_name": "reviews_1k_train_20.jsonl", "formatting": "alpaca",
                                        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}


def test_llamafactory_loads_without_cutting(pipeline, tiny_models, tmp_path):
    from llamafactory.train.test_utils import load_dataset_module

    from llamafactory_ext.data.truncate import load_template, load_tokenizer

    work = pipeline
    module = load_dataset_module(
        stage="sft", do_train=True, model_name_or_path=str(tiny_models["mistral"]), template="mistral",
        dataset="reviews_train", eval_dataset="reviews_test", dataset_dir=str(work), cutoff_len=BUDGET,
        finetuning_type="lora", output_dir=str(tmp_path / "out"), report_to="none", overwrite_cache=True,
    )
    tok = load_tokenizer(str(tiny_models["mistral"]))
    template = load_template(tok, "mistral")
    for split_name, file in (("train_dataset", "reviews_1k_train.jsonl"), ("eval_dataset", "reviews_1k_test.jsonl")):
        rows = module[split_name]
        records = read_jsonl(work / file)
        assert len(rows) == len(records)
        for row, rec in zip(rows, records, strict=True):
            ids, labels = row["input_ids"], row["labels"]
            prompt_ids, response_ids = template.encode_oneturn(
                tok, [{"role": "user", "content": rec["instruction"] + "\n" + rec["input"]},
                      {"role": "assistant", "content": rec["output"]}])
            assert len(ids) == len(prompt_ids) + len(response_ids) <= BUDGET  # LF's cutoff_len cut nothing
            n_prompt = sum(1 for t in labels if t == -100)
            prompt_text = tok.decode(ids[:n_prompt])
            assert prompt_text.startswith("<s>[INST] " + REVIEWER_INSTRUCTION + "\n")
            assert rec["input"][-50:] in prompt_text  # the (cut) paper ends the prompt, whole
            target = labels[n_prompt:]
            assert tok.decode(target, skip_special_tokens=True).strip() == rec["output"].strip()
            assert target[-1] == tok.eos_token_id  # the review's end is trained on


@pytest.mark.slow
def test_two_step_sft_on_registered_data(pipeline, tiny_models, tmp_path):
    from llamafactory.train.tuner import run_exp

    out = tmp_path / "sft"
    run_exp({
        "stage": "sft", "do_train": True, "model_name_or_path": str(tiny_models["mistral"]), "template": "mistral",
        "dataset": "reviews_train_10", "dataset_dir": str(pipeline), "cutoff_len": BUDGET,
        "finetuning_type": "lora", "lora_target": "all", "output_dir": str(out), "max_steps": 2,
        "per_device_train_batch_size": 2, "learning_rate": 1e-3, "report_to": "none", "logging_steps": 1,
        "overwrite_cache": True, "save_strategy": "no",
    })
    assert (out / "adapter_model.safetensors").exists()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert logs[-1]["current_steps"] == 2 and all(log["loss"] > 0 for log in logs if "loss" in log)
