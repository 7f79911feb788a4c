"""Benchmark: torch CPU threads (1 vs 2 ...) for SmolLM2-135M LoRA training steps and generation.

    .venv/bin/python tests/bench_threads.py                   # threads 1,2; 5 interleaved rounds; batch 12
    .venv/bin/python tests/bench_threads.py --threads 1,2 --rounds 7 --gen-batches 1,12 --new-tokens 64

What the demo does, in one process, the settings interleaved round by round (1, 2, 2, 1, ...) so a
shared, noisy machine hits every setting alike: one LoRA training step (r16/alpha32 on all linear
projections, fp32, batch 1, `--tokens` tokens, AdamW; with and without gradient checkpointing, which
LLaMA-Factory turns on by default) and generation as predict does it, batched: the prefill of `--prompt`
prompt tokens, and `--new-tokens` sampled one-token decode steps on its KV cache, timed apart.
Prints, per setting: wall seconds (median, min, max over rounds), CPU seconds of this process (all its
threads), decode tokens/s, and the wall-time ratio to the first thread count within each round.
The model is the cached build (`llamafactory-ext smollm2`). Threads are set with torch.set_num_threads;
variables read at start (OMP_WAIT_POLICY=PASSIVE, ...) apply to the whole run: compare separate runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=640, help="training sequence length (the recipe's cutoff_len)")
    ap.add_argument("--prompt", type=int, default=341, help="prompt tokens at predict (256 paper tokens + template)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--gen-batches", default="12", help="generation batch sizes (predict batches the test papers)")
    ap.add_argument("--model", default=str(ROOT / "build/smollm2/SmolLM2-135M-Instruct"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamafactory_ext.models import smollm2

    smollm2.ensure(Path(args.model))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    model.enable_input_require_grads()  # as LLaMA-Factory does for gradient checkpointing
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = base.config.vocab_size
    ids = torch.randint(100, vocab, (1, args.tokens))
    prompt = torch.randint(100, vocab, (1, args.prompt))

    def train_step(gc: bool):
        def f():
            model.train()
            if gc:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return f

    def prefill(batch: int):
        def f():
            model.eval()
            with torch.no_grad():
                model(input_ids=prompt.repeat(batch, 1), use_cache=True)
        return f

    def decode(batch: int):
        """`--new-tokens` one-token steps on a KV cache of the prompt (the prefill is not timed)."""
        state = {}

        def setup():
            model.eval()
            with torch.no_grad():
                out = model(input_ids=prompt.repeat(batch, 1), use_cache=True)
            state.update(cache=out.past_key_values, nxt=out.logits[:, -1:].argmax(-1))

        def f():
            with torch.no_grad():
                for _ in range(args.new_tokens):
                    out = model(input_ids=state["nxt"], past_key_values=state["cache"], use_cache=True)
                    probs = torch.softmax(out.logits[:, -1] / 0.35, -1)  # sampling, as predict does
                    state["nxt"] = torch.multinomial(probs, 1)
        f.setup = setup
        return f

    tasks = {"train step, GC on": train_step(True), "train step, GC off": train_step(False)}
    for b in (int(x) for x in args.gen_batches.split(",")):
        tasks[f"prefill batch {b}"] = prefill(b)
        tasks[f"decode batch {b}"] = decode(b)

    def timed_task(f):
        if hasattr(f, "setup"):
            f.setup()
        return timed(f)

    for t in threads:  # warm-up: first calls allocate and pick kernels
        torch.set_num_threads(t)
        for f in tasks.values():
            timed_task(f)
    res = {(name, t): [] for name in tasks for t in threads}
    for r in range(args.rounds):
        for name, f in tasks.items():
            for t in (threads if r % 2 == 0 else threads[::-1]):
                torch.set_num_threads(t)
                res[(name, t)].append(timed_task(f))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"train {args.tokens} tokens; generate {args.prompt} prompt + {args.new_tokens} new tokens")
    print(f"{'task':24} {'threads':>7} {'wall med':>9} {'min':>6} {'max':>6} {'CPU med':>8}  "
          f"{'tok/s':>7}  per-round wall ratio vs {threads[0]} thread(s)")
    for name in tasks:
        for t in threads:
            walls = [w for w, _ in res[(name, t)]]
            cpus = [c for _, c in res[(name, t)]]
            tok = ""
            if name.startswith("decode"):
                tok = f"{int(name.split()[-1]) * args.new_tokens / statistics.median(walls):.1f}"
            ratios = [w / w0 for (w, _), (w0, _) in zip(res[(name, t)], res[(name, threads[0])], strict=True)]
            print(f"{name:24} {t:7d} {statistics.median(walls):9.2f} {min(walls):6.2f} {max(walls):6.2f} "
                  f"{statistics.median(cpus):8.2f}  {tok:>7}  " + " ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
