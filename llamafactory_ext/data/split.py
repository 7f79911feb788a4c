"""Split alpaca JSONL into train and test BY PAPER, plus nested training subsets.

All reviews of one paper land on the same side, so no test paper is ever trained on. Records are about
the same paper when they share a `paper_id`, or the paper text (`input`, compared with its whitespace
removed, as `convert --dedup` compares texts), or are linked through other records that do: a review
without `paper_id` of a paper that other reviews name by id goes where they go, and so do two ids whose
records hold the same text. A paper is named by its smallest `paper_id`, or, with none, by the SHA-1 of
its text as written.
`--test-size` counts papers: an integer N takes N papers, a fraction in (0, 1) takes that share of
the papers. The split depends only on the set of papers and `--seed` (not on the order of the file).

Writes, into `--out-dir` (default: beside IN), with IN's stem:
`<stem>_train.jsonl` (in one seeded shuffled order), `<stem>_test.jsonl` (in file order), and for each
of `--sizes` a training subset `<stem>_train_5k.jsonl`, `<stem>_train_15k.jsonl`, ...: the first K records
of the training order, so every smaller subset is contained in every larger one. All files are checked
before any work and written atomically (Ctrl-C and SIGTERM leave the previous files). Two streaming
passes: the first keeps only paper keys and byte offsets, not the records.

    llamafactory-ext split data/build/reviews_12k.jsonl --test-size 500 --sizes 5000,15000 --seed 42
    llamafactory-ext split reviews.jsonl --test-size 0.1 --out-dir data/build/splits
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from llamafactory_ext import UserError, units
from llamafactory_ext.data.convert import text_key
from llamafactory_ext.fileio import atomic_write, check_output

DEFAULT_SEED = 42


def size_name(k: int) -> str:
    """5000 -> '5k', 15000 -> '15k', 500 -> '500', 2500 -> '2500'."""
    return f"{k // 1000}k" if k >= 1000 and k % 1000 == 0 else str(k)


def parse_sizes(text: str) -> list[int]:
    """'5000,15000' or '5k,15k' -> [5000, 15000] records (sorted, unique; the "k" rule of units.py)."""
    return units.counts(text, "--sizes", unit="records")


def parse_test_size(text: str | float | int) -> float | int:
    """'500' -> 500 papers; '0.1' -> 10 % of the papers."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--test-size {text!r} is neither a number of papers nor a fraction") from None
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise UserError(f"--test-size {text!r}: give a number of papers (>= 1) or a fraction between 0 and 1")


def paper_key(record: dict) -> str:
    """The name a record gives its paper: its paper_id, else a hash of the paper text as written."""
    pid = record.get("paper_id")
    if pid is not None and pid != "":
        return f"id:{pid}"
    return "sha1:" + hashlib.sha1(str(record.get("input", "")).encode("utf-8")).hexdigest()


class _Papers:
    """Union-find over what identifies a paper (ids, texts): records that share any of them, directly or
    through other records, are one paper."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@dataclass
class SplitResult:
    train: Path
    test: Path
    counts: dict[str, int]  # file label -> records
    papers: dict[str, int]  # "train"/"test" -> papers
    subsets: dict[int, Path] = field(default_factory=dict)


def _scan(src: Path) -> tuple[list[int], list[int], list[str]]:
    """First pass: byte offset, length and paper of every non-blank line (records are not kept). A paper is
    named by the smallest paper_key of its records."""
    offsets, lengths, nodes, names = [], [], [], []
    papers = _Papers()
    pos = 0
    with open(src, "rb", buffering=1 << 20) as f:
        for lineno, line in enumerate(f, 1):
            if not line.isspace():
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise UserError(f"{src}:{lineno}: invalid JSON ({e}); run `llamafactory-ext convert` first") from None
                if type(record) is not dict:
                    raise UserError(f"{src}:{lineno}: not a JSON object; run `llamafactory-ext convert` first")
                offsets.append(pos)
                lengths.append(len(line))
                text = hashlib.blake2b(text_key(str(record.get("input", ""))), digest_size=16).digest()
                name = paper_key(record)
                if name.startswith("id:"):
                    papers.union(text, name)
                nodes.append(text)
                names.append(name)
            pos += len(line)
    roots = [papers.find(n) for n in nodes]
    smallest: dict = {}
    for root, name in zip(roots, names, strict=True):
        if name < smallest.get(root, "\U0010ffff"):
            smallest[root] = name
    return offsets, lengths, [smallest[r] for r in roots]


def split(src: str | os.PathLike, *, test_size: float | int, sizes: list[int] = (), seed: int = DEFAULT_SEED,
          out_dir: str | os.PathLike | None = None) -> SplitResult:
    """Split `src` by paper; see the module docstring. Returns the paths and counts."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"input file {src} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else src.parent
    stem = src.stem
    train_path = out_dir / f"{stem}_train.jsonl"
    test_path = out_dir / f"{stem}_test.jsonl"
    subsets = {k: out_dir / f"{stem}_train_{size_name(k)}.jsonl" for k in sizes}
    clash = {p for p in (train_path, test_path, *subsets.values()) if p.exists() and p.resolve() == src.resolve()}
    if clash:
        raise UserError(f"an output file would overwrite the input {src}; use --out-dir")
    for path in (train_path, test_path, *subsets.values()):
        check_output(path, "output")
    offsets, lengths, keys = _scan(src)
    if not offsets:
        raise UserError(f"{src} has no records")

    papers = sorted(set(keys))  # sorted: the split depends on the set of papers, not the file order
    n_test = round(len(papers) * test_size) if isinstance(test_size, float) else test_size
    n_test = max(n_test, 1)
    if n_test >= len(papers):
        raise UserError(f"--test-size {test_size} takes {n_test} papers but {src} has only {len(papers)} "
                        f"paper{'s' if len(papers) > 1 else ''}; "
                        "leave some for training")
    rng = random.Random(seed)
    rng.shuffle(papers)
    test_papers = set(papers[:n_test])
    test_idx = [i for i, k in enumerate(keys) if k in test_papers]
    train_idx = [i for i, k in enumerate(keys) if k not in test_papers]
    rng.shuffle(train_idx)  # one shuffled order; the nested subsets are its prefixes
    too_big = [k for k in sizes if k > len(train_idx)]
    if too_big:
        raise UserError(f"--sizes {','.join(map(str, too_big))} exceed the {len(train_idx)} training records "
                        f"({len(papers) - n_test} papers) of {src}; use sizes up to {len(train_idx)}")

    with open(src, "rb") as f, contextlib.ExitStack() as stack:
        train_f = stack.enter_context(atomic_write(train_path))
        test_f = stack.enter_context(atomic_write(test_path))
        subset_fs = [(k, stack.enter_context(atomic_write(p))) for k, p in subsets.items()]

        def read(i: int) -> bytes:
            f.seek(offsets[i])
            line = f.read(lengths[i])
            return line if line.endswith(b"\n") else line + b"\n"

        for i in test_idx:
            test_f.write(read(i))
        for pos, i in enumerate(train_idx):
            line = read(i)
            train_f.write(line)
            for k, sub_f in subset_fs:
                if pos < k:
                    sub_f.write(line)
    counts = {"train": len(train_idx), "test": len(test_idx), **{size_name(k): k for k in sizes}}
    return SplitResult(train_path, test_path, counts, {"train": len(papers) - n_test, "test": n_test}, subsets)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="alpaca JSONL (after convert / truncate)")
    p.add_argument("--test-size", required=True, metavar="N|FRAC",
                   help="test papers: a count (500) or a fraction of the papers (0.1)")
    p.add_argument("--sizes", metavar="K1,K2", help="nested training subsets in records, e.g. 5000,15000 or 5k,15k "
                                                   "(k = 1,000 records)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"shuffle seed (default {DEFAULT_SEED})")
    p.add_argument("--out-dir", metavar="DIR", help="where the files go (default: beside IN)")


def run(args: argparse.Namespace) -> int:
    result = split(args.input, test_size=parse_test_size(args.test_size),
                   sizes=parse_sizes(args.sizes) if args.sizes else [], seed=args.seed, out_dir=args.out_dir)
    print(f"train: {result.counts['train']} records ({result.papers['train']} papers) -> {result.train}")
    print(f"test:  {result.counts['test']} records ({result.papers['test']} papers) -> {result.test}")
    for k, path in result.subsets.items():
        print(f"train_{size_name(k)}: {k} records -> {path}")
    return 0
