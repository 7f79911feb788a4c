"""`run merge` (`make merge`): merge a run's LoRA adapter into its base with `llamafactory-cli export`.

    llamafactory-ext run merge --model mistral --data 15k

The adapter is merged into the ORIGINAL, unquantized base model (a 4-bit base cannot take a merged adapter:
LLaMA-Factory raises "Cannot merge adapters to a quantized model"), and the training-time RoPE scaling is baked
into the merged config.json. The model is exported into `runs/<run>/merged.tmp/` and renamed to `merged/`, so
an interrupted merge never leaves half a model; `runs/<run>/merge_args.yaml` is what ran.
"""

from __future__ import annotations

import argparse
import shutil

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write_text, dump_yaml, swap_folder
from llamafactory_ext.train import launcher, resolve, sft

EXTRA_ARGS = "overrides"


def merge_args(r: resolve.Run) -> dict:
    trained = r.trained_args
    args = {
        "model_name_or_path": trained["model_name_or_path"],
        "adapter_name_or_path": r.project.rel(r.adapter),
        "template": r.template,
        "finetuning_type": "lora",
        "export_dir": r.project.rel(r.merged),
        "export_size": 5,
        "export_device": "cpu",
        "infer_dtype": "bfloat16" if trained.get("bf16") else "auto",
    }
    if trained.get("rope_scaling"):  # bake the training-time RoPE scaling into the merged config.json
        args["rope_scaling"] = trained["rope_scaling"]
        args["cutoff_len"] = trained.get("cutoff_len", 2048)
    return args


def add_arguments(p: argparse.ArgumentParser) -> None:
    resolve.add_run_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="print the export arguments; load nothing")
    sft.add_log_argument(p)
    p.add_argument("overrides", nargs="*", help="key=value LLaMA-Factory export arguments")


def run(ns: argparse.Namespace) -> int:
    r = resolve.from_args(ns)
    resolve.ensure_inputs(r, {"model_name_or_path": r.base_model}, dry_run=ns.dry_run)
    if not (r.adapter / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in {r.project.rel(r.adapter)}; run "
                        f"`make sft MODEL={r.family.name} DATA={r.data}` first")
    args = {**merge_args(r), **resolve.parse_overrides(ns.overrides, "run merge")}
    if ns.dry_run:
        print(dump_yaml(args))
        return 0
    final = r.dir / "merge_args.yaml"
    tmp = r.merged.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(final, dump_yaml({**args, "export_dir": r.project.rel(tmp)}))
    env = launcher.environment(offline=r.own_model, quiet=ns.log is not None)
    rc = launcher.launch(["llamafactory-cli", "export", r.project.rel(final)], env, r.project.root, log=ns.log,
                         label="merge")
    if rc == 0:
        swap_folder(tmp, r.merged)  # the previous model stays whole until the new one is in place
        atomic_write_text(final, dump_yaml(args))
        if ns.log is None:
            print(f"merged model: {r.project.rel(r.merged)}")
    return rc
