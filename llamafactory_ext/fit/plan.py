"""`plan`: will this recipe fit, how fast will it train, how long will it take? Before launching it.

    llamafactory-ext plan sft_recipes/mistral_15k.yaml --gpu a40
    llamafactory-ext plan --model tiny --data mine                 # the run `make sft MODEL=tiny DATA=mine` trains
    llamafactory-ext plan sft_recipes/mistral_15k.yaml deepspeed=null per_device_train_batch_size=2   # = run sft's
    llamafactory-ext plan sft_recipes/gemma_15k.yaml --gpu-mem 45 --batch 1 --cutoff 9216 --json
    llamafactory-ext plan sft_recipes/gemma_15k.yaml --gpu a40 --liger
    llamafactory-ext plan --table                         # Markdown: model x cutoff x batch (seed settings)

    llamafactory-ext plan sft_recipes/mistral_15k.yaml --gpu h200 --tokens 245000000      # + the time
    llamafactory-ext plan --model mistral --data 15k --predict --gpu h200 --json            # make predict's batch

The memory model is fit/memory.py (which terms are derived, which fitted), the speed model fit/speed.py, the cards
gpus.py; `plan --calibrate runs/*/` (fit/calibrate.py) compares both with what runs recorded. Exit status: 0 fits
(or no card to judge against), 1 does not fit, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from llamafactory_ext import UserError, gpus, units
from llamafactory_ext.fit.memory import (
    Arch,
    Estimate,
    GiB,
    Setup,
    builtin_archs,
    estimate,
    max_batch,
    max_cutoff,
    param_counts,
    per_token,
    resolve_arch,
    setup_from_recipe,
)

# a card's marketed size -> what it exposes, where the two differ materially (cards: gpus.py)
NOMINAL_GIB = {48: gpus.CARDS["a40"].memory_gib}


# ----------------------------------------------------------------------------- output
def to_json(e: Estimate, recipe: str | None = None) -> dict:
    s = e.setup
    out = {
        "recipe": recipe, "model": e.arch.name, "peak_gib": round(e.peak_gib, 3),
        "gpu_mem_gib": e.gpu_mem, "fits": e.fits, "needed_gib": round(e.needed / GiB, 3), "headroom": s.headroom,
        "allocated_gib": round(e.allocated / GiB, 3), "reserved_gib": round(e.reserved / GiB, 3),
        "nvidia_smi_gib": round(e.peak_gib, 3), "peak_phase": e.phase, "tokens_per_device_step": s.tokens,
        "breakdown": {k: round(b / GiB, 3) for k, _, b in e.items},
        "breakdown_labels": {k: label for k, label, _ in e.items},
        "per_token_bytes": per_token(e.arch, s),
        "params": param_counts(e.arch, s),
        "arch": asdict(e.arch),
        "settings": {k: v for k, v in asdict(s).items() if k != "notes"},
        "notes": e.notes,
    }
    if e.gpu_mem is not None:
        out["recommend"] = {
            "max_batch_at_cutoff": max_batch(e.arch, s, e.gpu_mem),
            "max_cutoff_at_batch": max_cutoff(e.arch, s, e.gpu_mem),
            "max_cutoff_at_batch_1": max_cutoff(e.arch, s, e.gpu_mem, 1),
        }
    return out


def render(e: Estimate, recipe: str | None = None) -> str:
    s, a = e.setup, e.arch
    quant = {4: "QLoRA 4-bit NF4" + (" + double quant" if s.double_quant else ""), 8: "QLoRA 8-bit",
             None: "LoRA on bf16"}[s.quant_bit]
    lines = [
        f"Plan{' for ' + recipe if recipe else ''}: {a.name} ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab})",
        f"  {quant}, LoRA r={s.lora_rank} on {len(s.lora_targets)} projections (dropout {s.lora_dropout:g}), "
        f"attention {s.attention}, {'Liger fused CE' if s.liger else 'HF cross entropy'}"
        + (f", DeepSpeed ZeRO-{s.ds_stage} on {s.gpus} GPU(s)" if s.ds_stage else ""),
        f"  cutoff_len {s.cutoff} x per-device batch {s.batch} = {s.tokens:,} tokens per micro-step, "
        f"gradient checkpointing {'on' if s.grad_ckpt else 'OFF'}",
        "",
    ]
    width = max(len(label) for _, label, _ in e.items) + 2
    for _, label, b in e.items:
        lines.append(f"  {label:<{width}} {b / GiB:7.2f} GiB")
    lines.append("  " + "-" * (width + 12))
    verdict = ""
    if e.gpu_mem is not None:
        pct = 100 * e.needed / GiB / e.gpu_mem
        verdict = f"   vs {e.gpu_mem:.1f} GiB: {'fits' if e.fits else 'DOES NOT FIT'} ({pct:.0f}%"
        verdict += f" with {100 * s.headroom:.0f} % headroom)" if s.headroom else ")"
        if e.fits and pct > 95:
            verdict += ", tight: fragmentation over a long run can tip it over"
    lines.append(f"  {'peak (nvidia-smi)':<{width}} {e.peak_gib:7.2f} GiB{verdict}")
    lines.append(f"  {'torch.cuda.max_memory_reserved':<{width}} {e.reserved / GiB:7.2f} GiB")
    lines.append(f"  {'torch.cuda.max_memory_allocated':<{width}} {e.allocated / GiB:7.2f} GiB (peak in the {e.phase})")
    if e.gpu_mem is not None:
        mb = max_batch(a, s, e.gpu_mem)
        mc, mc1 = max_cutoff(a, s, e.gpu_mem), max_cutoff(a, s, e.gpu_mem, 1)
        lines += ["", f"Recommended on {e.gpu_mem:.1f} GiB:",
                  f"  per_device_train_batch_size: {mb} at cutoff_len {s.cutoff}" if mb else
                  f"  not even batch 1 fits at cutoff_len {s.cutoff}",
                  f"  cutoff_len up to {mc:,} at batch {s.batch}" + (f"; up to {mc1:,} at batch 1" if s.batch > 1 else "")]
        if not e.fits and not s.liger:
            lig = estimate(a, replace(s, liger=True), e.gpu_mem)
            lines.append(f"  enable_liger_kernel: true would need {lig.peak_gib:.1f} GiB "
                         f"({'fits' if lig.fits else 'still too much'})")
    for n in e.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


SEED_RECIPE = {  # the seed's settings (issue 4), for --table without a recipe
    "finetuning_type": "lora", "quantization_bit": 4, "double_quantization": True, "lora_rank": 64,
    "lora_alpha": 16, "lora_dropout": 0.1, "lora_target": "all", "cutoff_len": 12288,
    "per_device_train_batch_size": 1, "bf16": True, "flash_attn": "fa2", "optim": "paged_adamw_32bit",
    "deepspeed": {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "contiguous_gradients": True,
                                        "overlap_comm": False}},
}


def table(recipe: dict | None = None, gpu_mem: float = gpus.CARDS["a40"].memory_gib,
          cutoffs=(4096, 8192, 12288, 16384), batches=(1, 2, 3)) -> str:
    """Markdown table: predicted peak GiB per built-in model x cutoff x batch, stock loss and Liger."""
    recipe = recipe or SEED_RECIPE
    head = ["model", "cutoff"] + [f"b={b}" for b in batches] + [f"b={b} Liger" for b in batches]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arch in builtin_archs(hub_only=True).items():
        for c in cutoffs:
            cells = [name.split("/")[1], f"{c:,}"]
            for liger in (False, True):
                for b in batches:
                    s = setup_from_recipe(recipe, None, cutoff=c, batch=b, liger=liger)
                    e = estimate(arch, s, gpu_mem)
                    cells.append(f"{e.peak_gib:.1f}" + ("" if e.fits else " ✗"))
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + (f"\n\nPeak GiB (nvidia-smi) per GPU; ✗ = over {gpu_mem:.1f} GiB (a 48 GB A40). "
                              "QLoRA 4-bit DQ, r=64 all projections, dropout 0.1, FA2, gradient checkpointing, "
                              "paged AdamW, DeepSpeed ZeRO-2 on 1 GPU.")


# ----------------------------------------------------------------------------- CLI
EXTRA_ARGS = "overrides"  # cli.py appends stray `key=value` arguments here


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llamafactory_ext.train import resolve

    p.add_argument("recipe", nargs="?", help="LLaMA-Factory training YAML (sft_recipes/*.yaml); default: the recipe "
                                             "of --model x --data, as `run sft` resolves it")
    resolve.add_run_arguments(p)
    p.add_argument("--gpu-mem", type=float, help="usable GPU memory in GiB (nvidia-smi memory.total MiB / 1024)")
    p.add_argument("--gpu", choices=sorted(gpus.CARDS), help="a card (gpus.py): its memory, and its speed for the time")
    p.add_argument("--batch", type=int, help="override per_device_train_batch_size")
    p.add_argument("--cutoff", help="override cutoff_len (8192 or 8k, as CUTOFF= takes it)")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (splits ZeRO optimizer states)")
    p.add_argument("--liger", action="store_true", help="as if enable_liger_kernel: true")
    p.add_argument("--fixed-length", action="store_true",
                   help="every sequence exactly cutoff_len tokens, as gpu-check measures (no padding mask, no headroom)")
    p.add_argument("--tokens", default=None, metavar="N",
                   help="training tokens, for the time (default: the data's, from its manifest, x num_train_epochs)")
    p.add_argument("--predict", action="store_true",
                   help="plan `make predict` instead: the batch that fits the card, KV cache bytes, the time")
    p.add_argument("--papers", type=int, default=None, help="with --predict: how many papers (default: the test split's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--speed-check", action="store_true",
                   help="the speed model against its H200 measurements and the seed's A40 figure")
    p.add_argument("--table", action="store_true",
                   help="Markdown table for the built-in models x cutoff (4K-16K) x batch (1-3)")
    p.add_argument("--calibrate", nargs="*", metavar="RUN_DIR",
                   help="predicted vs recorded memory and speed of finished runs (peak_memory.json, speed.json), "
                        "e.g. runs/*/ (no folder: every run of the project)")
    p.add_argument("overrides", nargs="*", help="key=value LLaMA-Factory arguments, as `run sft` takes them")


def _card(args) -> gpus.Card | None:
    if args.gpu:
        return gpus.CARDS[args.gpu]
    if args.gpu_mem is None:
        try:
            import torch

            if torch.cuda.is_available():
                return gpus.by_device_name(torch.cuda.get_device_name(0))
        except ImportError:
            pass
    return None


def _gpu_mem(args) -> float | None:
    if args.gpu:
        return gpus.CARDS[args.gpu].memory_gib
    if args.gpu_mem is not None:
        if args.gpu_mem <= 0:
            raise UserError(f"--gpu-mem {args.gpu_mem}: give the GPU's memory in GiB, e.g. 45 for an A40")
        # "48" is how the seed's A40 is sold, not what it has: with ECC on (the default) a 48 GB
        # A40/L40S exposes 46068 MiB = 45.0 GiB, so that is what `fits` is judged against.
        return NOMINAL_GIB.get(args.gpu_mem, args.gpu_mem)
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.get_device_properties(i).total_memory
                       for i in range(torch.cuda.device_count())) / GiB
    except ImportError:
        pass
    return None


def known_keys() -> set[str]:
    """Every argument LLaMA-Factory's training parser accepts (its dataclasses' fields)."""
    import dataclasses

    from llamafactory.hparams import parser as lf_parser

    return {f.name for cls in lf_parser._TRAIN_ARGS for f in dataclasses.fields(cls)}


def planned_args(args: argparse.Namespace) -> tuple[dict, str, Path | None, object]:
    """(training arguments, what they are, the recipe file, the Run or None) for `plan`: RECIPE + key=value, else
    the run of --model x --data resolved as `run sft` resolves it (train/resolve.py), with the same overrides."""
    from llamafactory_ext.fileio import load_yaml
    from llamafactory_ext.train import resolve

    overrides = resolve.parse_overrides(args.overrides, "plan")
    if overrides:
        unknown = sorted(set(overrides) - known_keys())
        if unknown:
            raise UserError(f"{', '.join(unknown)}: not a LLaMA-Factory argument (see `llamafactory-cli train -h`)")
    if args.recipe:
        recipe = load_yaml(args.recipe, "recipe")
        if args.model_path:
            recipe["model_name_or_path"] = args.model_path
        return {**recipe, **overrides}, args.recipe, Path(args.recipe), None
    r = resolve.from_args(args, overrides=overrides)
    return dict(r.args), f"{r.family.name} x {r.data} ({r.project.rel(r.recipe)})", r.recipe, r


def training_time(args: argparse.Namespace, recipe: dict, arch: Arch, s: Setup, card: gpus.Card | None,
                  run) -> dict:
    """tokens/s, and hours for --tokens (or the data's tokens from its manifest x num_train_epochs)."""
    from llamafactory_ext.fit import speed

    if card is None or not card.bf16_tflops:
        return {"train_tokens_per_s": None, "train_hours": None,
                "time_note": "no card to time against: pass --gpu NAME (gpus.py)" if card is None else
                             f"{card.name} has no BF16: the recipes need a card that has it"}
    out = speed.train_speed(arch, s.batch, s.cutoff, card, s.gpus)
    epochs = float(recipe.get("num_train_epochs", 3.0))
    tokens, source = None, None
    if args.tokens:
        tokens, source = units.count(args.tokens, "--tokens", unit="records"), "--tokens"
    elif run is not None and run.manifest is not None and run.manifest.tokens:
        tokens = int(run.manifest.tokens * epochs)
        source = f"{run.manifest.dataset}: {run.manifest.tokens:,} tokens x {epochs:g} epochs"
    out["train_tokens"] = tokens
    out["train_hours"] = round(tokens / out["train_tokens_per_s"] / 3600, 2) if tokens else None
    out["time_note"] = (f"{source} at {out['train_tokens_per_s']:,.0f} tokens/s" if tokens else
                        "no token count: --tokens N, or plan a run whose data `make data` built (its manifest)")
    return out


def predict_plan(args: argparse.Namespace, recipe: dict, arch: Arch, card: gpus.Card | None, gpu_mem: float | None,
                 run) -> dict:
    """What `make predict` would do on this card: the batch from memory, KV cache bytes, the expected time."""
    from llamafactory_ext import families
    from llamafactory_ext.fit import speed

    fam = run.family if run is not None else families.of_template(str(recipe.get("template", "")))
    prompt = (fam.paper_budget if fam else 7 * 1024) + 128  # the paper + the instruction and template
    new = fam.max_new_tokens if fam else 1024
    mem = gpu_mem if gpu_mem is not None else (card.memory_gib if card else None)
    if mem is None:
        raise UserError("--predict needs the card: --gpu NAME (gpus.py) or --gpu-mem GiB")
    batch, why = speed.predict_batch(arch, prompt, new, mem)
    papers = args.papers
    if papers is None and run is not None and run.test_dataset:
        from llamafactory_ext.data import manifest
        from llamafactory_ext.data.register import dataset_file

        doc = manifest.read(dataset_file(run.test_dataset, run.info, run.dataset_dir))
        papers = doc.records if doc else None
    seconds = speed.predict_seconds(arch, papers, batch, prompt, new, card) if papers and batch else None
    return {"predict_batch": batch, "kv_bytes_per_token": speed.kv_bytes_per_token(arch), "prompt_tokens": prompt,
            "max_new_tokens": new, "papers": papers, "predict_hours": round(seconds / 3600, 2) if seconds else None,
            "predict_hours_at_batch_1": round(speed.predict_seconds(arch, papers, 1, prompt, new, card) / 3600, 2)
            if papers else None, **why}


def run(args: argparse.Namespace) -> int:
    """Exit 0: fits (or no GPU size to judge against); 1: does not fit; 2: usage error (UserError)."""
    if args.calibrate is not None:
        from llamafactory_ext.fit import calibrate

        if not args.calibrate:
            from llamafactory_ext import project

            args.calibrate = [str(project.get().runs)]
        return calibrate.calibrate(args.calibrate, args.json)
    gpu_mem = _gpu_mem(args)
    card = _card(args)
    if args.speed_check:
        from llamafactory_ext.fit import speed

        print(speed.speed_check())
        return 0
    if args.table:
        from llamafactory_ext.fileio import load_yaml

        recipe = load_yaml(args.recipe, "recipe") if args.recipe else None
        print(table(recipe, gpu_mem or gpus.CARDS["a40"].memory_gib))
        return 0
    if args.cutoff is not None:
        args.cutoff = units.count(args.cutoff, "--cutoff")
    for flag, v in (("--batch", args.batch), ("--gpus", args.gpus)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be at least 1")
    recipe, what, path, resolved = planned_args(args)
    model = recipe.get("model_name_or_path")
    if not model:
        raise UserError(f"{what} has no model_name_or_path; pass --model-path or model_name_or_path=...")
    from llamafactory_ext import project

    base = Path(args.recipe).resolve().parent.parent if args.recipe else project.get().root
    arch = resolve_arch(str(model), base)
    if args.predict:
        out = {"recipe": what, "model": arch.name, "card": card.name if card else None,
               **predict_plan(args, recipe, arch, card, gpu_mem, resolved)}
        if args.json:
            print(json.dumps(out, indent=1))
        else:
            print(render_predict(out))
        return 0 if out["predict_batch"] else 1
    s = setup_from_recipe(recipe, path, batch=args.batch, cutoff=args.cutoff, gpus=args.gpus,
                          liger=True if args.liger else None, padded=False if args.fixed_length else None)
    e = estimate(arch, s, gpu_mem)
    if args.gpu is None and args.gpu_mem in NOMINAL_GIB:
        e.notes.append(f"--gpu-mem {args.gpu_mem:g}: judged as a '48 GB' A40/L40S, which exposes 46068 MiB = "
                       f"{NOMINAL_GIB[args.gpu_mem]:.1f} GiB in nvidia-smi (ECC on); an RTX A6000 has 48.0: --gpu a6000")
    elif args.gpu is None and args.gpu_mem in (16, 24, 32, 40, 80, 96, 141):
        e.notes.append(f"--gpu-mem {args.gpu_mem:g} is a marketing size? Cards expose a little less in nvidia-smi "
                       "(memory.total MiB / 1024); pass that, or --gpu NAME")
    timing = training_time(args, recipe, arch, s, card, resolved)
    if args.json:
        print(json.dumps({**to_json(e, what), **timing}, indent=1))
    else:
        print(render(e, what))
        if timing["train_tokens_per_s"]:
            print(f"\nOn {card.name} x {s.gpus}: ~{timing['train_tokens_per_s']:,.0f} tokens/s, {timing['step_s']} s per "
                  f"micro-step, MFU ~{timing['mfu']:.0%} (fit/speed.py)"
                  + (f"; {timing['train_hours']:,.1f} h for {timing['train_tokens']:,} tokens" if timing["train_hours"] else "")
                  + f"\n  ({timing['time_note']})")
        if gpu_mem is None:
            print("\n(no GPU here: pass --gpu NAME or --gpu-mem GiB for a verdict, recommendations and a time)")
    return 1 if e.fits is False else 0


def render_predict(out: dict) -> str:
    lines = [f"Predict plan for {out['recipe']}: {out['model']} on {out['card'] or 'the given memory'}",
             f"  KV cache {out['kv_bytes_per_token']:,} B per token (2 x layers x kv heads x head dim x 2 B); a paper is "
             f"~{out['prompt_tokens']:,} prompt + {out['max_new_tokens']:,} new tokens = {out['per_sequence_gib']} GiB "
             f"with its prefill",
             f"  bf16 weights {out['weights_gib']} GiB; {out['usable_gib']} GiB usable",
             f"  batch: {out['predict_batch']} papers at once" + ("" if out["predict_batch"] else " (does not fit)")]
    if out["predict_hours"] is not None:
        lines.append(f"  {out['papers']:,} papers: ~{out['predict_hours']} h (one at a time: ~{out['predict_hours_at_batch_1']} h)")
    return "\n".join(lines)
