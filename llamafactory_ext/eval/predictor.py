"""One LLaMA-Factory predict: what it reviews (a registered dataset), its arguments, and what its output becomes.

Used by `run predict` (eval/predict.py) and by each chunk of a sharded predict (eval/shards.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from llamafactory_ext import UserError, units
from llamafactory_ext.train import resolve

# LLaMA-Factory counts the reference review in the predict budget and, when over, cuts the END of the prompt
# (the `[/INST]` / `<start_of_turn>model` marker). Papers are already cut to the family's inference budget,
# so the budget here only has to never bite.
PREDICT_CUTOFF = 1_000_000


@dataclass(frozen=True)
class Target:
    """What one predict reviews: a registered dataset, where its dataset_info.json is, where reviews go."""

    dataset: str
    dataset_dir: Path
    out_root: Path  # predict/ or predict/<file stem>/
    papers: Path | None  # the predicted alpaca file (names the papers; the judge's paper texts)


def tokenizer_of(r: resolve.Run) -> str:
    """The base model's tokenizer as this process loads it (a project folder, or a hub id)."""
    local = r.project.path(r.base_model)
    return str(local) if local.exists() else r.base_model


def predict_args(r: resolve.Run, t: Target, model: str, temp: float, out: Path, ns: argparse.Namespace) -> dict:
    args = {
        "stage": "sft",
        "do_predict": True,
        "predict_with_generate": True,
        "model_name_or_path": model,
        "template": r.template,
        "eval_dataset": t.dataset,
        "dataset_dir": r.project.rel(t.dataset_dir),
        "cutoff_len": PREDICT_CUTOFF,
        "do_sample": temp > 0,
        "temperature": temp if temp > 0 else 1.0,
        "top_p": ns.top_p if ns.top_p is not None else r.top_p,
        "max_new_tokens": ns.max_new_tokens or r.max_new_tokens,
        "per_device_eval_batch_size": ns.batch_size or r.predict_batch,
        "output_dir": r.project.rel(out),
        "overwrite_output_dir": True,
        "report_to": "none",
        "seed": ns.seed,
        "bf16": bool(r.trained_args.get("bf16")),
    }
    if ns.max_samples:
        args["max_samples"] = ns.max_samples
    args.update(resolve.parse_overrides(ns.overrides, "run predict"))
    return args


def extract_all(out_root: Path, ids: Path | None, *, quiet: bool = False, shown=str) -> list[dict]:
    """reviews.jsonl + per-paper Markdown + ONE metrics table over every run predicted into `out_root` so far
    (this call's and earlier ones': base and tuned, every temperature)."""
    from llamafactory_ext.eval import extract

    if ids is not None and not ids.is_file():
        raise UserError(f"{ids} (the predicted split) is missing: papers could not be named; run `make data` again")

    found = {p.parent: units.parse_temp_dir(p.parent.name) for p in out_root.glob("*temp_*/generated_predictions.jsonl")}
    # base first, then by temperature; a folder that is not a temperature's (temp_0.35.old) is not a run
    done = sorted((d for d, bt in found.items() if bt), key=lambda d: (not found[d][0], found[d][1]))
    rows = extract.extract([p / "generated_predictions.jsonl" for p in done], out_root, ids, [p.name for p in done])
    if not quiet:
        sys.stdout.write(extract.format_markdown(rows))
        print(f"metrics: {shown(out_root / 'metrics.csv')} ({shown(out_root / 'metrics.md')})")
    return rows
