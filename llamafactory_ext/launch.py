"""Resolve MODEL x DATA to a recipe and launch LLaMA-Factory's own train / export / predict.

    llamafactory-ext run sft --model mistral --data 15k [--rope linear] [--resume auto] [--nproc 8]
    llamafactory-ext run sft --model mistral --data 15k --dry-run     # print + validate, load nothing
    llamafactory-ext run merge --model mistral --data 15k
    llamafactory-ext run predict --model mistral --data 15k --temps "0.35 0.5"

(`make sft|merge|predict MODEL=.. DATA=..` call these.) Everything for one MODEL x DATA lives in
`runs/<model>_<data>/`: `sft_args.yaml` (the final arguments, exactly what LLaMA-Factory got),
`adapter/` (LoRA adapter, checkpoints, loss plot), `merged/`, `predict/temp_<T>/`.
Extra `key=value` arguments override recipe keys (LLaMA-Factory's own names, e.g. `cutoff_len=8192`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write_text

EXTRA_ARGS = "overrides"  # cli.py appends stray `key=value` arguments here
RECIPES = Path("sft_recipes")
RUNS = Path("runs")
ROPE_TYPES = ("linear", "dynamic")
# family of each MODEL name -> the LLaMA-Factory template it must use
TEMPLATES = {"mistral": "mistral", "gemma": "gemma", "tiny": "mistral", "tiny_gemma": "gemma"}
# test split registered for each MODEL x DATA (predict); inference-truncated papers
TEST_DATASETS = {"sample": "sample_test"}
LAUNCH_ENV = ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
              "RDZV_ID", "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS")
PREDICT_CUTOFF = 1_000_000
PREDICT_DEFAULTS = {  # max_new_tokens: a full review on real models, a few words on the tiny ones
    "tiny": {"max_new_tokens": 48}, "tiny_gemma": {"max_new_tokens": 48},
}


def recipes() -> dict[tuple[str, str], Path]:
    """(model, data) -> recipe, from the files `sft_recipes/<model>_<data>.yaml`."""
    out = {}
    for p in sorted(RECIPES.glob("*.yaml")):
        # the longest MODEL name that prefixes the file name (tiny_gemma before tiny); the rest is DATA
        model = next((m for m in sorted(TEMPLATES, key=len, reverse=True) if p.stem.startswith(m + "_")), None)
        if model:
            out[(model, p.stem[len(model) + 1:])] = p
    return out


def resolve_recipe(model: str, data: str) -> Path:
    if not RECIPES.is_dir():
        raise UserError(f"no {RECIPES}/ in {Path.cwd()}: run from the project root (where the Makefile is)")
    table = recipes()
    if (model, data) in table:
        return table[(model, data)]
    models = sorted({m for m, _ in table})
    datas = sorted({d for _, d in table})
    if model not in models:
        raise UserError(f"unknown MODEL={model!r}; valid values: {', '.join(models)}")
    if data not in datas:
        raise UserError(f"unknown DATA={data!r}; valid values: {', '.join(datas)}")
    combos = ", ".join(f"MODEL={m} DATA={d}" for m, d in table)
    raise UserError(f"no recipe sft_recipes/{model}_{data}.yaml; available: {combos}")


def positive_int(name: str, value, example: str = "8192 or 8k") -> int:
    """`8192` or `8k` -> 8192; anything else is a clear error."""
    text = str(value).strip().lower()
    try:
        n = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{name}={value!r}: expected a positive whole number (e.g. {example})")
    return n


def parse_temps(text: str) -> list[float]:
    temps = []
    for item in re.split(r"[ ,]+", text.strip()):
        if not item:
            continue
        try:
            t = float(item)
        except ValueError:
            t = -1.0
        if not 0 <= t <= 5:
            raise UserError(f"TEMPS/TEMP: {item!r} is not a temperature (e.g. TEMPS=\"0.35 0.5\")")
        temps.append(t)
    if not temps:
        raise UserError("TEMPS is empty (e.g. TEMPS=\"0.35 0.5\")")
    return temps


def run_dir(model: str, data: str) -> Path:
    return RUNS / f"{model}_{data}"


def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (example: cutoff_len=8192)")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v != "" else None
    return out


def checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders, oldest first."""
    found = []
    for p in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def last_checkpoint(output_dir: Path) -> Path | None:
    """The newest COMPLETE checkpoint. The Trainer writes trainer_state.json last, so a process killed
    while saving leaves a newer folder without it; LLaMA-Factory's auto-resume would pick that one
    and crash, we skip it."""
    for p in reversed(checkpoints(output_dir)):
        try:
            json.loads((p / "trainer_state.json").read_text(encoding="utf-8"))
            return p
        except (OSError, ValueError):
            continue
    return None


def sft_args(ns: argparse.Namespace) -> tuple[dict, Path]:
    """The final LLaMA-Factory arguments for `make sft`, and the run folder."""
    recipe = resolve_recipe(ns.model, ns.data)
    args = load_yaml(recipe)
    rdir = run_dir(ns.model, ns.data)
    args["output_dir"] = str(rdir / "adapter")
    if ns.model_path:
        args["model_name_or_path"] = ns.model_path
    if ns.rope:
        if ns.rope not in ROPE_TYPES:
            raise UserError(f"unknown ROPE={ns.rope!r}; valid values: {', '.join(ROPE_TYPES)}")
        args["rope_scaling"] = ns.rope
    if ns.cutoff:
        args["cutoff_len"] = positive_int("CUTOFF", ns.cutoff)
    if ns.node_rank not in (None, "") and not str(ns.node_rank).isdigit():
        raise UserError(f"NODE_RANK={ns.node_rank!r}: expected 0, 1, ... (this node's index)")
    args.update(parse_overrides(ns.overrides))

    out = Path(args["output_dir"])
    resume = ns.resume or "auto"
    if resume == "auto":  # continue from the newest complete checkpoint-N in output_dir, if any
        args["overwrite_output_dir"] = False
        args.pop("resume_from_checkpoint", None)
        ckpt = last_checkpoint(out) if out.is_dir() else None
        if ckpt is None and (out / "adapter_model.safetensors").exists():
            raise UserError(f"{out} holds a finished run and no checkpoint to resume from; "
                            "RESUME=never starts over (the old run is moved aside, not deleted)")
        if ckpt is not None:
            args["resume_from_checkpoint"] = str(ckpt)
            step = int(ckpt.name.split("-")[1])
            broken = [p.name for p in checkpoints(out) if int(p.name.split("-")[1]) > step]
            if broken:
                print(f"warning: skipping incomplete checkpoint(s) {', '.join(broken)} (no readable "
                      "trainer_state.json: "
                      f"the run was killed while saving); resuming from {ckpt.name}", file=sys.stderr)
    elif resume in ("never", "fresh", "no"):
        args["overwrite_output_dir"] = False
    else:
        ckpt = Path(resume)
        if not (ckpt / "trainer_state.json").is_file():
            found = last_checkpoint(out)
            hint = f" (the last one in {out} is {found})" if found else ""
            raise UserError(f"RESUME={resume}: not a checkpoint folder with trainer_state.json{hint}")
        args["resume_from_checkpoint"] = str(ckpt)
        args["overwrite_output_dir"] = False
    return args, rdir


def _env(ns: argparse.Namespace, args: dict) -> dict[str, str]:
    # LLaMA-Factory's launcher does int(os.getenv("NNODES", "1")): an exported-but-empty variable crashes it
    env = {k: v for k, v in os.environ.items() if v != "" or k not in LAUNCH_ENV}
    bindir = str(Path(sys.executable).parent)  # torchrun and llamafactory-cli of this venv
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    nproc = ns.nproc or os.environ.get("NPROC_PER_NODE") or None
    nproc = positive_int("NPROC", nproc, example="8") if nproc else None
    nnodes = positive_int("NNODES", ns.nnodes, example="2") if ns.nnodes else 1
    distributed = bool(args.get("deepspeed")) or (nproc or 1) > 1 or nnodes > 1
    if distributed:
        env["FORCE_TORCHRUN"] = "1"
        if not nproc:
            import torch

            nproc = max(torch.cuda.device_count(), 1)  # LLaMA-Factory's default is 0 on a CPU machine
        env["NPROC_PER_NODE"] = str(nproc)
    for key, val in (("NNODES", ns.nnodes), ("NODE_RANK", ns.node_rank), ("MASTER_ADDR", ns.master_addr),
                     ("MASTER_PORT", ns.master_port)):
        if val not in (None, ""):
            env[key] = str(val)
    return env


def _launch(cmd: list[str], env: dict[str, str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def dump_yaml(args: dict) -> str:
    return yaml.safe_dump(args, sort_keys=False, allow_unicode=True)


def validate_sft_args(args: dict, dataset_info: Path = Path("dataset_info.json")) -> list[str]:
    """Checks LLaMA-Factory does not do before loading weights. Returns a list of problems."""
    problems = []
    info = json.loads(dataset_info.read_text(encoding="utf-8")) if dataset_info.exists() else {}
    for key in ("dataset", "eval_dataset"):
        for name in str(args.get(key) or "").split(","):
            name = name.strip()
            if name and name not in info:
                problems.append(f"{key}: {name!r} is not in {dataset_info}; register it with "
                                f"`llamafactory-ext register {name} FILE` (known: {', '.join(info)})")
    ds = args.get("deepspeed")
    if ds and isinstance(ds, str) and not Path(ds).is_file():
        problems.append(f"deepspeed: {ds} does not exist")
    return problems


def data_notes(args: dict, dataset_info: Path = Path("dataset_info.json")) -> list[str]:
    """Registered datasets whose file is not built yet (a warning for dry runs)."""
    info = json.loads(dataset_info.read_text(encoding="utf-8")) if dataset_info.exists() else {}
    notes = []
    for name in str(args.get("dataset") or "").split(","):
        entry = info.get(name.strip())
        if entry and "file_name" in entry and not (dataset_info.parent / entry["file_name"]).exists():
            notes.append(f"note: {name.strip()} -> {entry['file_name']} is not built yet; "
                         f"run `make data MODEL={args.get('template')} IN=/path/to/paper_review.jsonl` first")
    return notes


def cmd_sft(ns: argparse.Namespace) -> int:
    args, rdir = sft_args(ns)
    env = _env(ns, args)
    problems = validate_sft_args(args)
    final = rdir / "sft_args.yaml"
    if ns.dry_run:
        print(f"# resolved from {resolve_recipe(ns.model, ns.data)}; would be written to {final}")
        print(dump_yaml(args))
        launch = {k: env[k] for k in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                      "MASTER_PORT") if k in env}
        print(f"# launch: {' '.join(f'{k}={v}' for k, v in launch.items())} llamafactory-cli train {final}")
        problems += parse_check(args)
        for note in data_notes(args):
            print(note)
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print("dry run: " + ("arguments OK (no weights loaded)" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    if problems:
        raise UserError("; ".join(problems))
    out = Path(args["output_dir"])
    if (ns.resume in ("never", "fresh", "no")) and out.exists():
        aside = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        print(f"RESUME={ns.resume}: moved the previous run aside to {aside} (nothing deleted)")
    else:  # sft_args() already chose the checkpoint (auto) or checked the given one
        ck = args.get("resume_from_checkpoint")
        print(f"resuming from {ck}" if ck else f"starting a new run in {out}")
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(final, dump_yaml(args))
    return _launch(["llamafactory-cli", "train", str(final)], env)


PARSE_CHILD = """
import dataclasses, json, sys, typing
from llamafactory.hparams import get_train_args
for line in sys.stdin:
    a = json.loads(line)
    if a.get("bf16") or a.get("fp16"):
        a.setdefault("use_cpu", True)  # only for validation on a machine without a GPU
    if a.get("enable_liger_kernel"):
        try:
            import liger_kernel  # noqa: F401  (GPU extra)
        except ImportError:
            a["enable_liger_kernel"] = False  # LLaMA-Factory requires the package; validate the rest
    try:
        parsed = get_train_args(a)
        # HfArgumentParser.parse_dict does not enforce Literal choices (quantization_type: nf5 passes)
        for obj in parsed:
            hints = typing.get_type_hints(type(obj))
            for field in dataclasses.fields(obj):
                kind = hints.get(field.name)
                args = typing.get_args(kind)
                if typing.get_origin(kind) is typing.Union:
                    lits = [x for x in args if typing.get_origin(x) is typing.Literal]
                    kind, args = (lits[0], typing.get_args(lits[0])) if lits else (kind, ())
                value = getattr(obj, field.name)
                if typing.get_origin(kind) is typing.Literal and value is not None and value not in args:
                    raise ValueError(f"{field.name}: {value!r} is not one of {list(args)}")
        print("PARSED " + json.dumps({"model_max_length": parsed[0].model_max_length}), flush=True)
    except BaseException as e:
        msg = (str(e) or type(e).__name__).strip().splitlines()
        print("FAILED " + json.dumps(type(e).__name__ + ": " + (msg[-1] if msg else "")), flush=True)
"""


def parse_check_many(arg_dicts: list[dict]) -> list[list[str]]:
    """LLaMA-Factory's own argument parser (`get_train_args`, unknown keys are errors) on each dict,
    in one child process. Loads no weights. On a CPU machine it poses as rank 0 of 1 so DeepSpeed
    recipes parse, and sets `use_cpu` so bf16 recipes parse."""
    import socket

    import torch

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    stdin = "".join(json.dumps(a) + "\n" for a in arg_dicts)
    p = subprocess.run([sys.executable, "-c", PARSE_CHILD], input=stdin, text=True, capture_output=True, env=env)
    results = [ln for ln in p.stdout.splitlines() if ln.startswith(("PARSED ", "FAILED "))]
    out = []
    for i in range(len(arg_dicts)):
        if i >= len(results):
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            out.append([f"LLaMA-Factory's parser crashed: {tail}"])
        elif results[i].startswith("FAILED "):
            out.append([f"LLaMA-Factory rejected the arguments: {json.loads(results[i][7:])}"])
        else:
            out.append([])
    return out


def parse_check(args: dict) -> list[str]:
    return parse_check_many([args])[0]


def _trained_args(ns: argparse.Namespace) -> tuple[dict, Path]:
    """The arguments the last `make sft` of this MODEL x DATA used (falls back to the recipe)."""
    rdir = run_dir(ns.model, ns.data)
    saved = rdir / "sft_args.yaml"
    if saved.exists():
        args = load_yaml(saved)
    else:
        args = load_yaml(resolve_recipe(ns.model, ns.data))
    if ns.model_path:
        args["model_name_or_path"] = ns.model_path
    return args, rdir


def cmd_merge(ns: argparse.Namespace) -> int:
    trained, rdir = _trained_args(ns)
    adapter = Path(trained.get("output_dir", rdir / "adapter"))
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in {adapter}; run `make sft MODEL={ns.model} DATA={ns.data}` first")
    merged = rdir / "merged"
    args = {
        # Merge onto the ORIGINAL, unquantized base (a 4-bit base cannot take a merged adapter:
        # LLaMA-Factory raises "Cannot merge adapters to a quantized model").
        "model_name_or_path": trained["model_name_or_path"],
        "adapter_name_or_path": str(adapter),
        "template": trained["template"],
        "finetuning_type": "lora",
        "export_dir": str(merged),
        "export_size": 5,
        "export_device": "cpu",
        "infer_dtype": "bfloat16" if trained.get("bf16") else "auto",
    }
    if trained.get("rope_scaling"):  # bake the training-time RoPE scaling into the merged config.json
        args["rope_scaling"] = trained["rope_scaling"]
        args["cutoff_len"] = trained.get("cutoff_len", 2048)
    args.update(parse_overrides(ns.overrides))
    if ns.dry_run:
        print(dump_yaml(args))
        return 0
    rdir.mkdir(parents=True, exist_ok=True)
    final = rdir / "merge_args.yaml"
    tmp = merged.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args["export_dir"] = str(tmp)
    atomic_write_text(final, dump_yaml(args))
    rc = _launch(["llamafactory-cli", "export", str(final)], _env(ns, {}))
    if rc == 0:
        if merged.exists():
            shutil.rmtree(merged)
        tmp.rename(merged)
        args["export_dir"] = str(merged)
        atomic_write_text(final, dump_yaml(args))
        print(f"merged model: {merged}")
    return rc


def predict_dataset(ns: argparse.Namespace) -> str:
    if ns.dataset:
        return ns.dataset
    if ns.data in TEST_DATASETS:
        return TEST_DATASETS[ns.data]
    family = TEMPLATES.get(ns.model, ns.model)
    return f"paper_review_test_{family}"


def cmd_predict(ns: argparse.Namespace) -> int:
    trained, rdir = _trained_args(ns)
    merged = Path(ns.model_dir) if ns.model_dir else rdir / "merged"
    if not (merged / "config.json").is_file():
        raise UserError(f"no merged model in {merged}; run `make merge MODEL={ns.model} DATA={ns.data}` first")
    temps = parse_temps(ns.temps or str(ns.temp))
    dataset = predict_dataset(ns)
    problems = validate_sft_args({"eval_dataset": dataset})
    if problems:
        raise UserError("; ".join(problems))
    defaults = PREDICT_DEFAULTS.get(ns.model, {})
    outs = []
    for t in temps:
        out = rdir / "predict" / f"temp_{t:g}"
        args = {
            "stage": "sft",
            "do_predict": True,
            "predict_with_generate": True,
            "model_name_or_path": str(merged),
            "template": trained["template"],
            "eval_dataset": dataset,
            "dataset_dir": trained.get("dataset_dir", "."),
            # LLaMA-Factory counts the reference review in the predict budget and, when over, cuts the END
            # of the prompt (the `[/INST]` / `<start_of_turn>model` marker). Papers are already cut by
            # `truncate --inference`, so the budget here only has to never bite.
            "cutoff_len": PREDICT_CUTOFF,
            "do_sample": t > 0,
            "temperature": t if t > 0 else 1.0,
            "top_p": ns.top_p,
            "max_new_tokens": ns.max_new_tokens or defaults.get("max_new_tokens", 1024),
            "per_device_eval_batch_size": ns.batch_size,
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "report_to": "none",
            "seed": ns.seed,
            "bf16": bool(trained.get("bf16")),
        }
        if ns.max_samples:
            args["max_samples"] = ns.max_samples
        args.update(parse_overrides(ns.overrides))
        if ns.dry_run:
            print(dump_yaml(args))
            continue
        final = rdir / f"predict_args_temp_{t:g}.yaml"
        atomic_write_text(final, dump_yaml(args))
        if ns.backend == "vllm":
            from llamafactory_ext import vllm_predict

            vllm_predict.predict(str(merged), args["template"], dataset, out, temperature=t, top_p=ns.top_p,
                                 max_new_tokens=args["max_new_tokens"], seed=ns.seed,
                                 dataset_dir=args["dataset_dir"], max_samples=ns.max_samples, bf16=args["bf16"])
        else:
            rc = _launch(["llamafactory-cli", "train", str(final)], _env(ns, {}))
            if rc != 0:
                return rc
        outs.append(out)
    if outs and not ns.no_extract:
        return extract_all(ns, outs, dataset, rdir, trained.get("dataset_dir", "."))
    return 0


def extract_all(ns: argparse.Namespace, outs: list[Path], dataset: str, rdir: Path,
                dataset_dir: str = ".") -> int:
    """reviews.jsonl + per-paper Markdown + ONE metrics table over every temperature predicted so far
    (this call's and earlier ones': `TEMP=0.35` then `TEMP=0.5` gives two rows)."""
    from llamafactory_ext import extract

    info_path = Path(dataset_dir) / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8"))
    ids = Path(dataset_dir) / info[dataset]["file_name"]
    if not ids.is_file():
        raise UserError(f"{ids} (the test split {dataset!r}) is missing: papers could not be named; "
                        f"run `make data` again")
    runs = sorted({*outs, *(p.parent for p in (rdir / "predict").glob("temp_*/generated_predictions.jsonl"))},
                  key=lambda p: float(p.name.split("_", 1)[1]))
    argv = [str(o / "generated_predictions.jsonl") for o in runs] + ["--out", str(rdir / "predict"),
                                                                    "--ids", str(ids)]
    for o in runs:
        argv += ["--name", o.name]
    p = argparse.ArgumentParser()
    extract.add_arguments(p)
    return extract.run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("sft", "merge", "predict"))
    p.add_argument("--model", default=os.environ.get("MODEL") or "tiny", help="tiny | tiny_gemma | mistral | gemma")
    p.add_argument("--data", default=os.environ.get("DATA") or "sample", help="sample | 5k | 15k")
    p.add_argument("--model-path", default=os.environ.get("MODEL_PATH") or None,
                   help="local path replacing the recipe's model id")
    p.add_argument("--rope", default=os.environ.get("ROPE") or None, help="linear | dynamic")
    p.add_argument("--cutoff", default=os.environ.get("CUTOFF") or None, help="override cutoff_len")
    p.add_argument("--resume", default=os.environ.get("RESUME") or None,
                   help="auto (default: last checkpoint in the run folder) | never | path/to/checkpoint-N")
    p.add_argument("--nproc", default=os.environ.get("NPROC") or None, help="processes (GPUs) per node")
    p.add_argument("--nnodes", default=os.environ.get("NNODES") or None)
    p.add_argument("--node-rank", default=os.environ.get("NODE_RANK") or None)
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR") or None)
    p.add_argument("--master-port", default=os.environ.get("MASTER_PORT") or None)
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "").strip().lower() not in ("", "0", "false", "no", "off"),
                   help="print and validate the final arguments; load nothing")
    # predict
    p.add_argument("--temp", type=float, default=float(os.environ.get("TEMP") or 0.35))
    p.add_argument("--temps", default=os.environ.get("TEMPS") or None, help='sweep, e.g. "0.35 0.5"')
    p.add_argument("--top-p", type=float, default=float(os.environ.get("TOP_P") or 0.9))
    p.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("MAX_NEW_TOKENS") or 0) or None)
    p.add_argument("--max-samples", type=int, default=int(os.environ.get("MAX_SAMPLES") or 0) or None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset", default=os.environ.get("TEST_DATASET") or None, help="registered test split")
    p.add_argument("--model-dir", default=None, help="model to predict with (default: runs/<model>_<data>/merged)")
    p.add_argument("--backend", default=os.environ.get("BACKEND") or "huggingface", choices=("huggingface", "vllm"))
    p.add_argument("--no-extract", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value LLaMA-Factory arguments")


def run(ns: argparse.Namespace) -> int:
    return {"sft": cmd_sft, "merge": cmd_merge, "predict": cmd_predict}[ns.action](ns)
