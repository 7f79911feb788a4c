"""Add or update one alpaca dataset in LLaMA-Factory's `dataset_info.json`.

The entry names all three alpaca columns (`instruction`/`input`/`output`): LLaMA-Factory turns any
column a `columns` object leaves out into None, which would silently train without the instruction.
`file_name` is relative to the folder of dataset_info.json when FILE is inside it, else absolute (both
work with LLaMA-Factory's `dataset_dir`). Every other entry and key is kept as it was, in order. The
file is rewritten atomically under a lock (`dataset_info.json.lock`), so concurrent registrations do
not lose each other's entries (Ctrl-C and SIGTERM leave the previous file, never half of one). A folder,
a file that is not UTF-8 JSON, or an unwritable place given as `--dataset-info` is a one-line error before
anything is written. A different existing entry of the same name is only replaced with `--force`;
registering the identical entry again does nothing.

    llamafactory-ext register reviews_train_5k data/build/reviews_train_5k.jsonl
    llamafactory-ext register reviews_test data/build/reviews_test.jsonl --dataset-info data/dataset_info.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write_text, check_output

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
DEFAULT_DATASET_INFO = "dataset_info.json"


def entry_for(file: str | os.PathLike, dataset_info: str | os.PathLike) -> dict:
    """The dataset_info.json entry for `file`, with the path made relative to dataset_info's folder if inside it."""
    file = Path(file).resolve()
    base = Path(dataset_info).resolve().parent
    file_name = file.relative_to(base).as_posix() if file.is_relative_to(base) else str(file)
    return {"file_name": file_name, "formatting": "alpaca", "columns": dict(ALPACA_COLUMNS)}


def _first_record(file: Path) -> dict:
    """The first record of a .jsonl (first non-blank line) or .json (array or JSON lines) file."""
    if file.suffix not in (".jsonl", ".json"):
        raise UserError(f"{file}: LLaMA-Factory reads alpaca data from .jsonl or .json files here; rename it")
    with open(file, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if file.suffix == ".json" and head.startswith(b"["):
            try:
                data = json.load(f)
            except ValueError as e:
                raise UserError(f"{file} is not valid JSON: {e}") from None
            if not data:
                raise UserError(f"{file} holds an empty list; it has no records")
            return data[0]
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    return json.loads(line.decode("utf-8-sig"))
                except ValueError as e:
                    raise UserError(f"{file}:{lineno}: invalid JSON ({e}); run `llamafactory-ext convert` on it") from None
    raise UserError(f"{file} is empty; it has no records")


def check_dataset_file(file: str | os.PathLike) -> None:
    """FILE exists and its first record is an alpaca record (string instruction / input / output)."""
    file = Path(file)
    if not file.is_file():
        raise UserError(f"dataset file {file} does not exist" if not file.exists() else f"{file} is not a file")
    record = _first_record(file)
    if not isinstance(record, dict):
        raise UserError(f"{file}: the first record is not a JSON object")
    bad = [k for k in ALPACA_COLUMNS.values() if not isinstance(record.get(k), str)]
    if bad:
        raise UserError(f"{file}: the first record has no string {', '.join(map(repr, bad))} "
                        f"(it has {', '.join(map(repr, record)) or 'no fields'}); "
                        "make it with `llamafactory-ext convert`")


def _load(path: Path) -> dict:
    """dataset_info.json as a dict ({} when missing or empty); a one-line UserError when it is not UTF-8 JSON."""
    path = Path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start + 1} is 0x{raw[e.start]:02x}); LLaMA-Factory "
                        "reads it as UTF-8 JSON: fix or remove it (it was not changed)") from None
    if not text.strip():
        return {}
    try:
        info = json.loads(text)
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix or remove it (it was not changed)") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} must hold a JSON object {{name: entry}}, not {type(info).__name__}; fix it "
                        "(it was not changed)")
    return info


def load_info(dataset_dir: str | os.PathLike = ".") -> dict:
    """The registered datasets of `dataset_dir/dataset_info.json` (LLaMA-Factory's `dataset_dir`): the one reader."""
    return _load(Path(dataset_dir) / DEFAULT_DATASET_INFO)


def dataset_file(name: str, info: dict, dataset_dir: str | os.PathLike = ".") -> Path | None:
    """The file a registered dataset points to, as LLaMA-Factory resolves it (None for hub/remote datasets)."""
    entry = info.get(name)
    if not isinstance(entry, dict) or "file_name" not in entry:
        return None
    return Path(dataset_dir) / str(entry["file_name"])


def register(name: str, file: str | os.PathLike, dataset_info: str | os.PathLike = DEFAULT_DATASET_INFO,
             force: bool = False) -> str:
    """Register `file` as dataset `name`; returns "added", "updated" or "unchanged".

    Raises UserError for a bad name, a missing/non-alpaca file, a malformed dataset_info.json, or a
    different entry of the same name without `force`."""
    if not name or re.search(r"[\s,]", name):
        raise UserError(f"dataset name {name!r} must be non-empty without spaces or commas "
                        "(LLaMA-Factory splits `dataset: a,b` on commas)")
    check_dataset_file(file)
    path = Path(dataset_info)
    if path.is_dir():
        raise UserError(f"--dataset-info {path} is a folder; give the JSON file, e.g. {path / DEFAULT_DATASET_INFO}")
    check_output(path, "--dataset-info")
    _load(path)  # a malformed file fails here, before the lock is taken
    entry = entry_for(file, path)
    from filelock import FileLock

    with FileLock(str(path) + ".lock", timeout=60):
        info = _load(path)
        old = info.get(name)
        if old == entry:
            return "unchanged"
        if old is not None and not force:
            raise UserError(f"{path} already has a different dataset {name!r}: {json.dumps(old)}; "
                            f"use --force to replace it with {json.dumps(entry)}, or pick another name")
        info[name] = entry  # an existing key keeps its position
        atomic_write_text(path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return "updated" if old is not None else "added"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="dataset name to use in recipes (`dataset: NAME`)")
    p.add_argument("file", metavar="FILE", help="alpaca JSONL file")
    p.add_argument("--dataset-info", default=DEFAULT_DATASET_INFO, metavar="PATH",
                   help=f"the dataset_info.json to update (default ./{DEFAULT_DATASET_INFO}; created if missing)")
    p.add_argument("--force", action="store_true", help="replace a different existing entry of the same name")


def run(args: argparse.Namespace) -> int:
    status = register(args.name, args.file, args.dataset_info, force=args.force)
    if status == "unchanged":
        print(f"{args.name}: already registered identically in {args.dataset_info}; nothing to do")
    else:
        entry = entry_for(args.file, args.dataset_info)
        print(f"{args.name}: {status} in {args.dataset_info} (file_name {entry['file_name']})")
    return 0
