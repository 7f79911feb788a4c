"""`llamafactory-ext <command>`: one subcommand per module.

Each module in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`, and keeps
heavy imports (torch, transformers, llamafactory) inside functions so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llamafactory_ext import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("llamafactory_ext.tiny", "build the tiny offline Mistral/Gemma models (cached)"),
    "smollm2": ("llamafactory_ext.smollm2", "fetch, verify and convert SmolLM2-135M-Instruct (cached, offline after)"),
    "recipes": ("llamafactory_ext.recipes", "list MODEL x DATA: shipped recipes and registered datasets"),
    "convert": ("llamafactory_ext.convert", "paper-review JSONL -> alpaca JSONL (validated, rejects kept)"),
    "truncate": ("llamafactory_ext.truncate", "cut papers (never reviews) to a token budget"),
    "split": ("llamafactory_ext.split", "split by paper into train/test and nested train subsets"),
    "register": ("llamafactory_ext.register", "add/update one dataset in dataset_info.json (atomic)"),
    "demo": ("llamafactory_ext.demo", "the main job: SmolLM2 learns to review on CPU; base vs tuned table + plot"),
    "data": ("llamafactory_ext.prepare", "convert + split + truncate + register (`make data`)"),
    "run": ("llamafactory_ext.launch", "resolve and launch sft / merge / predict for MODEL x DATA"),
    "extract": ("llamafactory_ext.extract", "generated_predictions.jsonl -> reviews.jsonl + metrics"),
    "judge": ("llamafactory_ext.judge", "position-swapped pairwise judge over an OpenAI-compatible API"),
    "review": ("llamafactory_ext.review", "review one PDF/TXT/MD paper with a local model"),
    "webui": ("llamafactory_ext.webui", "LLaMA-Factory's WebUI on 127.0.0.1:6006 with our datasets"),
    "doctor": ("llamafactory_ext.doctor", "check the environment (torch/CUDA, bnb, DeepSpeed, pins)"),
    "plan": ("llamafactory_ext.plan", "estimate peak GPU memory of a recipe before launching it"),
    "niah": ("llamafactory_ext.niah", "needle-in-a-haystack probe of a model's effective context"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="llamafactory-ext",
        description="Paper-reviewer LLMs on LLaMA-Factory: data, recipes, training, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (modname, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:  # import only the module of the command being run
            module = importlib.import_module(modname)
            p.description = (module.__doc__ or helptext).strip()
            module.add_arguments(p)
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(module, "EXTRA_ARGS", None):  # e.g. `run sft ... key=value` overrides anywhere
        setattr(args, module.EXTRA_ARGS, list(getattr(args, module.EXTRA_ARGS) or []) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
