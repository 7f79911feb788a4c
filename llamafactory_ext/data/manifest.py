"""Data manifests: what every built data file was made from and for, written beside it as `<file>.manifest.json`.

`make data` writes one next to each training and test file: the tokenizer and chat template its lengths were
measured with, the token budget (training: whole records fit `budget`; inference: papers keep `paper_tokens`),
the source file and its sha256, the counts (read / accepted / rejected by convert, cut / dropped by truncate,
records written) and the file's own sha256. `run sft` refuses a `cutoff_len` below the budget, or another
template or tokenizer, before anything loads (data/checks.py); `run predict` checks its test split the same
way; a run folder records the manifests' hashes (train/runs.py). `Manifest` is the one reader of the format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write_text

VERSION = 1
VOLATILE = ("created",)  # left out of the manifest's hash: rebuilding the same data gives the same hash
MODES = ("train", "inference")


def path_for(data_file: str | os.PathLike) -> Path:
    return Path(str(data_file) + ".manifest.json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token counts: the fast tokenizer's full serialization (vocab, merges,
    normalizer, pre-tokenizer, added tokens) and the special tokens, or a slow tokenizer's vocab."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """One data file's manifest. Fields an older manifest lacks are None; `raw` is the file as read (its hash)."""

    file: str
    sha256: str
    mode: str  # "train" (whole records fit `budget`) | "inference" (papers keep `paper_tokens`)
    dataset: str | None = None  # the name it is registered under
    family: str | None = None
    tokenizer: str | None = None  # the model whose tokenizer cut it (as given: a hub id or a project path)
    tokenizer_sha256: str | None = None
    template: str | None = None
    budget: int | None = None  # training: tokens per record
    paper_tokens: int | None = None  # inference: paper tokens kept
    source: str | None = None
    source_sha256: str | None = None
    read: int | None = None
    accepted: int | None = None
    rejected: int | None = None
    test_size: int | None = None  # papers held out
    test_dataset: str | None = None  # training data: the test split that belongs to it
    seed: int | None = None
    split_records: int | None = None
    records: int | None = None
    tokens: int | None = None  # all the records' tokens (training: prompt + review + template), for `plan`'s time
    cut: int | None = None
    dropped: int | None = None
    version: int = VERSION
    created: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, doc: dict, where: str | Path = "manifest") -> Manifest:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        missing = [k for k in ("file", "sha256", "mode") if k not in doc]
        if missing or doc.get("mode") not in MODES:
            what = f"no {', '.join(missing)}" if missing else f"mode {doc.get('mode')!r}"
            raise UserError(f"{where}: not a data manifest ({what}); re-run `make data` to rebuild it")
        return cls(**{k: v for k, v in doc.items() if k in names}, raw=dict(doc))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "raw"}

    def digest(self) -> str:
        """Hash of the manifest as written, without its volatile fields (what a run's identity records)."""
        stable = {k: v for k, v in (self.raw or self.to_dict()).items() if k not in VOLATILE}
        return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()

    @property
    def name_stem(self) -> str | None:
        """`NAME` of `make data ... NAME=NAME` for a `NAME_train` / `NAME_test` dataset, else None."""
        name = self.dataset or ""
        if name.endswith(("_train", "_test")) and not name.startswith("paper_review_"):
            return name.rsplit("_", 1)[0]
        return None


def write(data_file: str | os.PathLike, **fields) -> Manifest:
    """Write the manifest of `data_file` (hashing the file); returns it."""
    import time

    data_file = Path(data_file)
    doc = {"version": VERSION, "file": data_file.name, "sha256": sha256_file(data_file), **fields,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(path_for(data_file), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return Manifest.from_dict(doc, path_for(data_file))


def read(data_file: str | os.PathLike | None) -> Manifest | None:
    """The manifest beside `data_file`, None when there is none (data registered by hand) or no file is given."""
    if data_file is None:
        return None
    p = path_for(data_file)
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable manifest ({e}); re-run `make data` to rebuild it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{p}: not a manifest (expected a JSON object); re-run `make data`")
    return Manifest.from_dict(doc, p)
