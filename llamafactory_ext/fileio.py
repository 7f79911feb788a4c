"""Atomic file output: write to a temp file beside the target, fsync, rename.

A crash, Ctrl-C or SIGTERM at any point leaves either the old file or the new one, never half of one.
Ctrl-C and SIGTERM remove the temp file (while an atomic write is open in the main thread, SIGTERM exits
through Python's cleanup with status 143 instead of dying on the spot); a SIGKILL (or power loss) cannot,
so each temp file is named `.NAME.PID-HOST.RANDOM.tmp` after the process writing it, and the next write of
the same NAME deletes the temp files whose writer, on this host, is no longer alive. Live writers' temp
files are never touched.

`check_output` tells, before any long work, whether an output path can be written (a one-line UserError
otherwise); `out_and_rejects` writes an output and its rejects file, each kept only if non-empty.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal


@functools.cache
def _host_tag() -> str:
    """8 hex digits naming this host and PID namespace: a PID is only judged where it means something
    (a shared filesystem seen from another node or container holds other PIDs)."""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return hashlib.sha1(f"{socket.gethostname()}:{pidns}".encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files (or temp folders, e.g. a model being built) of `path` left by writers on this host
    that have died (e.g. SIGKILLed); returns them. Those of live processes, other hosts and other targets are
    kept."""
    path = Path(path)
    prefix = f".{path.name}."
    ours = re.compile(rf"(\d+)-{_host_tag()}\.[a-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return removed
    for name in names:
        m = name.startswith(prefix) and ours.fullmatch(name[len(prefix):])
        if m and not _pid_alive(int(m.group(1))):
            stale = path.parent / name
            with contextlib.suppress(FileNotFoundError):  # another writer may have just removed it
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    os.unlink(stale)
                removed.append(stale)
    return removed


def swap_folder(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished folder `new` (same file system) into `out`'s place. A previous `out` is moved aside
    first and removed after: a crash in between leaves the old folder (named `.<out>.<pid>-<host>.old.tmp`,
    cleared by the next swap) or the new one, never half of either."""
    new, out = Path(new), Path(out)
    remove_stale_temps(out)
    old = out.with_name(f".{out.name}.{os.getpid()}-{_host_tag()}.old.tmp")
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_folder(out: str | os.PathLike) -> Iterator[Path]:
    """`with build_folder(out) as tmp: <write into tmp>`: a temp folder beside `out`, swapped into place
    (swap_folder) when the block ends without an error, removed otherwise (`out` then stays as it was).
    A builder killed outright leaves only its temp folder, which remove_stale_temps(out) clears."""
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        swap_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sigterm(signum, frame):
    """SIGTERM while an atomic write is open: unwind like Ctrl-C, so every open temp file is removed."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """Make SIGTERM raise SystemExit(143) inside the block, if it would otherwise kill the process on the spot
    (default handler, main thread). A handler someone else installed is left alone; nesting is fine."""
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if install:
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None, *,
                 empty: Literal["write", "skip", "remove"] = "write") -> Iterator[IO]:
    """`with atomic_write(p) as f: ...` -> p appears only if the block finishes without error.

    `empty`: what a block that wrote nothing does: "write" an empty file (the default), "skip" (leave the
    previous file, if any, as it was) or "remove" the previous file (e.g. a rejects file of an earlier run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    with _cleanup_on_sigterm():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp",
                                   dir=path.parent)
        try:
            with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
                yield f
                f.flush()
                size = os.fstat(f.fileno()).st_size
                if size or empty == "write":
                    os.fsync(f.fileno())
            if size == 0 and empty != "write":
                os.unlink(tmp)
                if empty == "remove":
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                return
            if path.exists():  # keep the permissions of the file we replace
                os.chmod(tmp, path.stat().st_mode & 0o777)
            else:
                os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def out_and_rejects(out: str | os.PathLike, rejects: str | os.PathLike) -> Iterator[tuple[IO, IO]]:
    """`with out_and_rejects(out, rejects) as (out_f, rej_f)`: both written atomically (binary), each kept only
    if something was written to it. An empty OUT leaves the previous OUT as it was (the caller reports that
    nothing was written); an empty rejects file removes the previous one, which described an earlier run."""
    with atomic_write(rejects, empty="remove") as rej_f, atomic_write(out, empty="skip") as out_f:
        yield out_f, rej_f


def check_output(path: str | os.PathLike, what: str = "OUT") -> Path:
    """Check, before any long work, that `path` can be written as a file (by creating and removing a temp
    file beside it, as atomic_write will): a UserError naming it and the problem otherwise. Creates the
    missing parent folders, as atomic_write would."""
    from llamafactory_ext import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file path (e.g. {path / 'out.jsonl'})")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"cannot write {what} {path}: {above} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp",
                                   dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}{where}; choose another path") from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a small JSONL file; a clear error naming the
    file and line otherwise. (Big inputs go through `convert`, which streams and keeps rejects.)"""
    import json

    from llamafactory_ext import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((i, row))
    return rows


def unique_paper_id(path: str | os.PathLike, lineno: int, row: dict, seen: dict[str, int]) -> str:
    """The `paper_id` of line `lineno` of `path`: a non-empty string not seen before (`seen`: id -> the line it
    was first at; updated). A clear error naming the file and line otherwise."""
    from llamafactory_ext import UserError

    pid = row.get("paper_id")
    if not isinstance(pid, str) or not pid:
        raise UserError(f"{path}:{lineno}: field 'paper_id' must be a non-empty string")
    if pid in seen:
        raise UserError(f"{path}:{lineno}: duplicate paper_id {pid!r} (first at line {seen[pid]})")
    seen[pid] = lineno
    return pid


def load_yaml(path: str | os.PathLike, what: str = "YAML file") -> dict:
    """A YAML mapping (LLaMA-Factory arguments, a recipe, a run's sft_args.yaml): {} for an empty file, a one-line
    UserError naming the file for a missing one, a syntax error or anything but a mapping. The only YAML reader."""
    import yaml

    from llamafactory_ext import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found" if not path.exists() else f"{what} {path} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not readable YAML ({' '.join(str(e).split())})") from None
    if doc is not None and not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of LLaMA-Factory arguments, got {type(doc).__name__}")
    return doc or {}


def dump_yaml(args: dict) -> str:
    import yaml

    return yaml.safe_dump(args, sort_keys=False, allow_unicode=True)
