"""`make predict BACKEND=vllm`: generate the test-split reviews with vLLM instead of HF generate.

GPU only (`pip install '.[gpu]'`). The prompts are LLaMA-Factory's own: the registered test split
is loaded and encoded by LLaMA-Factory (`get_dataset`, the same template as training), and only
the decoding is vLLM's. The output has the same shape as LLaMA-Factory's predict
(`generated_predictions.jsonl` with prompt / predict / label, and `predict_results.json` with
BLEU-4 / ROUGE computed by LLaMA-Factory's own metric), so `extract` and `judge` work unchanged.
LLaMA-Factory 0.9.5 caps vLLM at 0.11.0 and refuses `rope_scaling` with it; a merged model carries its
scaling in config.json, which vLLM reads itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write_text

IGNORE_INDEX = -100


def encode_test_split(model_dir: str, template: str, dataset: str, dataset_dir: str = ".",
                      cutoff_len: int = 1_000_000, max_samples: int | None = None) -> tuple[list[dict], object]:
    """[{prompt_ids, prompt, label}] for each test record, encoded exactly as LLaMA-Factory does for
    generation (stage "ppo" = prompt only; the reference review is kept as the label)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_tokenizer
    from transformers import Seq2SeqTrainingArguments

    model_args, data_args, _, _ = get_infer_args({
        "model_name_or_path": model_dir, "template": template, "dataset": dataset, "dataset_dir": dataset_dir,
        "cutoff_len": cutoff_len, "max_samples": max_samples, "preprocessing_num_workers": 1,
    })
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template_obj = get_template_and_fix_tokenizer(tokenizer, data_args)
    training_args = Seq2SeqTrainingArguments(output_dir=str(Path(model_dir) / ".vllm_predict"), report_to="none")
    data = get_dataset(template_obj, model_args, data_args, training_args, "ppo", **tokenizer_module)["train_dataset"]
    rows = []
    for ex in data:
        label_ids = [t for t in ex["labels"] if t != IGNORE_INDEX]
        rows.append({
            "prompt_ids": list(ex["input_ids"]),
            # as LLaMA-Factory's HF predict writes them: prompt with special tokens, label without
            "prompt": tokenizer.decode(ex["input_ids"], skip_special_tokens=False),
            "label": tokenizer.decode(label_ids, skip_special_tokens=True),
        })
    return rows, (template_obj.get_stop_token_ids(tokenizer), model_args)


def require() -> None:
    """A UserError saying how to get vLLM when it cannot be imported (GPU only)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError("BACKEND=vllm needs vLLM on a CUDA machine: pip install -e '.[gpu]' "
                        "(or use the default BACKEND=huggingface)")


def predict(model_dir: str, template: str, dataset: str, out: Path, *, temperature: float, top_p: float,
            max_new_tokens: int, seed: int = 42, dataset_dir: str = ".", max_samples: int | None = None,
            bf16: bool = True) -> Path:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise UserError("BACKEND=vllm needs vLLM on a CUDA machine: pip install -e '.[gpu]' "
                        f"(or use the default BACKEND=huggingface) [{e}]") from e
    from llamafactory_ext.eval.extract import similarity

    rows, (stop_ids, _) = encode_test_split(model_dir, template, dataset, dataset_dir, max_samples=max_samples)
    longest = max(len(r["prompt_ids"]) for r in rows)
    llm = LLM(model=model_dir, dtype="bfloat16" if bf16 else "auto", max_model_len=longest + max_new_tokens,
              seed=seed, disable_log_stats=True)
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                            stop_token_ids=stop_ids, seed=seed, skip_special_tokens=True)
    results = llm.generate([{"prompt_token_ids": r["prompt_ids"]} for r in rows], params)
    preds = [res.outputs[0].text for res in results]
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": r["prompt"], "predict": p, "label": r["label"]}, ensure_ascii=False)
             for r, p in zip(rows, preds, strict=True)]
    atomic_write_text(out / "generated_predictions.jsonl", "\n".join(lines) + "\n")
    metrics = {f"predict_{k}": v for k, v in similarity(preds, [r["label"] for r in rows]).items()}
    atomic_write_text(out / "predict_results.json", json.dumps(metrics, indent=2) + "\n")
    return out
