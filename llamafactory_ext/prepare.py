"""`make data`: convert -> split -> truncate -> register, in one command.

    llamafactory-ext data                                         # the 36-paper sample, for the tiny models
    llamafactory-ext data --model mistral --in paper_review.jsonl # your data, for a real recipe

The sample becomes `sample_train` / `sample_test` (data/build/sample/). Your data becomes
`paper_review_{5k,15k}_<model>` (nested: the 5K records are the first 5K of the 15K) and
`paper_review_test_<model>`, truncated with that model's tokenizer and chat template so that
LLaMA-Factory's `cutoff_len` never has to cut anything (it would cut the end of the prompt, i.e.
the `[/INST]` marker, or the review). Test papers keep their first 7 x 1024 tokens (inference).
Each step is the same command you can run by hand (`llamafactory-ext convert|split|truncate|register`).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from llamafactory_ext import UserError

# model -> (tokenizer default, template, training budget = the recipes' cutoff_len)
MODELS = {
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", 12288),
    "gemma": ("google/gemma-7b-it", "gemma", 12288),
}
SAMPLE_IN = Path("data/sample/paper_review.jsonl")
# tiny recipes: cutoff_len 1024, minus room for either tiny template's own tokens
SAMPLE_TRAIN_TOKENS = 1000
SAMPLE_PAPER_TOKENS = 700
INFERENCE_PAPER_TOKENS = 7 * 1024  # the seed's inference truncation


def step(command: str, argv: list[str]) -> None:
    """Run one `llamafactory-ext <command>` in this process (same parser, same checks)."""
    from llamafactory_ext.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"llamafactory-ext {command}")
    module.add_arguments(parser)
    print(f"+ llamafactory-ext {command} {' '.join(argv)}", flush=True)
    rc = module.run(parser.parse_args(argv))
    if rc:
        raise UserError(f"`llamafactory-ext {command}` failed (exit {rc}); see its message above")


def prepare_sample(build: Path = Path("data/build/sample"), dataset_info: str = "dataset_info.json",
                   tokenizer: str | None = None, src: Path = SAMPLE_IN, test_size: int = 6) -> dict[str, Path]:
    if tokenizer is None:
        from llamafactory_ext import tiny

        tokenizer = str(tiny.build("mistral"))
    step("convert", [str(src), str(build / "all.jsonl")])
    step("split", [str(build / "all.jsonl"), "--test-size", str(test_size), "--seed", "0", "--out-dir", str(build)])
    step("truncate", [str(build / "all_train.jsonl"), str(build / "train.jsonl"), "--tokenizer", tokenizer,
                      "--template", "mistral", "--max-tokens", str(SAMPLE_TRAIN_TOKENS)])
    step("truncate", [str(build / "all_test.jsonl"), str(build / "test.jsonl"), "--tokenizer", tokenizer,
                      "--template", "mistral", "--max-tokens", str(SAMPLE_TRAIN_TOKENS), "--inference",
                      "--paper-tokens", str(SAMPLE_PAPER_TOKENS)])
    out = {"sample_train": build / "train.jsonl", "sample_test": build / "test.jsonl"}
    for name, path in out.items():
        step("register", [name, str(path), "--dataset-info", dataset_info])
    return out


def prepare_model(model: str, src: Path, tokenizer: str | None = None, test_size: str = "500",
                  sizes: str = "5000,15000", build_root: Path = Path("data/build/paper_review"),
                  dataset_info: str = "dataset_info.json") -> dict[str, Path]:
    if model not in MODELS:
        raise UserError(f"unknown MODEL={model!r} for `make data`; valid values: {', '.join(MODELS)} "
                        "(the sample for the tiny models needs no IN=: `make data`)")
    default_tok, template, budget = MODELS[model]
    tokenizer = tokenizer or default_tok
    build = build_root / model
    step("convert", [str(src), str(build / "all.jsonl")])
    step("split", [str(build / "all.jsonl"), "--test-size", test_size, "--sizes", sizes, "--seed", "0",
                   "--out-dir", str(build)])
    from llamafactory_ext.split import parse_sizes, size_name

    tags = [size_name(n) for n in parse_sizes(sizes)]  # "5000,15000" or "5k,15k" -> ["5k", "15k"]
    out = {}
    for tag in tags:
        dst = build / f"train_{tag}.jsonl"
        step("truncate", [str(build / f"all_train_{tag}.jsonl"), str(dst), "--tokenizer", tokenizer,
                          "--template", template, "--max-tokens", str(budget)])
        out[f"paper_review_{tag}_{model}"] = dst
    dst = build / "test.jsonl"
    step("truncate", [str(build / "all_test.jsonl"), str(dst), "--tokenizer", tokenizer, "--template", template,
                      "--max-tokens", str(budget), "--inference", "--paper-tokens", str(INFERENCE_PAPER_TOKENS)])
    out[f"paper_review_test_{model}"] = dst
    for name, path in out.items():
        step("register", [name, str(path), "--dataset-info", dataset_info, "--force"])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="mistral | gemma (omit for the sample / tiny models)")
    p.add_argument("--in", dest="src", default=None, help="your paper-review JSONL (needed with --model)")
    p.add_argument("--model-path", default=None, help="local model folder whose tokenizer to use")
    p.add_argument("--test-size", default="500", help="papers held out for predict (count or fraction)")
    p.add_argument("--sizes", default="5000,15000", help="nested training subsets")
    p.add_argument("--dataset-info", default="dataset_info.json")


def run(args: argparse.Namespace) -> int:
    if args.model in (None, "", "tiny", "tiny_gemma"):
        if args.src:
            raise UserError("--in needs --model mistral|gemma (the tiny models train on the shipped sample)")
        paths = prepare_sample(dataset_info=args.dataset_info)
    else:
        if not args.src:
            raise UserError(f"make data MODEL={args.model} needs IN=/path/to/paper_review.jsonl")
        paths = prepare_model(args.model, Path(args.src), args.model_path, args.test_size, args.sizes,
                              dataset_info=args.dataset_info)
    for name, path in paths.items():
        print(f"registered {name}: {path}")
    return 0
