"""`make gpu-check`: what the shipped 7B recipes do on this machine's GPU, measured, beside what the planner predicts.

    llamafactory-ext gpu-check --out gpu_check/            # one NVIDIA GPU: at most ~8 minutes on an H200
    llamafactory-ext gpu-check --cpu-smoke --out /tmp/s    # the same code path on CPU, a 2-layer model (tested)

Nothing is downloaded: each family's REAL architecture (families.py `arch`: Mistral-7B-Instruct-v0.2, gemma-7b-it)
is built with random bf16 weights (a child process; saved once under --work) with the tiny local tokenizer (its ids
lie inside the real vocabulary). Then, one child process per configuration, LLaMA-Factory's own training path
(`run_exp`) with the recipe's exact settings (quantization, LoRA, optimizer, Liger, RoPE scaling, cutoff, batch;
DeepSpeed off on one GPU unless --deepspeed) on synthetic records longer than the cutoff (every sequence is exactly
cutoff_len tokens), a few steps. The training process writes its peak memory and speed itself
(train/callbacks.py: peak_memory.json, speed.json); this process polls nvidia-smi's memory.used meanwhile and holds
no GPU memory of its own. The planner's prediction is for the same arguments (fixed-length batches). Variants:
Mistral with Liger, with lora_dropout 0, at batch 2. Generation: HF generate (bf16, the family's paper budget, 128
new tokens) at batch 1 and at the batch `make predict` would pick (fit/speed.py), and vLLM when it is importable.

`--cpu-smoke` runs one recipe and one variant (the code path, not the figures). Output (--out, 3 files): gpu_check.md (one table), gpu_check.json (every figure), gpu_check.log (the children's
output). Configurations run in order until --budget seconds are spent; the rest are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from llamafactory_ext import UserError, families, gpus

SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 4096}
STEPS, SMOKE_STEPS = 5, 3  # the first step is left out of the speed (train/callbacks.py)
GiB = 1024**3
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true",
           "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------- what is measured
def configurations(project, smoke: bool) -> list[dict]:
    """The shipped 7B recipes with distinct settings (mistral_5k trains what mistral_15k trains, on less data),
    then the speed variants on Mistral."""
    from llamafactory_ext.fileio import load_yaml
    from llamafactory_ext.train import recipes

    seen, out = set(), []
    for (model, _data), path in sorted(recipes.shipped(project.recipes).items()):
        fam = families.get(model)
        if fam.local:
            continue
        args = load_yaml(path, "recipe")
        key = json.dumps({k: v for k, v in args.items() if k not in ("dataset", "output_dir")}, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"name": path.stem, "family": model, "recipe": args})
    mistral = next((c for c in out if c["family"] == "mistral"), None)
    if mistral:
        for name, change in (("liger", {"enable_liger_kernel": True}), ("dropout0", {"lora_dropout": 0.0}),
                             ("batch2", {"per_device_train_batch_size": 2})):
            out.append({"name": f"{mistral['name']}+{name}", "family": "mistral",
                        "recipe": {**mistral["recipe"], **change}})
    if smoke:  # the code path, not the figures: one recipe and one variant of it (one model to build)
        out = [mistral, next(c for c in out if "+" in c["name"])] if mistral else out[:1]
        for c in out:
            c["recipe"] = {**c["recipe"], "cutoff_len": 128, "bf16": False, "enable_liger_kernel": False,
                           "rope_scaling": None}
    return out


def train_args(cfg: dict, model: Path, data: Path, out: Path, *, steps: int, deepspeed: bool, smoke: bool) -> dict:
    args = {**cfg["recipe"], "model_name_or_path": str(model), "dataset": "gpu_check", "dataset_dir": str(data),
            "output_dir": str(out), "overwrite_output_dir": True, "report_to": "none", "save_strategy": "no",
            "logging_steps": 1, "max_steps": steps, "gradient_accumulation_steps": 1, "overwrite_cache": True,
            "preprocessing_num_workers": 1, "plot_loss": False}
    if not deepspeed:
        args.pop("deepspeed", None)
    if smoke:
        args["use_cpu"] = True
    return args


# ----------------------------------------------------------------------------- children
def build_model(family: str, work: Path, smoke: bool) -> Path:
    """(child) the real architecture with random bf16 weights + the tiny tokenizer, cached by a stamp."""
    import hashlib
    import shutil

    from llamafactory_ext.models import tiny

    fam = families.get(family)
    tiny_fam = families.get(fam.tiny)
    tok_dir = tiny.build(tiny_fam.builder[1], families.model_dir(tiny_fam))  # (cached) its tokenizer is used
    over = dict(SMOKE) if smoke else {k: fam.arch[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings")}
    out = work / f"model-{family}{'-smoke' if smoke else ''}"
    key = hashlib.sha256(json.dumps([family, over], sort_keys=True).encode()).hexdigest()[:16]
    if (out / ".stamp").is_file() and (out / ".stamp").read_text().strip() == key:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tok_dir)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    from llamafactory_ext.fileio import build_folder

    with build_folder(out) as tmp:  # a killed check never leaves half a model behind a valid stamp
        model.save_pretrained(tmp, max_shard_size="5GB")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tok_dir / f).exists():
                shutil.copy(tok_dir / f, tmp / f)
        (tmp / ".stamp").write_text(key + "\n")
    return out


def write_data(model: Path, work: Path, cutoff: int, records: int) -> Path:
    """Alpaca records whose prompt and answer each exceed `cutoff` tokens: every example is cut to exactly cutoff."""
    from transformers import AutoTokenizer

    from llamafactory_ext.fileio import atomic_write_text

    tok = AutoTokenizer.from_pretrained(model)
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(cutoff)
    rows = [{"instruction": "Review.", "input": tok.decode(rng.choices(ids, k=int(1.5 * cutoff))),
             "output": tok.decode(rng.choices(ids, k=int(1.5 * cutoff)))} for _ in range(records)]
    d = work / f"data-{model.name}-{cutoff}"
    atomic_write_text(d / "gpu_check.json", json.dumps(rows))
    atomic_write_text(d / "dataset_info.json", json.dumps({"gpu_check": {"file_name": "gpu_check.json"}}))
    return d


def child_train(args: dict) -> None:
    from llamafactory.train.tuner import run_exp

    run_exp(args)


def child_generate(model: str, template: str, prompt: int, new_tokens: int, batches: list[int], smoke: bool) -> list:
    """HF generate (what LLaMA-Factory's predict calls) on random token prompts: new tokens/s per batch size."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    m.to(device).eval()
    vocab = min(m.config.vocab_size, 2000)
    rows = []
    for b in batches:
        ids = torch.randint(3, vocab, (b, prompt), device=device, generator=torch.Generator(device).manual_seed(b))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=True, temperature=0.35, top_p=0.9, eos_token_id=None)
        if device == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append({"batch": b, "prompt": prompt, "new_tokens": new_tokens, "seconds": round(s, 2),
                     "new_tokens_per_s": round(b * (out.shape[1] - prompt) / s, 1),
                     "max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if device == "cuda" else None})
    return rows


def child_vllm(model: str, prompt: int, new_tokens: int, batch: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", max_model_len=prompt + new_tokens, disable_log_stats=True)
    prompts = [{"prompt_token_ids": [random.Random(i).randrange(3, 2000) for _ in range(prompt)]} for i in range(batch)]
    t0 = time.perf_counter()
    res = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.35,
                                               top_p=0.9, ignore_eos=True))
    s = time.perf_counter() - t0
    return {"batch": batch, "seconds": round(s, 2),
            "new_tokens_per_s": round(sum(len(r.outputs[0].token_ids) for r in res) / s, 1)}


def _child_main(argv: list[str]) -> None:
    what, payload = argv[0], json.loads(argv[1])
    if what == "build":
        print("RESULT " + json.dumps(str(build_model(payload["family"], Path(payload["work"]), payload["smoke"]))))
    elif what == "train":
        from llamafactory_ext import patches

        patches.install_import_hook()  # the recipes' RoPE fix, also where the package runs from PYTHONPATH (no .pth)
        child_train(payload)
        print("RESULT null")
    elif what == "generate":
        print("RESULT " + json.dumps(child_generate(**payload)))
    elif what == "vllm":
        print("RESULT " + json.dumps(child_vllm(**payload)))


# ----------------------------------------------------------------------------- the parent
class Smi:
    """Max memory.used of GPU 0 (nvidia-smi, every 0.2 s) while a child runs."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                p = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                   capture_output=True, text=True, timeout=10)
                used = float(p.stdout.split()[0]) / 1024
                self.peak = used if self.peak is None else max(self.peak, used)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_child(what: str, payload: dict, log, env: dict, timeout: float) -> object:
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.fit.gpucheck", "--child", what, json.dumps(payload)],
                       capture_output=True, text=True, env=env, timeout=max(timeout, 30))
    log.write(f"\n===== {what} {json.dumps(payload)[:300]}\n{p.stdout[-20000:]}\n{p.stderr[-20000:]}\n")
    log.flush()
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed (exit {p.returncode}): {tail}")
    result = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(result[-1][7:]) if result else None


def predicted(cfg: dict, arch, card: gpus.Card | None) -> dict:
    from llamafactory_ext.fit import memory, speed

    s = memory.setup_from_recipe(cfg["args"], None, padded=False)
    e = memory.estimate(arch, s, card.memory_gib if card else None)
    out = {"allocated_gib": round(e.allocated / GiB, 2), "reserved_gib": round(e.reserved / GiB, 2),
           "nvidia_smi_gib": round(e.peak_gib, 2)}
    if card is not None and card.bf16_tflops:
        out.update({k: speed.train_speed(arch, s.batch, s.cutoff, card)[k] for k in ("train_tokens_per_s", "step_s")})
    return out


def check(project, out: Path, work: Path, *, smoke: bool, deepspeed: bool, budget: float) -> dict:
    from llamafactory_ext.fileio import atomic_write_text
    from llamafactory_ext.fit import memory, speed

    t_start = time.monotonic()
    env = {**os.environ, **OFFLINE}
    card = None if smoke else gpus.by_device_name(_device_name())
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report = {"about": "llamafactory-ext gpu-check (fit/gpucheck.py)", "device": "cpu (smoke)" if smoke else _device_name(),
              "card": card.name if card else None, "training": [], "generate": [], "vllm": None, "skipped": []}
    steps = SMOKE_STEPS if smoke else STEPS
    with open(out / "gpu_check.log", "w", encoding="utf-8") as log:
        models = {}
        for cfg in configurations(project, smoke):
            left = budget - (time.monotonic() - t_start)
            if left < (20 if smoke else 60):
                report["skipped"].append({"name": cfg["name"], "why": "out of time (--budget)"})
                continue
            if cfg["recipe"].get("enable_liger_kernel") and not _importable("liger_kernel"):
                report["skipped"].append({"name": cfg["name"], "why": "liger-kernel is not installed (pip install -e '.[gpu]')"})
                continue
            fam = cfg["family"]
            try:
                if fam not in models:
                    models[fam] = Path(run_child("build", {"family": fam, "work": str(work), "smoke": smoke}, log, env, left))
                cutoff = int(cfg["recipe"].get("cutoff_len", 2048))
                batch = int(cfg["recipe"].get("per_device_train_batch_size", 1))
                data = write_data(models[fam], work, cutoff, batch * (steps + 1))  # a tokenizer only: no GPU here
                run_out = work / f"run-{cfg['name']}"
                cfg["args"] = train_args(cfg, models[fam], data, run_out, steps=steps, deepspeed=deepspeed, smoke=smoke)
                with Smi() if card else _nothing() as smi:
                    run_child("train", cfg["args"], log, env, left)
                mem = json.loads((run_out / "peak_memory.json").read_text())
                spd = json.loads((run_out / "speed.json").read_text())
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                report["skipped"].append({"name": cfg["name"], "why": str(e)[:300]})
                continue
            arch = memory.arch_from_config(mem.get("model_config") or families.get(fam).arch, fam)
            report["training"].append({
                "name": cfg["name"], "family": fam, "cutoff_len": cutoff, "batch": batch,
                "liger": bool(cfg["recipe"].get("enable_liger_kernel")), "lora_dropout": cfg["recipe"].get("lora_dropout"),
                "optim": cfg["recipe"].get("optim"), "rope_scaling": cfg["recipe"].get("rope_scaling"),
                "deepspeed": bool(cfg["args"].get("deepspeed")),
                "measured": {"allocated_gib": mem.get("max_memory_allocated_gib"),
                             "reserved_gib": mem.get("max_memory_reserved_gib"),
                             "nvidia_smi_gib": round(smi.peak, 2) if smi and smi.peak else None,
                             "train_tokens_per_s": spd.get("tokens_per_s"), "step_s": spd.get("step_s"),
                             "mfu": spd.get("mfu")},
                "planned": predicted(cfg, arch, card)})
        # generation, on the first family built
        fam = next(iter(models), None)
        left = budget - (time.monotonic() - t_start)
        if fam and left > (15 if smoke else 90):
            f = families.get(fam)
            arch = memory.arch_from_config(SMOKE if smoke else f.arch, fam)
            prompt = 64 if smoke else f.paper_budget
            new = 8 if smoke else 128
            pick, why = speed.predict_batch(arch, prompt, new, card.memory_gib if card else 24.0)
            pick = min(pick, 4) if smoke else pick
            try:
                report["generate"] = run_child("generate", {"model": str(models[fam]), "template": f.template,
                                                            "prompt": prompt, "new_tokens": new,
                                                            "batches": sorted({1, max(pick, 1)}), "smoke": smoke},
                                               log, env, left)
                report["predict_batch"] = {"batch": pick, **why}
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                report["skipped"].append({"name": "generate", "why": str(e)[:300]})
            if _importable("vllm") and not smoke and budget - (time.monotonic() - t_start) > 120:
                try:
                    report["vllm"] = run_child("vllm", {"model": str(models[fam]), "prompt": prompt, "new_tokens": new,
                                                        "batch": max(pick, 1)}, log, env, budget)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    report["skipped"].append({"name": "vllm", "why": str(e)[:300]})
    report["seconds"] = round(time.monotonic() - t_start, 1)
    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "gpu_check.md", render(report))
    return report


def render(report: dict) -> str:
    def f(x, fmt="{:.2f}"):
        return "n/a" if x is None else fmt.format(x)

    lines = [f"gpu-check on {report['device']} ({report['seconds']} s)", "",
             "| configuration | alloc GiB (plan) | reserved GiB (plan) | nvidia-smi GiB (plan) | tokens/s (plan) | s/step | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in report["training"]:
        m, p = r["measured"], r["planned"]
        lines.append(f"| {r['name']} ({r['cutoff_len']} x {r['batch']}) | {f(m['allocated_gib'])} ({f(p['allocated_gib'])}) "
                     f"| {f(m['reserved_gib'])} ({f(p['reserved_gib'])}) | {f(m['nvidia_smi_gib'])} ({f(p['nvidia_smi_gib'])}) "
                     f"| {f(m['train_tokens_per_s'], '{:,.0f}')} ({f(p.get('train_tokens_per_s'), '{:,.0f}')}) "
                     f"| {f(m['step_s'], '{:.3f}')} | {f(m['mfu'], '{:.1%}')} |")
    if report["generate"]:
        lines += ["", "| HF generate | batch | prompt | new tokens | new tokens/s | max allocated GiB |", "|---|---|---|---|---|---|"]
        lines += [f"| | {g['batch']} | {g['prompt']} | {g['new_tokens']} | {g['new_tokens_per_s']} | {f(g['max_allocated_gib'])} |"
                  for g in report["generate"]]
    if report.get("vllm"):
        lines += ["", f"vLLM at batch {report['vllm']['batch']}: {report['vllm']['new_tokens_per_s']} new tokens/s"]
    lines += [f"skipped {s['name']}: {s['why']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def _device_name() -> str | None:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"], capture_output=True,
                           text=True, timeout=10)
        return p.stdout.strip() or None if p.returncode == 0 else None
    except OSError:
        return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output folder (default: the project's runs/gpu_check)")
    p.add_argument("--work", default=None, help="random-weight models and data (default: the project's build/gpu_check)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code path on CPU with a 2-layer model")
    p.add_argument("--deepspeed", action="store_true", help="keep the recipes' DeepSpeed config (one GPU: off by default)")
    p.add_argument("--budget", type=float, default=480, help="seconds to spend at most (default 480)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    from llamafactory_ext import project

    proj = project.get()
    if not args.cpu_smoke and _device_name() is None:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi found none); run it on the GPU machine, or --cpu-smoke to try "
              "the code path on CPU", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else proj.runs / "gpu_check"
    work = Path(args.work) if args.work else proj.build / "gpu_check"
    report = check(proj, out, work, smoke=args.cpu_smoke, deepspeed=args.deepspeed, budget=args.budget)
    sys.stdout.write(render(report))
    print(f"wrote {out / 'gpu_check.md'}, {out / 'gpu_check.json'}, {out / 'gpu_check.log'}", file=sys.stderr)
    if not report["training"]:
        raise UserError(f"nothing was measured: {'; '.join(s['why'] for s in report['skipped'])[:500]}")
    return 0


if __name__ == "__main__":
    _child_main(sys.argv[2:] if sys.argv[1:2] == ["--child"] else sys.argv[1:])
