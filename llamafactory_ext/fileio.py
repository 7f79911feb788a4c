"""Atomic file output: write to a temp file beside the target, fsync, rename.

A crash or Ctrl-C at any point leaves either the old file or the new one, never half of one.
Ctrl-C removes the temp file; a SIGKILL (or power loss) cannot, so each temp file is named
`.NAME.PID-HOST.RANDOM.tmp` after the process writing it, and the next write of the same NAME deletes
the temp files whose writer, on this host, is no longer alive. Live writers' temp files are never touched.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


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
    """Delete the temp files of `path` left by writers on this host that have died (e.g. SIGKILLed);
    returns them. Temp files of live processes, of other hosts, and of other targets are kept."""
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
            with contextlib.suppress(FileNotFoundError):  # another writer may have just removed it
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`with atomic_write(p) as f: ...` -> p appears only if the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # keep the permissions of the file we replace
            os.chmod(tmp, path.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
