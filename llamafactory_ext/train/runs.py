"""Run folders: their name, their identity, what counts as trained, and which checkpoint a run resumes from.

A run lives in `runs/<MODEL>_<DATA>/` (or `runs/<RUN>/` with RUN=<name>): `run.json` (what defines the run),
`sft_args.yaml` (the exact arguments LLaMA-Factory got), `adapter/` (LoRA adapter, checkpoint-N, loss
plot), `merged/`, `predict/`.

A run is trained when it holds a merged model (`merged/config.json`) or a finished LoRA adapter
(`adapter/adapter_config.json` and its weights): `trained()` is that definition, for predict, review, the
WebUI's lists and `make merge`.

Identity = the base model, the chat template, `cutoff_len`, the LoRA/quantization shape and every
training data file with its sha256 and manifest hash. RESUME=auto only continues a run whose identity is
unchanged; anything else stops with exit 2 and says what changed.

A checkpoint is resumable when its trainer_state.json parses and every weight/optimizer file is whole
(safetensors: header + size; torch .pt/.bin/.pth: an intact zip). A process killed while saving leaves a
newer, broken folder: it is moved aside to `runs/<run>/broken/` (never deleted) and the run continues from
the newest whole checkpoint, or starts over when there is none.
"""

from __future__ import annotations

import json
import re
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.data import manifest
from llamafactory_ext.data.register import dataset_file, load_info

IDENTITY_FILE = "run.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft writes (LLaMA-Factory: CHECKPOINT_NAMES)
# recipe keys that define what a checkpoint holds; changing one makes it another run
SHAPE_KEYS = ("model_name_or_path", "template", "cutoff_len", "finetuning_type", "lora_rank", "lora_alpha",
              "lora_target", "quantization_bit", "quantization_type", "rope_scaling")


def run_name(model: str, data: str, run: str | None = None) -> str:
    """The folder name under runs/: RUN=<name>, else <MODEL>_<DATA>."""
    if run:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", run):
            raise UserError(f"RUN={run!r}: use letters, digits, '_', '-' and '.' (it names the folder runs/{run})")
        return run
    return f"{model}_{data}"


# ---------------------------------------------------------------------------------------- trained runs
@dataclass(frozen=True)
class Trained:
    """A trained run folder: its merged model and/or its finished LoRA adapter."""

    dir: Path
    merged: Path | None
    adapter: Path | None

    @property
    def stamp(self) -> float:
        """When it was last trained or merged (newest first in lists)."""
        files = [self.merged / "config.json"] if self.merged else []
        files += [self.adapter / n for n in ("adapter_config.json", *ADAPTER_WEIGHTS)] if self.adapter else []
        return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def trained(rdir: str | Path) -> Trained | None:
    """`rdir` as a trained run (see the module docstring), None when it is not one."""
    rdir = Path(rdir)
    merged = rdir / "merged"
    adapter = rdir / "adapter"
    has_merged = (merged / "config.json").is_file()
    has_adapter = (adapter / "adapter_config.json").is_file() and any((adapter / n).is_file() for n in ADAPTER_WEIGHTS)
    if not (has_merged or has_adapter):
        return None
    return Trained(rdir, merged if has_merged else None, adapter if has_adapter else None)


def trained_runs(runs_dir: str | Path) -> list[Trained]:
    """Every trained run under `runs_dir`, newest first."""
    runs_dir = Path(runs_dir)
    found = [t for d in (runs_dir.iterdir() if runs_dir.is_dir() else ()) if d.is_dir() and (t := trained(d))]
    return sorted(found, key=lambda t: (-t.stamp, t.dir.name))


# ---------------------------------------------------------------------------------------- identity
def identity(args: dict, dataset_dir: str | Path) -> dict:
    """What defines a run (see the module docstring); `dataset_dir` as LLaMA-Factory resolves it."""
    info = load_info(dataset_dir)
    data = {}
    for name in filter(None, (n.strip() for n in str(args.get("dataset") or "").split(","))):
        path = dataset_file(name, info, dataset_dir)
        # as the arguments name it (relative to where LLaMA-Factory runs)
        entry = {"file": str(dataset_file(name, info, str(args.get("dataset_dir", ".")))) if path else None}
        if path is not None and path.is_file():
            entry["sha256"] = manifest.sha256_file(path)
            doc = manifest.read(path)
            entry["manifest"] = doc.digest() if doc else None
        data[name] = entry
    return {**{k: args.get(k) for k in SHAPE_KEYS}, "datasets": data}


def recorded_identity(rdir: Path) -> dict | None:
    """The identity a run folder recorded; for runs made before run.json, what its sft_args.yaml says."""
    path = rdir / IDENTITY_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path} is not valid JSON; RESUME=never starts the run over "
                            "(the old one is moved aside)") from None
    saved = rdir / "sft_args.yaml"
    if saved.is_file():
        from llamafactory_ext.fileio import load_yaml

        args = load_yaml(saved)
        names = filter(None, (n.strip() for n in str(args.get("dataset") or "").split(",")))
        return {**{k: args.get(k) for k in SHAPE_KEYS}, "datasets": {n: {} for n in names}}
    return None


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two identities, one phrase each; keys the old one lacks are not compared."""
    out = [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in SHAPE_KEYS if k in old and old[k] != new.get(k)]
    old_ds, new_ds = old.get("datasets") or {}, new.get("datasets") or {}
    if set(old_ds) != set(new_ds):
        out.append(f"dataset: {','.join(old_ds) or '-'} -> {','.join(new_ds) or '-'}")
    else:
        for name, entry in old_ds.items():
            for key, what in (("sha256", "file content"), ("manifest", "manifest (how it was built)")):
                if entry.get(key) and entry[key] != new_ds[name].get(key):
                    out.append(f"dataset {name}: {what} changed since this run started")
                    break
    return out


def write_identity(rdir: Path, ident: dict) -> None:
    from llamafactory_ext.fileio import atomic_write_text

    atomic_write_text(rdir / IDENTITY_FILE, json.dumps(ident, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoints(output_dir: Path) -> list[Path]:
    """`checkpoint-N` folders, oldest first."""
    found = []
    for p in output_dir.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _safetensors_problem(path: Path) -> str | None:
    """None when the header parses and the file is exactly as long as the header says."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return "truncated (header longer than the file)"
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "unreadable safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) != size:
        return f"truncated ({size} bytes, the header describes {8 + n + max(ends, default=0)})"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """None when `ckpt` can be resumed from, else what is wrong, naming the file."""
    state = ckpt / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except OSError:
        return f"{state.name} is missing (the run was killed while saving)"
    except ValueError:
        return f"{state.name} is not valid JSON"
    for f in sorted(ckpt.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            problem = _safetensors_problem(f)
        elif f.suffix in (".pt", ".pth", ".bin"):
            problem = None if zipfile.is_zipfile(f) else "not a whole torch file (truncated?)"
        else:
            continue
        if problem:
            return f"{f.relative_to(ckpt)}: {problem}"
    return None


def resume_plan(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest whole checkpoint or None, [(broken newer checkpoint, why)])."""
    broken = []
    for ckpt in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, list(reversed(broken))
        broken.append((ckpt, problem))
    return None, list(reversed(broken))


def move_aside(path: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest = dest_dir / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{n}"
        n += 1
    path.rename(dest)
    return dest

