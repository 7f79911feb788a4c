"""LlamaBoard (LLaMA-Factory's WebUI) pointed at the project: recipes as configs, runs/ for outputs, only
datasets that exist, fp32 without a GPU. serve/webui.py builds the page on top of this.

  - every recipe `sft_recipes/<name>.yaml` is a config under "Config path" (Load arguments): it fills model path,
    template, quantization, LoRA, cutoff, dataset, batch and schedule, and puts the recipe's keys without a widget
    (optim, warmup_ratio, seed, ...) into "Extra arguments"; without a GPU the compute type is fp32 (the
    recipe's bf16 needs one) and DeepSpeed is off;
  - training outputs go to runs/, as the CLI's do: "Output dir" NAME trains into runs/NAME/adapter and writes
    runs/NAME/sft_args.yaml (a recipe loads as NAME = the recipe's name, or NAME_<time> when that run exists);
    the checkpoint lists (Chat, Evaluate, Export) are the trained runs with an adapter (train/runs.py);
    Evaluate writes to runs/NAME/;
  - the project folder is the data folder of the Train and Evaluate tabs; the Train tab does not offer test
    splits (`*_test`, `*_test_*`); the Evaluate tab lists them first.
Every function replaced here is fingerprinted in patches.py (WEBUI_FINGERPRINTS) and replaced through
`patches.replace`: another LLaMA-Factory release is refused with one line, never wired half-way.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from llamafactory_ext import UserError, families, patches
from llamafactory_ext.data.register import load_info
from llamafactory_ext.fileio import atomic_write_text, dump_yaml, load_yaml
from llamafactory_ext.train import runs
from llamafactory_ext.train.resolve import ARGS_FILE

# Modules of llamafactory.webui that copy `DEFAULT_DATA_DIR` at import (`from .common import ...`).
DATA_DIR_MODULES = (
    "llamafactory.webui.common",
    "llamafactory.webui.control",
    "llamafactory.webui.components.train",
    "llamafactory.webui.components.eval",
)
TEST_SPLIT = re.compile(r"(?:^|_)test(?:_|$)")  # sample_test, paper_review_test_mistral
RECIPE_CONFIGS = "sft_recipes"  # "Config path" choices sft_recipes/<name>.yaml are the project's recipes
# function -> (its module, the modules that imported it by name): every place LlamaBoard calls it from
REPLACED = {
    "get_save_dir": ("common", ("common", "control", "chatter", "components.export", "runner")),
    "save_cmd": ("common", ("runner",)),
    "load_args": ("common", ("runner",)),
    "get_model_info": ("control", ("components.top",)),
    "list_checkpoints": ("control", ("components.top", "components.train")),
    "list_output_dirs": ("control", ("components.train",)),
    "list_config_paths": ("control", ("components.train",)),
    "list_datasets": ("control", ("components.train", "components.eval")),
    "Runner._parse_eval_args": ("runner", ("runner",)),
}


# ----------------------------------------------------------------------------- datasets
def is_test_split(name: str) -> bool:
    return bool(TEST_SPLIT.search(name))


def available_datasets(dataset_dir: str | Path, *, ranking: bool = False, for_training: bool = True) -> list[str]:
    """Datasets of dataset_info.json that LLaMA-Factory can load now: a local `file_name` must exist (hub
    entries are kept). For training, test splits are left out; otherwise they come first."""
    dataset_dir = Path(dataset_dir)
    try:
        info = load_info(dataset_dir)
    except UserError:
        return []
    names = [name for name, entry in info.items() if isinstance(entry, dict)
             and bool(entry.get("ranking", False)) == ranking
             and ("file_name" not in entry or (dataset_dir / str(entry["file_name"])).exists())]
    if for_training:
        return [n for n in names if not is_test_split(n)]
    return sorted(names, key=lambda n: not is_test_split(n))


# ----------------------------------------------------------------------------- recipes -> LlamaBoard configs
def _abs(root: Path, value: str) -> str:
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def run_name(runs_dir: Path, name: str, now: str) -> str:
    """`name` unless runs/<name>/adapter already holds something (a finished or resumable run): NAME_<now>."""
    adapter = runs_dir / name / "adapter"
    return f"{name}_{now}" if adapter.is_dir() and any(adapter.iterdir()) else name


def recipe_config(recipe: Path, project, *, accelerator: bool, now: str) -> dict[str, Any]:
    """A LlamaBoard config (element id -> value) that trains what `recipe` trains, into runs/<name>/adapter.

    Keys with a widget fill it; the rest go to "Extra arguments" (JSON, applied last by LlamaBoard), so the
    arguments LLaMA-Factory gets are the recipe's. Paths in the recipe are relative to the project folder."""
    from llamafactory.extras.constants import TRAINING_STAGES

    root = project.root
    args = load_yaml(recipe, "recipe")
    if not args:
        raise UserError(f"{recipe}: empty or not a mapping of LLaMA-Factory arguments")
    take = args.pop
    notes: list[str] = []
    stage = take("stage", "sft")
    stages = {v: k for k, v in TRAINING_STAGES.items()}
    if stage not in stages:
        raise UserError(f"{recipe}: stage {stage!r} is not one of {', '.join(stages)}")
    for key in ("do_train", "output_dir", "overwrite_output_dir", "plot_loss"):  # LlamaBoard sets these
        take(key, None)
    model = str(take("model_name_or_path", ""))
    model_path = model
    if model and ((root / model).exists() or model.startswith((".", "/", "~")) or model.count("/") != 1):
        model_path = _abs(root, model)  # a folder (relative to the project), not an org/name hub id
        if not Path(model_path).exists():
            fam = next((f for f in families.FAMILIES.values() if f.local and f.model == model), None)
            how = f"`llamafactory-ext {fam.builder[0]}` in {root}" if fam else "copy or build it there"
            notes.append(f"the model folder {model_path} does not exist yet: {how}")
    dataset_dir = _abs(root, take("dataset_dir", "data"))
    datasets = [d.strip() for d in str(take("dataset", "") or "").split(",") if d.strip()]
    missing = [d for d in datasets if d not in available_datasets(dataset_dir)]
    if missing:
        notes.append(f"dataset(s) {', '.join(missing)} not built yet: run `make data` (or `llamafactory-ext data`)")
    precision = [k for k in ("pure_bf16", "bf16", "fp16") if take(k, False)]
    compute = precision[0] if precision else "fp32"
    if not accelerator and compute != "fp32":
        notes.append(f"compute type fp32: no GPU here (the recipe's {compute} needs one)")
        compute = "fp32"
    flash, liger = take("flash_attn", "auto"), take("enable_liger_kernel", False)
    deepspeed = take("deepspeed", None)
    if deepspeed and accelerator:
        args["deepspeed"] = _abs(root, deepspeed)  # the project's config, exactly; LlamaBoard adds FORCE_TORCHRUN
    elif deepspeed:
        notes.append("DeepSpeed off: no GPU here")
    if liger and not accelerator:
        notes.append("Liger kernel off: no GPU here")
    qbit = take("quantization_bit", None)
    name = run_name(project.runs, recipe.stem, now)
    cfg: dict[str, Any] = {
        "top.model_name": "Custom", "top.model_path": model_path,
        "top.finetuning_type": take("finetuning_type", "lora"), "top.checkpoint_path": [],
        "top.quantization_bit": str(qbit) if qbit else "none",
        "top.quantization_method": take("quantization_method", "bnb"),
        "top.template": take("template", "default"), "top.rope_scaling": take("rope_scaling", None) or "none",
        "top.booster": "liger_kernel" if liger and accelerator else "flashattn2" if flash == "fa2" else "auto",
        "train.training_stage": stages[stage], "train.dataset_dir": dataset_dir, "train.dataset": datasets,
        "train.compute_type": compute, "train.output_dir": name, "train.ds_stage": "none", "train.ds_offload": False,
    }
    if flash != "auto" and cfg["top.booster"] != "flashattn2":  # one booster widget: Liger + FA2 needs the key
        args["flash_attn"] = flash
    for key, elem, cast in (
        ("learning_rate", "learning_rate", str), ("num_train_epochs", "num_train_epochs", str),
        ("max_grad_norm", "max_grad_norm", str), ("max_samples", "max_samples", str),
        ("cutoff_len", "cutoff_len", int), ("per_device_train_batch_size", "batch_size", int),
        ("gradient_accumulation_steps", "gradient_accumulation_steps", int), ("val_size", "val_size", float),
        ("lr_scheduler_type", "lr_scheduler_type", str), ("logging_steps", "logging_steps", int),
        ("save_steps", "save_steps", int), ("warmup_steps", "warmup_steps", int),
        ("packing", "packing", bool), ("neat_packing", "neat_packing", bool),
        ("train_on_prompt", "train_on_prompt", bool), ("mask_history", "mask_history", bool),
        ("resize_vocab", "resize_vocab", bool), ("enable_thinking", "enable_thinking", bool),
        ("report_to", "report_to", str), ("lora_rank", "lora_rank", int), ("lora_alpha", "lora_alpha", int),
        ("lora_dropout", "lora_dropout", float), ("loraplus_lr_ratio", "loraplus_lr_ratio", float),
        ("lora_target", "lora_target", str), ("additional_target", "additional_target", str),
        ("use_rslora", "use_rslora", bool), ("use_dora", "use_dora", bool),
        ("create_new_adapter", "create_new_adapter", bool),
    ):
        if key in args:
            cfg[f"train.{elem}"] = cast(take(key))
    cfg.setdefault("train.max_samples", "100000")  # LlamaBoard always passes one; "100000" is its default
    cfg["train.extra_args"] = json.dumps(args)  # everything else, verbatim (LlamaBoard applies it last)
    where = project.runs / name / "adapter"
    cfg["train.output_box"] = "\n\n".join([f"Loaded {RECIPE_CONFIGS}/{recipe.name}: trains into `{where}`."]
                                           + [f"Note: {n}." for n in notes])
    return cfg


# ----------------------------------------------------------------------------- LlamaBoard wiring
def wire(project) -> None:
    """Point LlamaBoard at the project (see the module docstring), before the UI is built."""
    import importlib

    import gradio as gr
    from transformers.trainer_utils import get_last_checkpoint

    reason = patches.webui_guard()
    if reason:
        raise UserError(f"the WebUI is wired to the pinned LLaMA-Factory's LlamaBoard, and this is not it ({reason}); "
                        f"reinstall the pinned set (`make install`)")
    mods = {n: importlib.import_module(f"{patches.WEBUI}.{n}") for n in
            ("common", "control", "runner", "chatter", "components.top", "components.train", "components.eval",
             "components.export")}
    from llamafactory.extras.constants import PEFT_METHODS, STAGES_USE_PAIR_DATA, TRAINING_STAGES
    from llamafactory.extras.misc import is_accelerator_available

    root = project.root
    runs_dir = project.runs
    config_dir = mods["common"].DEFAULT_CONFIG_DIR
    accelerator = is_accelerator_available()
    eval_names: set[str] = set()
    stock = {"load_args": mods["common"].load_args, "save_cmd": mods["common"].save_cmd,
             "get_model_info": mods["control"].get_model_info, "list_config_paths": mods["control"].list_config_paths,
             "parse_eval": mods["runner"].Runner._parse_eval_args, "clean": mods["common"]._clean_cmd}

    def get_save_dir(*paths: str) -> str:
        """Output dir NAME -> runs/NAME/adapter (training) or runs/NAME (evaluation); a path stays a path."""
        if os.path.sep in paths[-1]:
            return paths[-1]
        if len(paths) < 3:
            return str(runs_dir)
        name = paths[-1].replace(" ", "").strip()
        return str(runs_dir / name) if name in eval_names else str(runs_dir / name / "adapter")

    def parse_eval_args(self, data):
        eval_names.add(str(data[self.manager.get_elem_by_id("eval.output_dir")]).replace(" ", "").strip())
        return stock["parse_eval"](self, data)

    def save_cmd(args: dict) -> str:
        path = stock["save_cmd"](args)
        out = Path(args["output_dir"]).resolve()
        if out.name == "adapter" and out.parent.parent == runs_dir.resolve():  # what `run sft` writes too
            atomic_write_text(out.parent / ARGS_FILE, dump_yaml(stock["clean"](args)))
        return path

    def load_args(path: str):
        rel = Path(os.path.relpath(path, config_dir))
        if rel.parts[:1] == (RECIPE_CONFIGS,) and not Path(path).exists():
            try:
                return recipe_config(root / rel, project, accelerator=accelerator, now=time.strftime("%Y%m%d-%H%M%S"))
            except UserError as e:
                return {"train.output_box": f"error: {e}"}
        return stock["load_args"](path)

    def list_config_paths(current_time: str):
        choices = stock["list_config_paths"](current_time).choices
        recipes = sorted(project.recipes.glob("*.yaml"))
        return gr.Dropdown(choices=[c for c, _ in choices] + [f"{RECIPE_CONFIGS}/{p.name}" for p in recipes])

    def get_model_info(model_name: str):
        if model_name == "Custom":  # keep the path and template typed or loaded (stock clears them)
            return gr.update(), gr.update()
        return stock["get_model_info"](model_name)

    def list_checkpoints(model_name: str, finetuning_type: str):
        multi = finetuning_type in PEFT_METHODS
        with_adapter = [t.dir.name for t in runs.trained_runs(runs_dir) if t.adapter]
        return gr.Dropdown(value=[] if multi else None, choices=sorted(with_adapter), multiselect=multi)

    def list_output_dirs(model_name, finetuning_type, current_time: str):
        names = sorted(d.name for d in runs_dir.iterdir()
                       if (d / "adapter").is_dir() and get_last_checkpoint(str(d / "adapter"))) \
            if runs_dir.is_dir() else []
        return gr.Dropdown(choices=[f"train_{current_time}"] + names)

    def list_train_datasets(dataset_dir=None, training_stage=list(TRAINING_STAGES)[0]):
        ranking = TRAINING_STAGES[training_stage] in STAGES_USE_PAIR_DATA
        return gr.Dropdown(choices=available_datasets(dataset_dir or root, ranking=ranking))

    def list_eval_datasets(dataset_dir=None):
        return gr.Dropdown(choices=available_datasets(dataset_dir or root, for_training=False))

    new = {"get_save_dir": get_save_dir, "save_cmd": save_cmd, "load_args": load_args, "get_model_info": get_model_info,
           "list_checkpoints": list_checkpoints, "list_output_dirs": list_output_dirs,
           "list_config_paths": list_config_paths, "Runner._parse_eval_args": parse_eval_args}
    for name, (home, sites) in REPLACED.items():
        for site in sorted(sites, key=lambda m: m == home):  # its home last: the others are compared with it
            fn = new.get(name)
            if name == "list_datasets":
                fn = list_eval_datasets if site == "components.eval" else list_train_datasets
            patches.replace(mods[site], name, fn, defined_in=mods[home])


def set_default_dataset_dir(dataset_dir: Path) -> None:
    """Make `dataset_dir` the WebUI's default dataset folder (Train and Evaluate tabs)."""
    import importlib

    for name in DATA_DIR_MODULES:
        mod = importlib.import_module(name)
        if not hasattr(mod, "DEFAULT_DATA_DIR"):
            raise RuntimeError(f"{name}.DEFAULT_DATA_DIR is gone: this LLaMA-Factory is not the pinned 0.9.5")
        mod.DEFAULT_DATA_DIR = str(dataset_dir)
    for name, mod in list(sys.modules.items()):  # any other module that copied the name
        if name.startswith("llamafactory.webui") and hasattr(mod, "DEFAULT_DATA_DIR"):
            mod.DEFAULT_DATA_DIR = str(dataset_dir)

