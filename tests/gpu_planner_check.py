"""Check `llamafactory-ext plan` against a real measurement: a few QLoRA steps of a 7B architecture.

    python tests/gpu_planner_check.py --model mistral --lengths 4096,8192 --steps 3 --out build/gpu_check
    python tests/gpu_planner_check.py --cpu-smoke --out /tmp/smoke      # same code path, tiny, on CPU

Not a pytest module (no `test_` prefix): it needs a CUDA GPU with ~40 GiB free and ~10 minutes.

What it does, per model: builds the REAL architecture of the family table (llamafactory_ext/families.py) (MistralConfig /
GemmaConfig with Mistral-7B-Instruct-v0.2's / gemma-7b-it's sizes, real vocabulary) with random bf16
weights, on the GPU, and saves it (~15 GB) once under --work; nothing is downloaded. The tokenizer is
the tiny local one of `llamafactory_ext.tiny` (weights are random, so the text does not matter; its ids
all lie inside the real-size embedding). Then, per length, a fresh subprocess runs LLaMA-Factory's own
training path (`llamafactory.train.tuner.run_exp`) with the recipe's memory settings: 4-bit NF4 with
double quantization, LoRA r=64 on all projections with dropout 0.1, gradient checkpointing, per-device
batch 1, cutoff_len = length, synthetic records longer than the cutoff (so every sequence is exactly
`length` tokens; checked), SDPA attention, AdamW, no DeepSpeed, max_steps = --steps. A callback records
torch.cuda.max_memory_allocated / max_memory_reserved per step and a thread polls nvidia-smi's
memory.used. The planner's `estimate()` for the very same training arguments gives its prediction:
`allocated_gib` against max_memory_allocated, `peak_gib` against nvidia-smi. Output: a Markdown table
on stdout, `planner_check.md` and `planner_check.json` in --out.

`--cpu-smoke`: a 2-layer, 64-wide architecture (vocabulary 4096 > the tokenizer's 2048), lengths 64,128,
2 steps, on CPU (`use_cpu`); measurements are n/a. tests/test_gpu_planner_check.py runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # llamafactory_ext from this checkout, also where it is not installed

from llamafactory_ext import families, fileio, plan, tiny  # noqa: E402

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false", "DISABLE_VERSION_CHECK": "1"}
BUILTIN = ("mistral", "gemma")  # families (llamafactory_ext/families.py) whose `arch` is a real 7B config
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 4096}
GiB = plan.GiB


# ----------------------------------------------------------------------------- inputs
def arch_overrides(family: str, smoke: bool) -> dict:
    """Config fields that turn the tiny model's config into the architecture under test."""
    if smoke:
        return dict(SMOKE)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings")
    return {k: families.get(family).arch[k] for k in keys}


def build_model(family: str, work: Path, smoke: bool) -> Path:
    """Random-weight bf16 model of the architecture under test + the tiny tokenizer (cached by a stamp)."""
    import shutil

    tok_dir = tiny.build(family, ROOT / "build" / "tiny" / family)  # the test suite's cache
    over = arch_overrides(family, smoke)
    out = work / f"model-{family}{'-smoke' if smoke else ''}"
    key = hashlib.sha256(json.dumps([family, over, smoke], sort_keys=True).encode()).hexdigest()[:16]
    stamp = out / ".stamp"
    if stamp.exists() and stamp.read_text().strip() == key:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tok_dir)
    for k, v in over.items():
        setattr(cfg, k, v)
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):  # random init of 7B parameters takes seconds on the GPU, minutes on CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / f).exists():
            shutil.copy(tok_dir / f, out / f)
    stamp.write_text(key + "\n")
    print(f"built {out} ({time.time() - t0:.0f} s)", file=sys.stderr)
    return out


def write_dataset(model: Path, work: Path, length: int, records: int) -> Path:
    """Alpaca records whose prompt and answer are each longer than `length` tokens: after LLaMA-Factory's
    truncation every example is exactly `length` tokens (checked in the child)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(length)
    d = work / f"data-{length}"
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(records):
        text = [tok.decode(rng.choices(ids, k=int(1.5 * length) + 16)) for _ in range(2)]
        rows.append({"instruction": "Review.", "input": text[0], "output": text[1]})
    fileio.atomic_write_text(d / "check.json", json.dumps(rows))
    fileio.atomic_write_text(d / "dataset_info.json", json.dumps({"planner_check": {"file_name": "check.json"}}))
    return d


def train_args(family: str, model: Path, data: Path, out: Path, length: int, steps: int, smoke: bool) -> dict:
    """LLaMA-Factory arguments: the recipe's memory settings (sft_recipes/*_15k.yaml) minus DeepSpeed."""
    args = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "nf4",
        "double_quantization": True, "flash_attn": "sdpa", "lora_target": "all", "lora_rank": 64,
        "lora_alpha": 16, "lora_dropout": 0.1, "disable_gradient_checkpointing": False,
        "dataset": "planner_check", "dataset_dir": str(data), "template": family, "cutoff_len": length,
        "overwrite_cache": True, "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none",
        "save_strategy": "no", "logging_steps": 1, "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 2e-4,
        "lr_scheduler_type": "constant", "max_grad_norm": 0.3, "optim": "adamw_torch", "bf16": True,
    }
    if smoke:
        args["use_cpu"] = True
    return args


# ----------------------------------------------------------------------------- the child: one training run
def _smi_used_gib() -> float | None:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                            os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                           capture_output=True, text=True, timeout=10)
        return float(p.stdout.split()[0]) / 1024 if p.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def child(spec_path: str) -> None:
    """Run one LLaMA-Factory training and write the measurements to spec['result']."""
    from llamafactory_ext import patches

    patches.install_import_hook()  # as the venv's .pth does; a bare GPU machine has no .pth (idempotent)
    import torch
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available() and not spec["args"].get("use_cpu")
    res: dict = {"cuda": cuda, "steps": [], "lengths": None}

    class Measure(TrainerCallback):
        def __init__(self):
            self.smi_max, self.stop = None, threading.Event()

        def _poll(self):
            while not self.stop.is_set():
                v = _smi_used_gib()
                if v is not None:
                    self.smi_max = max(self.smi_max or 0.0, v)
                self.stop.wait(0.2)

        def on_train_begin(self, args, state, control, **kw):
            dl = kw.get("train_dataloader")
            if dl is not None:
                lens = [len(x) for x in dl.dataset["input_ids"]]
                res["lengths"] = [min(lens), max(lens)]
            if cuda:
                torch.cuda.synchronize()
                res["loaded_alloc_gib"] = torch.cuda.memory_allocated() / GiB  # weights + LoRA, no optimizer
                torch.cuda.reset_peak_memory_stats()
                threading.Thread(target=self._poll, daemon=True).start()

        def on_step_end(self, args, state, control, **kw):
            row = {"step": state.global_step}
            if cuda:
                torch.cuda.synchronize()
                row.update(max_allocated_gib=torch.cuda.max_memory_allocated() / GiB,
                           max_reserved_gib=torch.cuda.max_memory_reserved() / GiB, smi_gib=self.smi_max)
            res["steps"].append(row)

        def on_train_end(self, args, state, control, **kw):
            self.stop.set()

    t0 = time.time()
    run_exp(spec["args"], callbacks=[Measure()])
    res["train_s"] = time.time() - t0
    fileio.atomic_write_text(spec["result"], json.dumps(res))


# ----------------------------------------------------------------------------- the parent
def measure(spec: dict, work: Path, length: int, timeout: int) -> dict:
    spec_path = work / f"spec-{length}.json"
    spec["result"] = str(work / f"result-{length}.json")
    Path(spec["result"]).unlink(missing_ok=True)
    fileio.atomic_write_text(spec_path, json.dumps(spec))
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env, timeout=timeout)
    if p.returncode != 0 or not Path(spec["result"]).exists():
        raise SystemExit(f"training at length {length} failed (exit {p.returncode}); its log is above")
    res = json.loads(Path(spec["result"]).read_text())
    res["wall_s"] = time.time() - t0
    return res


def predict(model: Path, args: dict, gpu_mem: float | None) -> dict:
    """The planner for the same training arguments and the architecture read back from config.json."""
    arch = plan.resolve_arch(str(model))
    e = plan.estimate(arch, plan.setup_from_recipe(args), gpu_mem)
    return {"peak_gib": e.peak_gib, "allocated_gib": e.allocated / GiB, "reserved_gib": e.reserved / GiB,
            "breakdown": {k: b / GiB for k, _, b in e.items}, "arch": arch.__dict__}


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _ratio(a, b) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}"


def table(rows: list[dict], title: str) -> str:
    head = ["length", "tokens", "measured alloc", "planner alloc", "ratio", "measured reserved",
            "planner reserved", "ratio", "nvidia-smi", "planner peak", "ratio (smi/peak)", "train s"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, p = r["measured"], r["planner"]
        lines.append("| " + " | ".join([
            f"{r['length']:,}", "n/a" if not r["lengths"] else "-".join(map(str, sorted(set(r["lengths"])))),
            _f(m["max_allocated_gib"]), _f(p["allocated_gib"]), _ratio(m["max_allocated_gib"], p["allocated_gib"]),
            _f(m["max_reserved_gib"]), _f(p["reserved_gib"]), _ratio(m["max_reserved_gib"], p["reserved_gib"]),
            _f(m["smi_gib"]), _f(p["peak_gib"]), _ratio(m["smi_gib"], p["peak_gib"]),
            f"{r['train_s']:.0f}"]) + " |")
    lines += ["", "GiB. alloc = torch.cuda.max_memory_allocated; nvidia-smi = max memory.used polled every 0.2 s "
              "during training (includes the CUDA context); ratio = measured / planner."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(BUILTIN), default="mistral")
    ap.add_argument("--lengths", help="comma-separated cutoffs (default 4096,8192; --cpu-smoke: 64,128)")
    ap.add_argument("--steps", type=int, help="optimizer steps per length (default 3; --cpu-smoke: 2)")
    ap.add_argument("--out", default="build/gpu_planner_check", help="where the .md and .json go")
    ap.add_argument("--work", default=str(ROOT / "build" / "gpu_planner_check_work"),
                    help="models, data, runs (keep it out of --out: the 7B model is ~15 GB); default %(default)s")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per training subprocess")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny architecture on CPU, no measurement")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child)
        return 0
    os.environ.update(OFFLINE_ENV)
    import torch

    smoke = a.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or pass --cpu-smoke")
    lengths = [int(x) for x in (a.lengths or ("64,128" if smoke else "4096,8192")).split(",")]
    steps = a.steps or (2 if smoke else 3)
    out = Path(a.out)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(a.model, work, smoke)
    gpu_mem = None if smoke else torch.cuda.get_device_properties(0).total_memory / GiB
    rows = []
    for length in lengths:
        data = write_dataset(model, work, length, records=steps)
        args = train_args(a.model, model, data, work / f"run-{length}", length, steps, smoke)
        res = measure({"args": args}, work, length, a.timeout)
        if res["lengths"] and res["lengths"] != [length, length]:
            print(f"warning: sequences were {res['lengths']} tokens, not {length}", file=sys.stderr)
        peak = {k: (max((s[k] for s in res["steps"] if s.get(k) is not None), default=None))
                for k in ("max_allocated_gib", "max_reserved_gib", "smi_gib")}
        rows.append({"length": length, "lengths": res["lengths"], "measured": peak, "per_step": res["steps"],
                     "loaded_alloc_gib": res.get("loaded_alloc_gib"), "train_s": res["train_s"],
                     "wall_s": res["wall_s"], "planner": predict(model, args, gpu_mem), "train_args": args})
    name = families.get(a.model).model if not smoke else f"{a.model} smoke ({SMOKE})"
    title = f"{name}: QLoRA 4-bit NF4 DQ, LoRA r=64 all, dropout 0.1, SDPA, grad ckpt, batch 1, AdamW, {steps} steps"
    md = table(rows, title + (f", {torch.cuda.get_device_name(0)}" if not smoke else ", CPU smoke"))
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "planner_check.md", md + "\n")
    fileio.atomic_write_text(out / "planner_check.json", json.dumps(
        {"model": name, "smoke": smoke, "steps": steps, "gpu_mem_gib": gpu_mem, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
