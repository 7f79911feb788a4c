"""`llamafactory-ext <command>`: one subcommand per module, grouped by stage like the package.

Each module in COMMANDS exposes `add_arguments(parser)` and `run(args) -> int`, and keeps heavy imports (torch,
transformers, llamafactory) inside functions so `--help` stays instant. `run` has one action per module.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from llamafactory_ext import UserError

# name -> (module, one-line help); a dict value is a group of actions (`llamafactory-ext run sft`)
COMMANDS: dict[str, tuple[str, str] | dict[str, tuple[str, str]]] = {
    # the main job
    "demo": ("llamafactory_ext.demo", "the main job: SmolLM2 learns to review on CPU; base vs tuned table + plot"),
    # models built here
    "tiny": ("llamafactory_ext.models.tiny", "build the tiny offline Mistral/Gemma models (cached)"),
    "smollm2": ("llamafactory_ext.models.smollm2", "fetch, verify and convert SmolLM2-135M-Instruct (cached, offline after)"),
    # data
    "data": ("llamafactory_ext.data.prepare", "convert + split + truncate + register (`make data`)"),
    "convert": ("llamafactory_ext.data.convert", "paper-review JSONL -> alpaca JSONL (validated, rejects kept)"),
    "truncate": ("llamafactory_ext.data.truncate", "cut papers (never reviews) to a token budget"),
    "split": ("llamafactory_ext.data.split", "split by paper into train/test and nested train subsets"),
    "register": ("llamafactory_ext.data.register", "add/update one dataset in dataset_info.json (atomic)"),
    # train (+ predict, which runs on a trained run)
    "recipes": ("llamafactory_ext.train.recipes", "list MODEL x DATA: shipped recipes and registered datasets"),
    "run": {
        "sft": ("llamafactory_ext.train.sft", "train (LoRA/QLoRA) with llamafactory-cli train"),
        "merge": ("llamafactory_ext.train.merge", "merge the adapter into the base with llamafactory-cli export"),
        "predict": ("llamafactory_ext.eval.predict", "generate reviews of a test split or a file, then metrics"),
    },
    # evaluate
    "predict-merge": ("llamafactory_ext.eval.shards", "join the shards of a sharded predict into one reviews.jsonl"),
    "extract": ("llamafactory_ext.eval.extract", "generated_predictions.jsonl -> reviews.jsonl + metrics"),
    "judge": ("llamafactory_ext.eval.judge", "position-swapped pairwise judge over an OpenAI-compatible API"),
    "baseline": ("llamafactory_ext.eval.baseline", "render GPT-4o's structured reviews in the four-criteria layout"),
    # serve
    "review": ("llamafactory_ext.serve.review", "review one PDF/TXT/MD paper with a local model"),
    "webui": ("llamafactory_ext.serve.webui", "LLaMA-Factory's WebUI on 127.0.0.1:6006 with our datasets"),
    # fit before you run
    "doctor": ("llamafactory_ext.fit.doctor", "check the environment (torch/CUDA, bnb, DeepSpeed, pins)"),
    "plan": ("llamafactory_ext.fit.plan", "peak GPU memory, speed and time of a recipe (or a predict) before launching it"),
    "niah": ("llamafactory_ext.fit.niah", "needle-in-a-haystack probe of a model's effective context"),
    "gpu-check": ("llamafactory_ext.fit.gpucheck", "measure the 7B recipes on this GPU beside the planner (`make gpu-check`)"),
}


def _add(sub, name: str, modname: str, helptext: str, wanted: bool):
    p = sub.add_parser(name, help=helptext, description=helptext, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if not wanted:
        return None
    module = importlib.import_module(modname)  # import only the module of the command being run
    p.description = (module.__doc__ or helptext).strip()
    module.add_arguments(p)
    return module


def dispatch(argv: list[str]) -> int:
    """Parse and run one command; a UserError propagates (main() prints it)."""
    parser = argparse.ArgumentParser(
        prog="llamafactory-ext",
        description="Paper-reviewer LLMs on LLaMA-Factory: data, recipes, training, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    words = [a for a in argv if not a.startswith("-")]
    chosen = words[0] if words else None
    module = None
    for name, entry in COMMANDS.items():
        if isinstance(entry, dict):
            group = sub.add_parser(name, help=f"{' | '.join(entry)} for MODEL x DATA", allow_abbrev=False)
            actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
            action = words[1] if name == chosen and len(words) > 1 else None
            for act, (modname, helptext) in entry.items():
                module = _add(actions, act, modname, helptext, act == action) or module
        else:
            module = _add(sub, name, *entry, wanted=name == chosen) or module
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(module, "EXTRA_ARGS", None):  # e.g. `run sft ... key=value` overrides anywhere
        setattr(args, module.EXTRA_ARGS, list(getattr(args, module.EXTRA_ARGS) or []) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return int(module.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
