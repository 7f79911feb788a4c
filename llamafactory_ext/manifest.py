"""Data manifests: what every built data file was made from and for, written beside it.

`make data` writes `<file>.manifest.json` next to each training and test file: the tokenizer and chat
template its lengths were measured with, the token budget (training: whole records fit `budget`;
inference: papers keep `paper_tokens`), the source file and its sha256, the counts (read / accepted /
rejected by convert, cut / dropped by truncate, records written) and the file's own sha256.
`run sft` refuses a `cutoff_len` below the budget, or another template or tokenizer, before anything
loads; `run predict` checks its test split the same way; a run folder records these hashes (runs.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write_text

VERSION = 1
VOLATILE = ("created",)  # left out of the manifest's hash: rebuilding the same data gives the same hash


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


def write(data_file: str | os.PathLike, **fields) -> dict:
    """Write the manifest of `data_file` (hashing the file); returns it."""
    import time

    data_file = Path(data_file)
    doc = {"version": VERSION, "file": data_file.name, "sha256": sha256_file(data_file), **fields,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(path_for(data_file), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc


def read(data_file: str | os.PathLike) -> dict | None:
    """The manifest beside `data_file`, None when there is none (data registered by hand)."""
    p = path_for(data_file)
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable manifest ({e}); re-run `make data` to rebuild it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{p}: not a manifest (expected a JSON object); re-run `make data`")
    return doc


def digest(doc: dict) -> str:
    """Hash of a manifest without its volatile fields."""
    stable = {k: v for k, v in doc.items() if k not in VOLATILE}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def dataset_file(name: str, info: dict, dataset_dir: str | os.PathLike = ".") -> Path | None:
    """The file a registered dataset points to (None for hub/remote datasets)."""
    entry = info.get(name) or {}
    return Path(dataset_dir) / entry["file_name"] if "file_name" in entry else None


def load_info(dataset_dir: str | os.PathLike = ".") -> dict:
    path = Path(dataset_dir) / "dataset_info.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object of datasets")
    return info
