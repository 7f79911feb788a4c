"""Convert paper-review JSONL (`{"input": paper, "output": review, ...}`) into alpaca JSONL
(`{"instruction", "input", "output", ...}`) for LLaMA-Factory, validating every line.

Every non-blank input line ends up either in OUT or in the rejects file (default `OUT.rejects.jsonl`:
one `{"line", "kind", "reason", "raw"}` per rejected line), so nothing is lost silently. Extra fields
(`paper_id`, ...) are kept. The instruction is the project's reviewer instruction unless
`--instruction-file` gives another. `--jq` maps another schema to `{input, output}` with a jq program
(one line may give several records, e.g. one per review). Blank lines are skipped, a UTF-8 BOM is
stripped, CRLF line ends are accepted. A line in which an object repeats a key
(`{"input": "", "input": "real", ...}`) is rejected: which value was meant is unknowable, and HF
`datasets`, which LLaMA-Factory loads with, refuses the whole file ("Column(/input) was specified twice").
OUT and the rejects file are checked before any work and written atomically: an interrupted run (Ctrl-C,
SIGTERM) leaves the previous OUT (or none), never half of one.

`--dedup` drops records that repeat an earlier one: same fields, same values, where whitespace inside
strings does not count (spaces, tabs, newlines, CR: "a  b\\n" and "a b" are the same text, and so are
"a b" and "ab"), and neither do JSON formatting, key order or \\uXXXX escapes. The first one is kept,
verbatim; the others go to the rejects file, naming its line. It keeps a 16-byte digest per record
(about 0.15 KB of memory each); without `--dedup` nothing is kept per record and memory stays flat.

    llamafactory-ext convert data/raw/paper_review.jsonl data/build/reviews.jsonl
    llamafactory-ext convert raw.jsonl out.jsonl --dedup --strict
    llamafactory-ext convert openreview.jsonl out.jsonl \\
        --jq '{paper_id: .id, input: .paper.text, output: .reviews[0].text}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from llamafactory_ext import REVIEWER_INSTRUCTION, UserError
from llamafactory_ext.fileio import check_output, out_and_rejects

BOM = b"\xef\xbb\xbf"
READ_BUFFER = 1 << 20  # 1 MiB reads: lines are ~50 KB papers
PROGRESS_STEP = 1 << 22  # update the byte progress bar every 4 MiB, not every line
_MISSING = object()


@dataclass
class ConvertStats:
    """What one conversion did, in input lines (blank lines are not counted): `read = accepted + rejected`."""

    read: int = 0  # non-blank input lines
    accepted: int = 0  # lines that gave at least one record in OUT
    rejected: int = 0  # lines in the rejects file (bad, or with --dedup only duplicates)
    written: int = 0  # records in OUT (differs from `accepted` only when --jq yields several per line)
    duplicates: int = 0  # records dropped as duplicates of an earlier one (counted with dedup only)
    blank: int = 0
    kinds: Counter = field(default_factory=Counter)  # reject kind -> count
    out: Path | None = None  # None when nothing was written
    rejects: Path | None = None  # None when there was nothing to reject

    def summary(self, dedup: bool) -> str:
        dup = f", duplicates dropped {self.duplicates}" if dedup else ""
        extra = f", records written {self.written}" if self.written != self.accepted else ""
        return f"read {self.read}, accepted {self.accepted}, rejected {self.rejected}{dup}{extra}"

    def rejects_line(self, shown: str | None = None) -> str | None:
        """Where the rejected lines went (`shown`: that path as the user should read it), by kind (each kept there
        with its line number and reason)."""
        return f"rejected: {_kinds_text(self.kinds)} -> {shown or self.rejects} (line, reason)" if self.kinds else None


class _Reject(Exception):
    """One bad line: `kind` is a short category for the summary, `reason` the full explanation."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# The end of an object key: its closing quote and the colon (JSON allows whitespace between them). Inside a
# string a quote is escaped, so this matches only key ends, and, rarely, an escaped quote before a colon.
_KEY_END = re.compile(rb'"[ \t\r\n]*:')


def _n_keys(value) -> int:
    """Keys in all the objects of a parsed JSON value."""
    if type(value) is dict:
        return len(value) + sum(_n_keys(v) for v in value.values() if type(v) in (dict, list))
    if type(value) is list:
        return sum(_n_keys(v) for v in value if type(v) in (dict, list))
    return 0


def _no_repeated_key(pairs: list[tuple]) -> dict:
    keys = set()
    for key, _ in pairs:
        if key in keys:
            raise _Reject("repeated key", f"key {key!r} appears twice in one object; keep one (HF datasets, which "
                                          "LLaMA-Factory loads with, rejects a file with a repeated key)")
        keys.add(key)
    return dict(pairs)


def _check_keys(line: bytes, value) -> None:
    """Reject a line in which an object repeats a key (orjson silently keeps the last value). Each key
    of the line ends in a `_KEY_END`: when there are no more of those than the parsed value has keys, no key
    repeats; otherwise (an escaped quote before a colon in a text, or a repeated key) a re-parse decides."""
    if type(value) in (dict, list) and len(_KEY_END.findall(line)) > _n_keys(value):
        json.loads(line, object_pairs_hook=_no_repeated_key)


WHITESPACE = b" \t\n\r\f\v"


def text_key(text: str) -> bytes:
    """A text with its whitespace removed, as UTF-8: equal for texts that differ only in whitespace."""
    return text.encode("utf-8", "surrogatepass").translate(None, WHITESPACE)


def _feed(h, value) -> None:
    t = type(value)
    if t is str:
        b = text_key(value)
        h.update(b"s%d:" % len(b) + b)
    elif t is dict:
        h.update(b"d%d:" % len(value))
        for k in sorted(value):
            kb = k.encode("utf-8", "surrogatepass")
            h.update(b"k%d:" % len(kb) + kb)
            _feed(h, value[k])
    elif t is list:
        h.update(b"l%d:" % len(value))
        for v in value:
            _feed(h, v)
    else:  # numbers, booleans, null
        h.update(b"v" + orjson.dumps(value) + b";")


def dedup_key(record: dict) -> bytes:
    """What `--dedup` compares (see the module docstring): a 128-bit digest of the record's fields but the
    instruction, keys sorted, whitespace removed from the strings."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, {k: v for k, v in record.items() if k != "instruction"})
    return h.digest()


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


def _field(record: dict, key: str) -> str:
    """The non-empty string `record[key]`, or a _Reject saying what is wrong with it."""
    value = record.get(key, _MISSING)
    if value is _MISSING:
        raise _Reject(f"missing {key}", f"missing field {key!r} (fields present: {', '.join(map(repr, record)) or 'none'})")
    if type(value) is not str:
        raise _Reject(f"non-string {key}", f"field {key!r} is {_json_type(value)}, not a string")
    if not value:
        raise _Reject(f"empty {key}", f"field {key!r} is empty")
    if value.isspace():
        raise _Reject(f"empty {key}", f"field {key!r} is whitespace only")
    return value


def _parse_error(line: bytes, err: Exception):
    """Parse a line orjson refused: retry without a BOM, else classify the failure as a _Reject.

    Returns the parsed value and the line it came from, or None for a blank line."""
    if line.startswith(BOM):
        line = line[len(BOM):]
        try:
            return orjson.loads(line), line
        except orjson.JSONDecodeError as e:
            err = e
    if line.isspace() or not line:
        return None
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Reject("invalid UTF-8", f"invalid UTF-8 at byte {e.start + 1} of the line (0x{line[e.start]:02x})") from None
    raise _Reject("invalid JSON", f"invalid JSON: {err}") from None


def _raw_text(line: bytes) -> str:
    """The raw line as text for the rejects file: newline dropped, invalid bytes shown as \\xNN."""
    return line.rstrip(b"\r\n").decode("utf-8", errors="backslashreplace")


def _record(source: dict, instruction: str, reviews: bool = True) -> dict:
    """Alpaca record from an `{input, output, ...}` object: the instruction first, then the source's fields
    in their order (a source `instruction` is replaced). `reviews=False` (papers to review): a missing, null
    or empty `output` becomes ""."""
    _field(source, "input")
    if reviews or source.get("output") not in (None, ""):
        _field(source, "output")
    record = {"instruction": instruction}
    record.update(source)
    record["instruction"] = instruction
    record.setdefault("output", "")
    if record["output"] is None:
        record["output"] = ""
    return record


# `\u` not followed by 00[01]: an escape of a non-control character (control characters stay escaped in any
# JSON writer). A regex, not bytes.find: its scan keys on the rare backslash, not the common letter u.
_UNICODE_ESCAPE = re.compile(rb"\\u(?!00[01])")


def _needs_reencoding(line: bytes) -> bool:
    """Whether a valid JSON line holds a \\uXXXX escape that orjson would write as a UTF-8 character."""
    m = _UNICODE_ESCAPE.search(line)
    while m is not None:
        i = j = m.start()
        while j > 0 and line[j - 1] == 0x5C:  # backslashes right before it
            j -= 1
        if (i - j) % 2 == 0:  # an even number: this backslash starts an escape (else it is `\\` then `u`)
            return True
        m = _UNICODE_ESCAPE.search(line, i + 2)
    return False


def compile_jq(program: str):
    """Compile a jq program once (jq.py bindings); a syntax error is a UserError."""
    import jq

    try:
        return jq.compile(program)
    except ValueError as e:
        raise UserError(f"--jq program does not compile: {e}") from None


def _jq_records(prog, line: bytes, instruction: str, reviews: bool = True) -> list[dict]:
    """Run the jq program on one (already JSON-checked) line; each result must be an {input, output} object."""
    try:
        results = prog.input_text(line.decode("utf-8")).all()
    except ValueError as e:
        raise _Reject("jq error", f"jq error: {e}") from None
    if not results:
        raise _Reject("jq no output", "jq program produced no output for this line")
    records = []
    for i, value in enumerate(results):
        where = f" (jq result {i + 1} of {len(results)})" if len(results) > 1 else ""
        if type(value) is not dict:
            raise _Reject("jq not an object", f"jq result is {_json_type(value)}, not an object{where}")
        try:
            records.append(_record(value, instruction, reviews))
        except _Reject as e:
            raise _Reject(e.kind, e.reason + " in the jq output" + where) from None
    return records


def default_rejects_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".rejects.jsonl")


class _NoBar:
    """Stands in for tqdm when stderr is not a terminal (tqdm would be disabled anyway; its import is 40 ms)."""

    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(total: int | None, desc: str):
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    # delay: no bar at all for short runs
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, delay=1.0,
                file=sys.stderr, dynamic_ncols=True)


def _encode(records) -> list[bytes]:
    """Each record as one JSON line (UTF-8, no \\uXXXX escapes)."""
    try:
        return [orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records]
    except TypeError as e:  # e.g. an integer beyond 64 bits
        raise _Reject("unencodable", f"cannot write the record as JSON: {e}") from None


def _size(path: Path) -> int | None:
    """Bytes to read for the progress bar (None for a pipe)."""
    st = path.stat()
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _convert_stream(src: Path, out_f, rej_f, stats: ConvertStats, *, instruction: str, prog, strict: bool,
                    dedup: bool, reviews: bool = True) -> None:
    """The hot loop: one pass over the file in binary; orjson parses every line."""
    loads, dumps = orjson.loads, orjson.dumps
    decode_error = orjson.JSONDecodeError
    newline = orjson.OPT_APPEND_NEWLINE
    seen: dict[bytes, int] = {}  # with dedup only: dedup_key -> the line of its first record
    prefix = b'{"instruction":' + dumps(instruction) + b","
    join = b"".join
    lineno = pending = 0
    with open(src, "rb", buffering=READ_BUFFER) as f, _progress(_size(src), "convert") as bar:
        for line in f:
            lineno += 1
            pending += len(line)
            if pending >= PROGRESS_STEP:
                bar.update(pending)
                pending = 0
            if line.isspace():  # O(1) for a real line: stops at the first non-space byte
                stats.blank += 1
                continue
            stats.read += 1
            try:
                try:
                    value = loads(line)
                except decode_error as e:
                    parsed = _parse_error(line, e)
                    if parsed is None:  # a BOM followed by nothing
                        stats.read -= 1
                        stats.blank += 1
                        continue
                    value, line = parsed
                _check_keys(line, value)
                if prog is not None:
                    records = _jq_records(prog, line, instruction, reviews)
                    blobs = _encode(records)
                elif type(value) is not dict:
                    raise _Reject("not an object", f"JSON value is {_json_type(value)}, not an object")
                elif "instruction" not in value and not _needs_reencoding(line) and (reviews or value.get("output")):
                    # Fast path: the line is a valid object (just parsed); once its fields are checked, its
                    # bytes ARE the record's JSON: splice the instruction in front, no 50 KB re-encoding.
                    _field(value, "input")
                    _field(value, "output")
                    records = (value,)
                    if line[0] == 0x7B and line.endswith(b"}\n"):  # "{...}\n": the common case, one copy
                        blobs = (join((prefix, memoryview(line)[1:])),)
                    else:  # leading blanks, CRLF, no final newline
                        blobs = (join((prefix, memoryview(line.strip())[1:], b"\n")),)
                else:
                    records = (_record(value, instruction, reviews),)
                    blobs = _encode(records)
            except _Reject as e:
                if strict:
                    raise UserError(f"{src}:{lineno}: {e.reason} (--strict stops at the first bad line)") from None
                stats.rejected += 1
                stats.kinds[e.kind] += 1
                rej_f.write(dumps({"line": lineno, "kind": e.kind, "reason": e.reason, "raw": _raw_text(line)},
                                  option=newline))
                continue
            written = 0
            for record, blob in zip(records, blobs, strict=True):
                if dedup:
                    key = dedup_key(record)
                    first = seen.get(key)
                    if first is not None:
                        stats.duplicates += 1
                        stats.kinds["duplicate"] += 1
                        rej_f.write(dumps({"line": lineno, "kind": "duplicate",
                                           "reason": f"duplicate of the record from line {first} (--dedup)",
                                           "raw": blob[:-1].decode("utf-8")}, option=newline))
                        continue
                    seen[key] = lineno
                out_f.write(blob)
                written += 1
            if written:
                stats.accepted += 1
            else:  # every record of the line was a dropped duplicate
                stats.rejected += 1
            stats.written += written
        bar.update(pending)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rejects: str | os.PathLike | None = None,
    instruction: str = REVIEWER_INSTRUCTION,
    jq_program: str | None = None,
    strict: bool = False,
    dedup: bool = False,
    reviews: bool = True,
) -> ConvertStats:
    """Convert `src` to alpaca JSONL `out` (see the module docstring); returns a ConvertStats (`read`,
    `accepted`, `rejected` lines, `written` records, `out` and `rejects` paths). Raises UserError, before any
    work, when the input is missing or an output cannot be written; and when `--strict` meets a bad line or
    nothing at all is accepted (then OUT is not written). `reviews=False`: papers to review, whose `output`
    (the reference review) may be missing; it becomes "" (`make predict PAPERS=`)."""
    src, out = Path(src), Path(out)
    rejects = Path(rejects) if rejects is not None else default_rejects_path(out)
    if not src.exists() or src.is_dir():  # a pipe (/dev/stdin, a FIFO) is fine: the input is read once, in order
        raise UserError(f"input file {src} does not exist" if not src.exists() else f"input {src} is a folder")
    for name, path in (("OUT", out), ("--rejects", rejects)):
        if path.exists() and path.resolve() == src.resolve():
            raise UserError(f"{name} {path} is the input file; choose another output path")
    if out.resolve() == rejects.resolve():
        raise UserError(f"--rejects {rejects} is the same file as OUT; choose another path")
    check_output(out, "OUT")
    check_output(rejects, "--rejects file")
    if not instruction.strip():
        raise UserError("the instruction is empty; give a non-empty --instruction-file")
    prog = compile_jq(jq_program) if jq_program is not None else None

    stats = ConvertStats()
    with out_and_rejects(out, rejects) as (out_f, rej_f):
        _convert_stream(src, out_f, rej_f, stats, instruction=instruction, prog=prog, strict=strict, dedup=dedup,
                        reviews=reviews)
    stats.out = out if stats.written else None
    stats.rejects = rejects if stats.kinds else None
    if stats.out is None:
        if stats.read == 0:
            raise UserError(f"{src} has no records (it is empty or holds only blank lines); {out} not written")
        raise UserError(f"nothing accepted from {src}: all {stats.read} lines were rejected "
                        f"({_kinds_text(stats.kinds)}); see {rejects}. {out} was not written")
    return stats


def _kinds_text(kinds: Counter) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="IN", help="paper-review JSONL: one {\"input\": paper, \"output\": review} per line")
    p.add_argument("output", metavar="OUT", help="alpaca JSONL to write (atomically)")
    p.add_argument("--rejects", metavar="FILE", help="where rejected lines go (default: OUT.rejects.jsonl)")
    p.add_argument("--instruction-file", metavar="F",
                   help="read the instruction from F (default: the built-in reviewer instruction)")
    p.add_argument("--jq", metavar="FILTER",
                   help="jq program mapping each line to {input, output} (plus any fields to keep), "
                        "e.g. '{input: .paper.text, output: .reviews[0].text}'")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line (FILE:LINE: reason), write nothing")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate records (default: keep and count them)")


def run(args: argparse.Namespace) -> int:
    instruction = REVIEWER_INSTRUCTION
    if args.instruction_file:
        path = Path(args.instruction_file)
        try:
            instruction = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --instruction-file {path}: {e}") from None
    stats = convert(args.input, args.output, rejects=args.rejects, instruction=instruction, jq_program=args.jq,
                    strict=args.strict, dedup=args.dedup)
    print(stats.summary(args.dedup), file=sys.stderr)
    if stats.kinds:
        print(stats.rejects_line(), file=sys.stderr)
    print(f"wrote {stats.written} records to {stats.out}", file=sys.stderr)
    return 0
