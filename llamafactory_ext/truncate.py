"""Cut papers (the alpaca `input`), never reviews, so that every record fits a token budget.

Training mode (default): instruction + paper + review + the chat template's own tokens must fit
`--max-tokens` (= the `cutoff_len` you train with). Lengths are measured exactly the way LLaMA-Factory
will encode the record: its own template (`--template`, e.g. `mistral`, `gemma`) and the model's real
tokenizer. So LLaMA-Factory's `cutoff_len` never cuts anything afterwards, in particular never the
end of a review. A paper is cut on a token boundary; the cut text is re-encoded and shrunk until it
fits. Records whose instruction + review alone exceed the budget cannot be saved by cutting the paper:
they are dropped and listed in `OUT.rejects.jsonl`.

Inference mode (`--inference`): keep only the first `--paper-tokens` tokens of each paper (default
7168 = 7 x 1024), leaving room for the generated review.

Prints how many records were cut and a token-length summary, and draws a length histogram next to
OUT (`<OUT stem>.lengths.png`). OUT is written atomically.

    llamafactory-ext truncate data/build/reviews.jsonl data/build/reviews_12k.jsonl \\
        --tokenizer mistralai/Mistral-7B-Instruct-v0.2 --template mistral --max-tokens 12288
    llamafactory-ext truncate test.jsonl test_infer.jsonl --tokenizer build/tiny/gemma --template gemma \\
        --inference --paper-tokens 7168
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write

DEFAULT_MAX_TOKENS = 12288
DEFAULT_PAPER_TOKENS = 7 * 1024
AUTO_WORKERS_BYTES = 16 << 20  # below this, starting worker processes (~5 s each) costs more than it saves


class _Discard(Exception):
    """Abort an atomic_write block without committing."""


def load_tokenizer(name_or_path: str):
    """The model's tokenizer, loaded the way LLaMA-Factory loads it (fast, right padding).

    A hub id is only looked up in the local cache when HF_HUB_OFFLINE is set."""
    from transformers import AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, use_fast=True, split_special_tokens=False,
                                             padding_side="right", local_files_only=offline)
    except (OSError, ValueError) as e:
        hint = " (HF_HUB_OFFLINE is set: give a local folder or a model already in the HF cache)" if offline else ""
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}{hint}: {e}") from None


def load_template(tokenizer, template: str):
    """LLaMA-Factory's own template object (it also fixes the tokenizer's eos/pad exactly as training does)."""
    from llamafactory.data import TEMPLATES, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments

    if template not in TEMPLATES:
        near = sorted(t for t in TEMPLATES if t.startswith(template[:3]))[:10]
        raise UserError(f"LLaMA-Factory has no template {template!r}"
                        + (f"; similar: {', '.join(near)}" if near else "") + " (the model families here: mistral, gemma)")
    return get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template))


class Truncator:
    """Measures and cuts one record at a time with a tokenizer and a LLaMA-Factory template."""

    def __init__(self, tokenizer, template, *, max_tokens: int, inference: bool = False,
                 paper_tokens: int = DEFAULT_PAPER_TOKENS):
        self.tok, self.template = tokenizer, template
        self.max_tokens, self.inference, self.paper_tokens = max_tokens, inference, paper_tokens

    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) exactly as LLaMA-Factory builds them from an alpaca record:
        user turn = instruction + "\\n" + input (empty parts skipped), no system prompt."""
        query = "\n".join(part for part in (record.get("instruction"), record.get("input")) if part)
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": record["output"]}]
        return self.template.encode_oneturn(self.tok, messages, "", "")

    def lengths(self, record: dict) -> tuple[int, int]:
        prompt, response = self.encode(record)
        return len(prompt), len(prompt) + len(response)

    def _prefix_fn(self, text: str):
        """(number of tokens of `text`, function k -> the text of its first k tokens)."""
        if getattr(self.tok, "is_fast", False):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
            return len(offsets), lambda k: text[:offsets[k - 1][1]] if k > 0 else ""
        ids = self.tok.encode(text, add_special_tokens=False)
        # a slow tokenizer: decode the ids; a cut inside a multi-byte character decodes to U+FFFD, drop it
        return len(ids), lambda k: self.tok.decode(ids[:k], skip_special_tokens=False).rstrip("\ufffd")

    def _n_tokens(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def process(self, record: dict) -> tuple[dict | None, int, int, str | None]:
        """-> (record to write or None if dropped, length before, length after, drop reason).

        Lengths are full sequences (prompt + review) in training mode, prompts in inference mode."""
        paper = record["input"]
        prompt_len, total = self.lengths(record)
        if self.inference:
            n, prefix = self._prefix_fn(paper)
            if n <= self.paper_tokens:
                return record, prompt_len, prompt_len, None
            k = self.paper_tokens
            while True:  # re-encoding the cut text can give more tokens than k (merges at the cut): shrink
                cut = prefix(k)
                over = self._n_tokens(cut) - self.paper_tokens
                if over <= 0:
                    break
                k -= over
            new = {**record, "input": cut}
            return new, prompt_len, self.lengths(new)[0], None
        if total <= self.max_tokens:
            return record, total, total, None
        n, prefix = self._prefix_fn(paper)
        k = n - (total - self.max_tokens)  # the template overhead is (nearly) additive: one step usually fits
        while k > 0:
            cut = prefix(k)
            if not cut.strip():
                break
            new = {**record, "input": cut}
            after = self.lengths(new)[1]
            if after <= self.max_tokens:
                return new, total, after, None
            k -= after - self.max_tokens
        need = self.lengths({**record, "input": ""})[1]
        return None, total, total, (f"instruction + review + template take {need} tokens with no paper at all, "
                                    f"more than --max-tokens {self.max_tokens} leaves for a paper")


# --- worker processes (--workers > 1): each loads its own tokenizer and template once ----------------
_WORKER: Truncator | None = None


def _init_worker(tokenizer: str, template: str, kwargs: dict) -> None:
    global _WORKER
    import logging

    logging.getLogger("llamafactory").setLevel(logging.WARNING)
    tok = load_tokenizer(tokenizer)
    _WORKER = Truncator(tok, load_template(tok, template), **kwargs)


def _work(item: tuple[int, bytes]):
    return _process_line(_WORKER, *item)


def _process_line(truncator: Truncator, lineno: int, line: bytes):
    """-> (lineno, bytes read, output bytes, before, after, drop reason, error, paper_id)."""
    size = len(line)
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return lineno, size, None, 0, 0, None, f"invalid JSON ({e})", None
    if type(record) is not dict or not all(isinstance(record.get(k), str) for k in ("input", "output")):
        return lineno, size, None, 0, 0, None, "not an alpaca record with string 'input' and 'output'", None
    new, before, after, reason = truncator.process(record)
    if reason is None:
        blob = orjson.dumps(new, option=orjson.OPT_APPEND_NEWLINE)
    else:
        blob = orjson.dumps({"line": lineno, "kind": "too long", "reason": reason, "record": record},
                            option=orjson.OPT_APPEND_NEWLINE)
    return lineno, size, blob, before, after, reason, None, record.get("paper_id")


@dataclass
class TruncateStats:
    records: int = 0  # written to OUT
    cut: int = 0  # of those, with a shortened paper
    dropped: int = 0  # too long even with no paper: in the rejects file
    before: list[int] = field(default_factory=list)  # token lengths of the written records, before cutting
    after: list[int] = field(default_factory=list)  # ... and after
    dropped_ids: list = field(default_factory=list)
    out: Path | None = None
    rejects: Path | None = None
    plot: Path | None = None

    def summary(self, what: str) -> str:
        """A short report: counts and a min/median/p90/max table of token lengths."""
        lines = [f"{self.records} records written, {self.cut} with the paper cut, {self.dropped} dropped"]
        if self.dropped:
            shown = ", ".join(map(str, self.dropped_ids[:5])) + (" ..." if self.dropped > 5 else "")
            lines.append(f"dropped (review + instruction alone too long): {shown} -> {self.rejects}")
        if self.records:
            lines.append(f"{what:>24}  {'min':>7} {'median':>7} {'p90':>7} {'max':>7}")
            for name, values in (("before", self.before), ("after", self.after)):
                q = quantiles(values)
                lines.append(f"{name:>24}  " + " ".join(f"{q[k]:>7}" for k in ("min", "median", "p90", "max")))
        return "\n".join(lines)


def quantiles(values: list[int]) -> dict[str, int]:
    """min / median / p90 / max by the nearest-rank method (exact values that occur in the data)."""
    v = sorted(values)

    def rank(p: float) -> int:
        return v[max(0, min(len(v) - 1, -(-len(v) * p // 100) - 1))] if p else v[0]

    return {"min": v[0], "median": rank(50), "p90": rank(90), "max": v[-1]}


def plot_lengths(stats: TruncateStats, out: Path, *, max_tokens: int | None, what: str) -> Path:
    """Histogram of token lengths before and after, saved as `<OUT stem>.lengths.png` beside OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out.with_name(out.stem + ".lengths.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    hi = max(stats.before + stats.after)
    bins = [hi * i / 50 for i in range(51)]
    ax.hist(stats.before, bins=bins, alpha=0.5, label=f"before (n={len(stats.before)})")
    ax.hist(stats.after, bins=bins, alpha=0.6, label=f"after ({stats.cut} cut)")
    if max_tokens is not None:
        ax.axvline(max_tokens, color="black", linestyle="--", label=f"budget {max_tokens}")
    ax.set_xlabel(what)
    ax.set_ylabel("records")
    ax.set_title(f"{out.name}: token lengths")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def _lines(path: Path):
    with open(path, "rb", buffering=1 << 20) as f:
        for lineno, line in enumerate(f, 1):
            if not line.isspace():
                yield lineno, line


def truncate(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer: str, max_tokens: int = DEFAULT_MAX_TOKENS,
             template: str = "mistral", inference: bool = False, paper_tokens: int = DEFAULT_PAPER_TOKENS,
             workers: int | None = None, plot: bool = True) -> TruncateStats:
    """Truncate the papers of alpaca JSONL `src` into `out` (see the module docstring).

    `workers`: tokenizer processes; None = one for small files (< 16 MB), else one per core up to 8."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise UserError(f"input file {src} does not exist")
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"OUT {out} is the input file; choose another output path")
    if max_tokens < 16:
        raise UserError(f"--max-tokens {max_tokens} is too small to hold a prompt and a review")
    if inference and paper_tokens < 1:
        raise UserError(f"--paper-tokens must be at least 1 (got {paper_tokens})")
    if workers is None:
        workers = 1 if src.stat().st_size < AUTO_WORKERS_BYTES else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    kwargs = {"max_tokens": max_tokens, "inference": inference, "paper_tokens": paper_tokens}
    rejects = Path(str(out) + ".rejects.jsonl")
    stats = TruncateStats()

    from tqdm import tqdm

    with contextlib.ExitStack() as stack:
        if workers > 1:
            import multiprocessing as mp

            # spawn, not fork: the parent may hold torch/tokenizers threads; each worker loads its own copy
            pool = stack.enter_context(mp.get_context("spawn").Pool(workers, _init_worker, (tokenizer, template, kwargs)))
            results = pool.imap(_work, _lines(src), chunksize=4)
        else:
            tok = load_tokenizer(tokenizer)
            truncator = Truncator(tok, load_template(tok, template), **kwargs)
            results = (_process_line(truncator, n, line) for n, line in _lines(src))
        bar = stack.enter_context(tqdm(total=src.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                       desc="truncate", disable=None, delay=1.0, file=sys.stderr, dynamic_ncols=True))
        try:
            with atomic_write(rejects) as rej_f:
                try:
                    with atomic_write(out) as out_f:
                        for lineno, size, blob, before, after, reason, error, paper_id in results:
                            bar.update(size)
                            if error is not None:
                                raise UserError(f"{src}:{lineno}: {error}; truncate reads the output of "
                                                "`llamafactory-ext convert`")
                            if reason is not None:
                                stats.dropped += 1
                                stats.dropped_ids.append(paper_id if paper_id is not None else f"line {lineno}")
                                rej_f.write(blob)
                                continue
                            stats.records += 1
                            stats.cut += after != before
                            stats.before.append(before)
                            stats.after.append(after)
                            out_f.write(blob)
                        if stats.records == 0:
                            raise _Discard
                    stats.out = out
                except _Discard:
                    pass
                if not stats.dropped:
                    raise _Discard
            stats.rejects = rejects
        except _Discard:
            with contextlib.suppress(FileNotFoundError):
                rejects.unlink()
    if stats.out is None:
        if stats.dropped:
            raise UserError(f"no record of {src} fits --max-tokens {max_tokens}: all {stats.dropped} were dropped "
                            f"(reasons in {rejects}); {out} not written. Raise --max-tokens.")
        raise UserError(f"{src} has no records; {out} not written")
    if plot:
        stats.plot = plot_lengths(stats, out, max_tokens=None if inference else max_tokens,
                                  what="prompt tokens" if inference else "prompt + review tokens")
    return stats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="alpaca JSONL (the output of `llamafactory-ext convert`)")
    p.add_argument("output", metavar="OUT", help="alpaca JSONL with the papers cut to fit (written atomically)")
    p.add_argument("--tokenizer", required=True, metavar="PATH_OR_ID",
                   help="the model (folder or hub id) whose tokenizer counts the tokens")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"token budget per record = the cutoff_len you train with (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--template", default="mistral",
                   help="LLaMA-Factory chat template of the model (default mistral; gemma for Gemma)")
    p.add_argument("--inference", action="store_true",
                   help="inference mode: keep only the first --paper-tokens tokens of each paper")
    p.add_argument("--paper-tokens", type=int, default=DEFAULT_PAPER_TOKENS,
                   help=f"paper tokens kept in inference mode (default {DEFAULT_PAPER_TOKENS})")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: 1 for files under 16 MB, else one per CPU core, at most 8); "
                        "the output is identical whatever the number")
    p.add_argument("--no-plot", action="store_true", help="do not write the length histogram")


def run(args: argparse.Namespace) -> int:
    stats = truncate(args.input, args.output, tokenizer=args.tokenizer, max_tokens=args.max_tokens,
                     template=args.template, inference=args.inference, paper_tokens=args.paper_tokens,
                     workers=args.workers, plot=not args.no_plot)
    what = "prompt tokens" if args.inference else "prompt + review tokens"
    print(stats.summary(what))
    over = sum(n > args.max_tokens for n in stats.after) if args.inference else 0
    if over:
        print(f"warning: {over} prompts are longer than --max-tokens {args.max_tokens} even with "
              f"--paper-tokens {args.paper_tokens}; lower --paper-tokens so prompt + generated review fit the model",
              file=sys.stderr)
    print(f"wrote {stats.out}" + (f"; histogram {stats.plot}" if stats.plot else ""))
    return 0
