"""Needle in a haystack: hide a random "magic number" sentence in long paper text at each length and
depth, ask the model for it, and chart where it still finds it (the effective context window).

    llamafactory-ext niah /models/Mistral-7B-Instruct-v0.2 --lengths 1k,2k,4k,8k,12k --depths 0,0.25,0.5,0.75,1
    llamafactory-ext niah /models/gemma-7b-it --lengths 4k,8k,12k,16k --rope-scaling linear
    llamafactory-ext niah runs/mistral_15k/merged --out runs/niah/mistral_15k
    llamafactory-ext niah build/tiny/mistral --lengths 64,128 --depths 0,0.5,1       # CPU smoke run

Lengths are prompt lengths in the model's own tokens, chat template included (`1k` = 1024); each prompt
is built to within 0.5% (at least 2 tokens) of it. Depth is the fraction of the haystack (in tokens)
before the needle; the needle goes in at the nearest sentence start, else word start. The haystack is
the sample papers (data/sample/paper_review.jsonl; --haystack FILE for others), repeated as needed.
The prompt goes through LLaMA-Factory's chat template and `ChatModel` (HF backend, greedy); an answer
is right when the number appears in it. Writes `niah.csv` (one row per probe) and `niah.png` (heatmap,
depth x length) to --out (default runs/niah/<model>).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import io
import random
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llamafactory_ext import UserError, families, units
from llamafactory_ext.fileio import atomic_write, atomic_write_text

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."
FIELDS = ["length", "depth", "trial", "prompt_tokens", "context_tokens", "needle_token", "actual_depth",
          "number", "correct", "response"]


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,12k' -> [1024, 2048, 12288] tokens (the "k" rule of units.py); at least 16 each."""
    out = units.counts(text, "--lengths", unit="tokens")
    short = [n for n in out if n < 16]
    if short:
        raise UserError(f"--lengths: {short[0]} tokens is too short to hold a needle and a question")
    return out


def parse_depths(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--depths {text!r}: give fractions like 0,0.25,0.5,0.75,1") from None
    if not all(0.0 <= d <= 1.0 for d in out):
        raise UserError(f"--depths {text!r}: every depth must be between 0 and 1")
    return sorted(set(out))


def haystack_text(path: str | Path | None = None) -> str:
    """The filler: papers from a JSONL (`input`, `text` or `paper` field) or a text file; a generated
    filler outside a project (an installed wheel)."""
    p = Path(path) if path else _sample()
    if p is None or not p.is_file():
        if path:
            raise UserError(f"--haystack {path} not found")
        return fallback_filler()
    if p.suffix == ".jsonl":
        from llamafactory_ext.fileio import read_jsonl

        texts = [next((row[k] for k in ("input", "text", "paper") if isinstance(row.get(k), str)), "")
                 for _, row in read_jsonl(p, "--haystack")]
        text = "\n\n".join(t.strip() for t in texts if t.strip())
    else:
        text = p.read_text(encoding="utf-8")
    if len(text) < 200:
        raise UserError(f"haystack {p} holds almost no text; give a JSONL with an `input` field or a .txt file")
    return re.sub(r"\d{5,}", "", text)  # no long numbers that look like the needle


def _sample() -> Path | None:
    from llamafactory_ext import project

    try:
        return project.get().sample
    except UserError:
        return None


def fallback_filler(sentences: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    subj = ["The model", "Our method", "The baseline", "This paper", "The encoder", "Each layer", "The dataset"]
    verb = ["improves", "reduces", "matches", "outperforms", "extends", "describes", "evaluates"]
    obj = ["the training loss", "prior work", "the attention map", "long documents", "the ablation",
           "robustness to noise", "the validation accuracy", "sample efficiency"]
    tail = ["on three benchmarks", "without extra parameters", "at a modest cost", "in most settings",
            "as shown in the appendix", "under distribution shift"]
    return " ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}."
                    for _ in range(sentences))


@dataclass
class Probe:
    length: int
    depth: float
    trial: int
    number: int
    content: str  # the user message
    prompt_tokens: int
    context_tokens: int  # haystack tokens (without the needle)
    needle_token: int  # haystack tokens before the needle
    actual_depth: float


class Builder:
    """Builds user messages of an exact prompt length (template included) with a needle at a depth."""

    def __init__(self, tokenizer, template, haystack: str, max_length: int, shift: int = 0):
        self.tok, self.template = tokenizer, template
        text = haystack
        # enough text for the longest prompt, cheaply: measure chars/token on a sample first
        sample = text[:20000]
        cpt = max(1.0, len(sample) / max(1, len(self._ids(sample))))
        need = int((max_length + 64) * cpt * 1.5) + shift
        while len(text) < need:
            text = text + "\n\n" + haystack
        self.text = text[shift:need]
        enc = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
        self.starts = [s for s, _ in enc["offset_mapping"]]
        self.ends = [e for _, e in enc["offset_mapping"]]
        if len(self.starts) < max_length:
            raise UserError(f"the haystack is too short for {max_length} tokens")
        self.sentence_starts = [i for i, s in enumerate(self.starts) if self._starts_sentence(s)]
        self.word_starts = [i for i, s in enumerate(self.starts) if s == 0 or self.text[s - 1].isspace()
                            or self.text[s].isspace()]

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _starts_sentence(self, s: int) -> bool:
        """True when whitespace and then '.', '!' or '?' precede char s."""
        i = s
        while i > 0 and self.text[i - 1].isspace():
            i -= 1
        return s == 0 or (i < s and self.text[i - 1:i] in (".", "!", "?"))

    def encode(self, content: str) -> list[int]:
        """Prompt ids exactly as LLaMA-Factory's ChatModel builds them."""
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": ""}]
        return self.template.encode_oneturn(self.tok, msgs)[0]

    def _cut(self, n: int, depth: float) -> int:
        """Token index for the needle: the nearest sentence start, else word start, else exact."""
        p = round(depth * n)
        if p <= 0 or p >= n:
            return min(max(p, 0), n)
        for cands, tol in ((self.sentence_starts, max(2, round(0.02 * n))), (self.word_starts, 3)):
            i = bisect.bisect_left(cands, p)
            near = [c for c in cands[max(0, i - 1):i + 1] if 0 < c < n and abs(c - p) <= tol]
            if near:
                return min(near, key=lambda c: abs(c - p))
        return p

    def _context(self, n: int, depth: float, needle: str) -> tuple[str, str, str]:
        n = max(1, min(n, len(self.starts)))
        end = self.ends[n - 1]
        cut = self._cut(n, depth)
        c = self.starts[cut] if cut < n else end
        pre, suf = self.text[:c].strip(), self.text[c:end].strip()
        return " ".join(x for x in (pre, needle, suf) if x), pre, suf

    def build(self, length: int, depth: float, number: int, trial: int = 0) -> Probe:
        needle = NEEDLE.format(number=number)
        overhead = len(self.encode(f"{needle}\n\n{QUESTION}"))
        if length - overhead < 4:
            raise UserError(f"--lengths {length}: the template, needle and question alone take {overhead} tokens")
        tol = max(2, round(0.005 * length))
        n = length - overhead
        for _ in range(8):
            ctx, pre, suf = self._context(n, depth, needle)
            content = f"{ctx}\n\n{QUESTION}"
            got = len(self.encode(content))
            if abs(got - length) <= tol:
                break
            n -= got - length
        n_pre, n_suf = len(self._ids(pre)) if pre else 0, len(self._ids(suf)) if suf else 0
        return Probe(length, depth, trial, number, content, got, n_pre + n_suf, n_pre,
                     n_pre / max(1, n_pre + n_suf))


def score(response: str, number: int) -> bool:
    return str(number) in re.findall(r"\d+", response.replace(",", ""))


def load_chat_model(model: str, template: str | None, rope_scaling: str | None, adapter: str | None,
                    max_new_tokens: int):
    from llamafactory.chat import ChatModel

    args = {"model_name_or_path": model, "infer_backend": "huggingface", "do_sample": False,
            "max_new_tokens": max_new_tokens}
    if template:
        args["template"] = template
    if rope_scaling:
        args["rope_scaling"] = rope_scaling
    if adapter:
        args.update(adapter_name_or_path=adapter, finetuning_type="lora")
    try:
        return ChatModel(args)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {model}: {e}") from e


def run_probe(model: str, lengths: list[int], depths: list[float], *, template: str | None = "auto",
              rope_scaling: str | None = None, adapter: str | None = None, trials: int = 1,
              haystack: str | None = None, seed: int = 0, max_new_tokens: int = 16, chat_model=None) -> list[dict]:
    """Every (length, depth, trial) probe; returns the CSV rows."""
    from tqdm import tqdm

    if template == "auto":
        template = families.guess_template(model)
    cm = chat_model or load_chat_model(model, template, rope_scaling, adapter, max_new_tokens)
    tok, tpl = cm.engine.tokenizer, cm.engine.template
    hay = haystack_text(haystack)
    rows = []
    rng = random.Random(seed)
    cells = [(t, L, d) for t in range(trials) for L in lengths for d in depths]
    builders = {}
    with tqdm(total=len(cells), desc="niah", file=sys.stderr, disable=None) as bar:
        for t, length, depth in cells:
            if t not in builders:  # each trial reads the haystack from a different place
                builders[t] = Builder(tok, tpl, hay, max(lengths), shift=t * 7919 % max(1, len(hay) // 2))
            number = rng.randrange(1_000_000, 10_000_000)
            probe = builders[t].build(length, depth, number, t)
            resp = cm.chat([{"role": "user", "content": probe.content}])[0]
            row = {k: v for k, v in asdict(probe).items() if k != "content"}
            row.update(prompt_tokens=resp.prompt_length, correct=int(score(resp.response_text, number)),
                       response=resp.response_text.strip()[:200], actual_depth=round(probe.actual_depth, 4))
            rows.append(row)
            bar.update()
    return rows


def accuracy_grid(rows: list[dict]) -> tuple[list[int], list[float], list[list[float]]]:
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = []
    for d in depths:
        line = []
        for L in lengths:
            hits = [r["correct"] for r in rows if r["length"] == L and r["depth"] == d]
            line.append(sum(hits) / len(hits))
        grid.append(line)
    return lengths, depths, grid


def label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in FIELDS})
    atomic_write_text(path, buf.getvalue())


def write_heatmap(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, grid = accuracy_grid(rows)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.6 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, line in enumerate(grid):
        for j, v in enumerate(line):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieved")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (or hub id with network access)")
    p.add_argument("--lengths", default="1k,2k,4k,8k,12k", help="prompt lengths in tokens (default %(default)s)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths, 0..1 (default %(default)s)")
    p.add_argument("--template", default="auto", help="LLaMA-Factory template (auto: from the model family)")
    p.add_argument("--rope-scaling", choices=["linear", "dynamic"], help="RoPE scaling at inference (factor 2)")
    p.add_argument("--adapter", help="a LoRA adapter folder to probe on top of the model")
    p.add_argument("--trials", type=int, default=1, help="probes per cell (different numbers and haystack)")
    p.add_argument("--haystack", help="filler text: JSONL with an `input` field, or .txt (default: sample papers)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output folder (default: the project's runs/niah/<model>)")


def run(args: argparse.Namespace) -> int:
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: must be at least 1")
    if args.out:
        out = Path(args.out)
    else:
        from llamafactory_ext import project

        out = project.get().runs / "niah" / Path(args.model.rstrip("/")).name
    template = None if args.template in ("", "none") else args.template
    rows = run_probe(args.model, lengths, depths, template=template, rope_scaling=args.rope_scaling,
                     adapter=args.adapter, trials=args.trials, haystack=args.haystack, seed=args.seed,
                     max_new_tokens=args.max_new_tokens)
    write_csv(rows, out / "niah.csv")
    title = f"{Path(args.model.rstrip('/')).name}" + (f" + rope {args.rope_scaling}" if args.rope_scaling else "")
    write_heatmap(rows, out / "niah.png", f"needle in a haystack: {title}")
    lengths, depths, grid = accuracy_grid(rows)
    print("depth  " + " ".join(f"{label(n):>6}" for n in lengths))
    for d, line in zip(depths, grid, strict=True):
        print(f"{d:5.0%}  " + " ".join(f"{v:6.0%}" for v in line))
    ok = [L for j, L in enumerate(lengths) if all(line[j] >= 0.5 for line in grid)]
    print(f"\nlongest length found at every depth (>= 50%): {label(max(ok)) if ok else 'none'}")
    print(f"wrote {out / 'niah.csv'} and {out / 'niah.png'}")
    return 0
