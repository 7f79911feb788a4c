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
OUT (`<OUT stem>.lengths.png`). OUT, its rejects file and the histogram are checked before any work and
written atomically (Ctrl-C and SIGTERM leave the previous files).

Speed: each record is tokenized about once (LLaMA-Factory's template is asked for the texts it would
tokenize; they are encoded once with character offsets, and a cut is checked by re-encoding only a
window of ~64 tokens around it: see `Truncator`), within 1.3x the CPU time of tokenizing each record's
texts once (`make bench-data`). `--workers` tokenizer threads (default 2) share one tokenizer: the Rust
tokenizer releases Python's GIL, so 2 threads halve the wall time on 2 cores at the same memory. The
output is byte-identical to measuring every try with the template's own `encode_oneturn`, whatever the
number of threads.

    llamafactory-ext truncate data/build/reviews.jsonl data/build/reviews_12k.jsonl \\
        --tokenizer mistralai/Mistral-7B-Instruct-v0.2 --template mistral --max-tokens 12288
    llamafactory-ext truncate test.jsonl test_infer.jsonl --tokenizer build/tiny/gemma --template gemma \\
        --inference --paper-tokens 7168
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write, check_output, out_and_rejects

DEFAULT_MAX_TOKENS = 12288
DEFAULT_PAPER_TOKENS = 7 * 1024
# Tokenizer threads: the Rust tokenizer releases the GIL, so a second thread halves the wall time on 2 cores
# (`make bench-data`: 0.5x the wall, the same CPU time, +1 % peak RSS); more were not measured here.
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
WINDOW = 64  # tokens re-encoded before a cut to count the cut text (the rest of it is known)
AGREE = 16  # ... of which at least this many must come out as in the full encoding, else the whole text is recounted


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
                        + (f"; similar: {', '.join(near)}" if near else "") + " (see LLaMA-Factory's data/template.py)")
    return get_template_and_fix_tokenizer(tokenizer, DataArguments(template=template))


class _Text(int):
    """A marker in a layout: stands for the tokens of text number int(self)."""


class _Layout:
    """Tokenizer stand-in for LLaMA-Factory's template: `encode` records the text and returns one marker for
    it, so the template's own `encode_oneturn` gives exactly the texts it would tokenize and the special-token
    ids around them, without tokenizing anything."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.texts: list[str] = []

    def __getattr__(self, name):  # bos_token_id, eos_token_id, convert_tokens_to_ids: the real tokenizer's
        return getattr(self._tok, name)

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if add_special_tokens or kwargs:  # not how LLaMA-Factory 0.9.5 encodes: real ids, counted as they are
            return self._tok.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        self.texts.append(text)
        return [_Text(len(self.texts) - 1)]


def _length(items: list[int], counts: list[int]) -> int:
    return sum(counts[x] if type(x) is _Text else 1 for x in items)


class _Tokens:
    """The tokens of one text, read from pieces of Rust encodings: token i -> (id, (start, end)) in characters
    of that text. A piece is (encoding, its ids, its first token, number of tokens, where its text starts in
    this one)."""

    def __init__(self, *pieces):
        self.pieces = [p for p in pieces if p[3] > 0]

    @classmethod
    def of(cls, enc) -> _Tokens:
        return cls((enc, enc.ids, 0, len(enc), 0))  # (the ids list is built once per encoding)

    def __len__(self) -> int:
        return sum(p[3] for p in self.pieces)

    def __getitem__(self, i: int) -> tuple[int, tuple[int, int]]:
        for enc, ids, first, n, shift in self.pieces:
            if i < n:
                a, b = enc.token_to_chars(first + i)
                return ids[first + i], (a + shift, b + shift)
            i -= n
        raise IndexError(i)

    def end(self, k: int) -> int:
        """Where the text of the first k tokens ends."""
        return self[k - 1][1][1] if k > 0 else 0

    def span(self, i: int, j: int, shift: int = 0) -> list[tuple[int, tuple[int, int]]]:
        return [(t, (a + shift, b + shift)) for t, (a, b) in map(self.__getitem__, range(i, j))]


def _sync(got: list, want: list) -> tuple[int, int] | None:
    """Where a re-encoded window falls in step with known tokens: the first u (of the window's first 8) such
    that got[u:] equals want[t:] up to want's end, over at least AGREE tokens -> (u, t); None if it does not."""
    for u in range(min(8, len(got))):
        if got[u] in want:
            t = want.index(got[u])
            if len(want) - t >= AGREE and got[u:u + len(want) - t] == want[t:]:
                return u, t
            return None
    return None


class Truncator:
    """Measures and cuts one record at a time with a tokenizer and a LLaMA-Factory template.

    The rule (`process_exact`, the plain way): the paper's own tokens (the paper encoded alone) are counted;
    a record over budget keeps the first n - excess of them; the cut record is measured with LLaMA-Factory's
    template, and while it is over budget the cut moves back by the overshoot.

    The same result at about one tokenization per record (`process`): the template is asked for the texts it
    would tokenize (`layout`), which are encoded once, with character offsets. The paper's own tokens are
    those of the prompt except near the paper's two ends, so only a window of WINDOW tokens at each end is
    encoded alone (`_alone`). A cut text is counted by re-encoding only its last WINDOW tokens and what
    follows (`_count_cut`). A window is trusted only if its tokens come out as in the full encoding over at
    least AGREE tokens, which ties it to the known tokens before it; otherwise the whole text is encoded
    (counted in `recounts`). Slow (non-Rust) tokenizers, and a paper the template rewrites (a literal
    `{{idx}}` for some templates), take the plain path."""

    def __init__(self, tokenizer, template, *, max_tokens: int, inference: bool = False,
                 paper_tokens: int = DEFAULT_PAPER_TOKENS):
        self.tok, self.template = tokenizer, template
        self.max_tokens, self.inference, self.paper_tokens = max_tokens, inference, paper_tokens
        self.recounts = 0  # cut texts that had to be re-encoded whole
        self._lock = threading.Lock()
        self._backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        if self._backend is not None:
            probe = "Review: [INST] 论文 ünïcödé 😀 </s><s> x\n\n  y"
            # the tokenizer's own encode also sets the backend up (no truncation/padding) as LLaMA-Factory uses it
            if tokenizer.encode(probe, add_special_tokens=False) != self._encode([probe])[0].ids:
                self._backend = None  # the tokenizer class does more than its Rust backend: use the plain path

    # --- the plain path: LLaMA-Factory's encode_oneturn on every try -----------------------------------------
    def encode(self, record: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) exactly as LLaMA-Factory builds them from an alpaca record:
        user turn = instruction + "\\n" + input (empty parts skipped), no system prompt."""
        return self.template.encode_oneturn(self.tok, self._messages(record), "", "")

    def lengths(self, record: dict) -> tuple[int, int]:
        """(prompt length, prompt + response length) in tokens."""
        prompt, response = self.encode(record)
        return len(prompt), len(prompt) + len(response)

    @staticmethod
    def _messages(record: dict) -> list[dict]:
        query = "\n".join(part for part in (record.get("instruction"), record.get("input")) if part)
        return [{"role": "user", "content": query}, {"role": "assistant", "content": record["output"]}]

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

    def process_exact(self, record: dict) -> tuple[dict | None, int, int, str | None]:
        """`process` the plain way (about 3x the tokenization); the reference the fast path reproduces."""
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
        return None, total, total, self._too_long(self.lengths({**record, "input": ""})[1])

    def _too_long(self, need: int) -> str:
        return (f"instruction + review + template take {need} tokens with no paper at all, "
                f"more than --max-tokens {self.max_tokens} leaves for a paper")

    # --- the fast path ---------------------------------------------------------------------------------------
    def layout(self, record: dict) -> tuple[list[int], list[int], list[str]]:
        """(prompt, response, texts): LLaMA-Factory's encoding of the record with each text it would tokenize
        standing as a `_Text(i)` marker for the tokens of texts[i]."""
        lay = _Layout(self.tok)
        prompt, response = self.template.encode_oneturn(lay, self._messages(record), "", "")
        return prompt, response, lay.texts

    def _encode(self, texts: list[str]):
        """The Rust encodings (ids, character offsets) of `texts`, equal to the tokenizer's own
        encode(add_special_tokens=False); Python's GIL is released meanwhile, so threads tokenize in parallel."""
        return self._backend.encode_batch(texts, add_special_tokens=False)

    def _recount(self, text: str) -> int:
        with self._lock:
            self.recounts += 1
        return len(self._encode([text])[0])

    def _count_cut(self, known: _Tokens, m: int, text: str) -> int:
        """Tokens of `text`, which starts with the text of `known`'s tokens 0..m-1 and may differ after it:
        only the text from WINDOW tokens before m on is encoded."""
        t0 = m - WINDOW
        if t0 <= 0:
            return len(self._encode([text])[0])
        start = known[t0][1][0]
        win = _Tokens.of(self._encode([text[start:]])[0])
        at = _sync(win.span(0, min(len(win), WINDOW), start), known.span(t0, m - 3))
        return self._recount(text) if at is None else t0 + at[1] + len(win) - at[0]

    def _alone(self, paper: str, ctx: _Tokens, p0: int, first: int, last: int) -> _Tokens:
        """The tokens of `paper` encoded on its own (what `--paper-tokens` and the cuts count), from its
        tokens `first..last` in the prompt (`ctx`, the paper at p0): they differ only near the paper's ends
        (e.g. "\\n\\n" at the end of a text is one token, "\\n" + "\\n[" before "[/INST]"), so only a window at
        each end is encoded on its own."""
        if last - first < 3 * WINDOW:
            return _Tokens.of(self._encode([paper])[0])
        head_end = ctx[first + WINDOW][1][1] - p0
        tail_start = ctx[last - WINDOW][1][0] - p0
        head, tail = map(_Tokens.of, self._encode([paper[:head_end], paper[tail_start:]]))
        at_head = _sync(head.span(0, len(head)), ctx.span(first, first + WINDOW - 3, -p0))
        at_tail = _sync(tail.span(0, min(len(tail), WINDOW), tail_start), ctx.span(last - WINDOW, last - 3, -p0))
        if at_head is None or at_tail is None:
            with self._lock:
                self.recounts += 1
            return _Tokens.of(self._encode([paper])[0])
        (u, t), (v, t2) = at_head, at_tail
        mid, end = first + t, last - WINDOW + t2
        (enc, ids, *_), = ctx.pieces
        return _Tokens((*head.pieces[0][:2], 0, u, 0), (enc, ids, mid, end - mid, -p0),
                       (*tail.pieces[0][:2], v, len(tail) - v, tail_start))

    def process(self, record: dict) -> tuple[dict | None, int, int, str | None]:
        """-> (record to write or None if dropped, length before, length after, drop reason).

        Lengths are full sequences (prompt + review) in training mode, prompts in inference mode."""
        if self._backend is None:
            return self.process_exact(record)
        paper = record["input"]
        prompt, response, texts = self.layout(record)
        query = "\n".join(part for part in (record.get("instruction"), paper) if part)
        ti = next((i for i, t in enumerate(texts) if query in t), None)
        if ti is None:  # the template changed the text
            return self.process_exact(record)
        p1 = texts[ti].index(query) + len(query)
        p0 = p1 - len(paper)
        encs = self._encode(texts)
        counts = [len(e) for e in encs]
        prompt_len = _length(prompt, counts)
        total = prompt_len + _length(response, counts)
        if not self.inference and total <= self.max_tokens:
            return record, total, total, None
        enc = encs[ti]
        # the paper's own tokens, derived from its tokens in the prompt (first..last overlap it)
        first = enc.char_to_token(p0) if paper else 0
        last = enc.char_to_token(p1 - 1) if paper else -1
        if first is None or last is None:  # characters the tokenizer drops: the plain path
            return self.process_exact(record)
        while last + 1 < len(enc) and enc.token_to_chars(last + 1)[0] < p1:  # a character split into tokens
            last += 1
        ctx = _Tokens.of(enc)
        alone = self._alone(paper, ctx, p0, first, last)

        def with_paper(cut: str) -> tuple[dict, list[int]] | None:
            """The record with paper `cut` and its text counts; None if the template lays it out otherwise
            than the prompt text with the paper spliced."""
            new = {**record, "input": cut}
            spliced = texts[ti][:p0 + len(cut)] + texts[ti][p1:]
            if self.layout(new)[2] != [*texts[:ti], spliced, *texts[ti + 1:]]:
                return None
            m = (enc.char_to_token(p0 + len(cut) - 1) if cut else None) or 0  # tokens before m are in the cut
            return new, [*counts[:ti], self._count_cut(ctx, m, spliced), *counts[ti + 1:]]

        if self.inference:
            if len(alone) <= self.paper_tokens:
                return record, prompt_len, prompt_len, None
            k = self.paper_tokens
            while True:  # re-encoding the cut text can give more tokens than k (merges at the cut): shrink
                cut = paper[:alone.end(k)]
                over = self._count_cut(alone, k - 1, cut) - self.paper_tokens
                if over <= 0:
                    break
                k -= over
            done = with_paper(cut)
            if done is None:
                return self.process_exact(record)
            return done[0], prompt_len, _length(prompt, done[1]), None

        k = len(alone) - (total - self.max_tokens)  # the template overhead is (nearly) additive: one step usually fits
        while k > 0:
            cut = paper[:alone.end(k)]
            if not cut.strip():
                break
            done = with_paper(cut)
            if done is None:
                return self.process_exact(record)
            after = _length(prompt, done[1]) + _length(response, done[1])
            if after <= self.max_tokens:
                return done[0], total, after, None
            k -= after - self.max_tokens
        prompt, response, texts = self.layout({**record, "input": ""})
        counts = [len(e) for e in self._encode(texts)]
        return None, total, total, self._too_long(_length(prompt, counts) + _length(response, counts))


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


def _results(truncator: Truncator, lines, workers: int):
    """_process_line over `lines`, in order; with workers > 1, that many threads tokenize at once (a few
    records ahead of the writer, so memory stays flat)."""
    if workers == 1:
        for lineno, line in lines:
            yield _process_line(truncator, lineno, line)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="truncate")
    pending = collections.deque()
    try:
        for lineno, line in lines:
            pending.append(pool.submit(_process_line, truncator, lineno, line))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class TruncateStats:
    records: int = 0  # written to OUT
    cut: int = 0  # of those, with a shortened paper
    dropped: int = 0  # too long even with no paper: in the rejects file
    before: list[int] = field(default_factory=list)  # token lengths of the written records, before cutting
    after: list[int] = field(default_factory=list)  # ... and after
    dropped_ids: list = field(default_factory=list)
    recounts: int = 0  # cut texts counted by re-encoding them whole (the window check did not hold; see Truncator)
    workers: int = 1
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


def truncate(src: str | os.PathLike, out: str | os.PathLike, *, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS,
             template: str = "mistral", inference: bool = False, paper_tokens: int = DEFAULT_PAPER_TOKENS,
             workers: int | None = None, plot: bool = True) -> TruncateStats:
    """Truncate the papers of alpaca JSONL `src` into `out` (see the module docstring).

    Returns a TruncateStats: `records` written to `out`, of which `cut` have a shortened paper, and `dropped`
    (too long even without a paper, in `out.rejects.jsonl`). `workers`: tokenizer threads (None = the default,
    DEFAULT_WORKERS); they share one tokenizer, so memory does not grow with them. Raises UserError, before any
    work, for a missing input, an output that cannot be written or a bad setting, and when nothing fits.
    `tokenizer`: a model folder or hub id, or a tokenizer already loaded with `load_tokenizer` (loaded once for
    several files)."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise UserError(f"input file {src} does not exist")
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"OUT {out} is the input file; choose another output path")
    if max_tokens < 16:
        raise UserError(f"--max-tokens {max_tokens} is too small to hold a prompt and a review")
    if inference and paper_tokens < 1:
        raise UserError(f"--paper-tokens must be at least 1 (got {paper_tokens})")
    workers = DEFAULT_WORKERS if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    rejects = Path(str(out) + ".rejects.jsonl")
    png = out.with_name(out.stem + ".lengths.png")
    for what, path in (("OUT", out), ("the rejects file", rejects), *((("the histogram", png),) if plot else ())):
        check_output(path, what)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
    truncator = Truncator(tok, load_template(tok, template), max_tokens=max_tokens, inference=inference,
                          paper_tokens=paper_tokens)
    stats = TruncateStats(workers=workers)

    from tqdm import tqdm

    with tqdm(total=src.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc="truncate", disable=None,
              delay=1.0, file=sys.stderr, dynamic_ncols=True) as bar, out_and_rejects(out, rejects) as (out_f, rej_f):
        for lineno, size, blob, before, after, reason, error, paper_id in _results(truncator, _lines(src), workers):
            bar.update(size)
            if error is not None:
                raise UserError(f"{src}:{lineno}: {error}; truncate reads the output of `llamafactory-ext convert`")
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
    stats.recounts = truncator.recounts
    stats.out = out if stats.records else None
    stats.rejects = rejects if stats.dropped else None
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
                   help=f"tokenizer threads, sharing one tokenizer (default {DEFAULT_WORKERS}); the output is identical "
                        "whatever the number")
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
