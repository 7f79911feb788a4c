"""`llamafactory-ext convert`: every rule on crafted files, through the real CLI entry point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from conftest import cli_env

from llamafactory_ext import REVIEWER_INSTRUCTION
from llamafactory_ext.cli import main
from llamafactory_ext.data.convert import convert


def write_lines(path: Path, lines: list[bytes | str | dict]) -> Path:
    """Write raw lines (bytes verbatim, str UTF-8, dict/list as JSON), each followed by a newline."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict | list):
                line = json.dumps(line, ensure_ascii=False)
            f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]


def run_cli(*args: str) -> int:
    return main(["convert", *map(str, args)])


def good(i: int, **extra) -> dict:
    return {"paper_id": f"p{i}", "input": f"Paper {i} text", "output": f"Review {i}", **extra}


def test_converts_to_alpaca_keeping_metadata_in_order(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [good(1, venue="ICLR", scores=[6, 8]), good(2)])
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out) == 0
    recs = read_jsonl(out)
    assert recs[0] == {"instruction": REVIEWER_INSTRUCTION, "input": "Paper 1 text", "output": "Review 1",
                       "paper_id": "p1", "venue": "ICLR", "scores": [6, 8]}
    assert list(recs[0]) == ["instruction", "paper_id", "input", "output", "venue", "scores"]  # source order kept
    assert recs[1]["paper_id"] == "p2"
    assert "read 2, accepted 2, rejected 0\n" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()  # nothing rejected: no rejects file


def test_sample_data_converts_completely(sample_jsonl, tmp_path):
    stats = convert(sample_jsonl, tmp_path / "out.jsonl")
    assert (stats.read, stats.accepted, stats.rejected) == (36, 36, 0)
    src = read_jsonl(sample_jsonl)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [(r["paper_id"], r["input"], r["output"]) for r in out] == [(r["paper_id"], r["input"], r["output"]) for r in src]


@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["utf8-input", "escaped-input"])
def test_output_is_utf8_without_escapes(tmp_path, ensure_ascii):
    """Whether the source escapes non-ASCII (Python's json.dumps default) or not, OUT holds raw UTF-8;
    only control characters stay escaped, as JSON requires."""
    rec = {"paper_id": "x", "input": "论文 ünïcödé 😀 ctrl\x10 back\\u00e9slash", "output": "评审 ✓ \\"}
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(rec, ensure_ascii=ensure_ascii), good(2)])
    out = tmp_path / "out.jsonl"
    convert(src, out)
    raw = out.read_bytes()
    assert "论文 ünïcödé 😀".encode() in raw and "评审 ✓".encode() in raw
    assert raw.count(b"\\u") == raw.count(b"\\u0010") + raw.count(b"\\\\u00e9")  # no other \u escapes
    assert read_jsonl(out)[0] == {"instruction": REVIEWER_INSTRUCTION, **rec}


@pytest.mark.parametrize("text", ["plain", "ctrl \x10\x1f", "é", "中文", "A", "\\underline", "\\é",
                                  "\\under 中", "\\\\u00e9 literally", "\"quoted\" \\\\ back"])
def test_no_unicode_escapes_survive(tmp_path, text):
    """Escaped (ensure_ascii) sources, LaTeX backslashes before a `u`, control characters: OUT is raw UTF-8,
    equal in content, and holds no \\uXXXX escape other than control characters."""
    rec = {"input": f"paper {text}", "output": f"review {text}", "paper_id": text}
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(rec) + "\n" + json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    convert(src, out)
    raw = out.read_bytes()
    assert not re.search(rb"(?<!\\)(?:\\\\)*\\u(?!00[01])", raw)  # an unescaped backslash starting \uXXXX
    assert read_jsonl(out) == [{"instruction": REVIEWER_INSTRUCTION, **rec}] * 2


BAD_LINES = [
    # (raw line, reject kind, a piece of the reason)
    (b"not json at all", "invalid JSON", "invalid JSON"),
    (b'{"input": "x", "output": "y"', "invalid JSON", "invalid JSON"),
    (b"[1, 2, 3]", "not an object", "array"),
    (b'"just a string"', "not an object", "a string"),
    (b"42", "not an object", "a number"),
    (b"null", "not an object", "null"),
    (b'{"output": "r"}', "missing input", "missing field 'input'"),
    (b'{"input": "p"}', "missing output", "missing field 'output'"),
    (b'{"input": "", "output": "r"}', "empty input", "empty"),
    (b'{"input": "p", "output": ""}', "empty output", "empty"),
    (b'{"input": " \\t\\n ", "output": "r"}', "empty input", "whitespace only"),
    (b'{"input": "p", "output": "\\n\\n"}', "empty output", "whitespace only"),
    (b'{"input": 3, "output": "r"}', "non-string input", "a number"),
    (b'{"input": ["p"], "output": "r"}', "non-string input", "an array"),
    (b'{"input": "p", "output": null}', "non-string output", "null"),
    (b'{"input": "p", "output": {"text": "r"}}', "non-string output", "an object"),
    (b'{"input": "caf\xe9 bad byte", "output": "r"}', "invalid UTF-8", "invalid UTF-8"),
    (b'{"input": "\xff\xfe", "output": "r"}', "invalid UTF-8", "0xff"),
]


def test_every_bad_line_is_rejected_with_line_reason_and_raw(tmp_path, capsys):
    lines: list = [good(0)]
    for raw, _, _ in BAD_LINES:
        lines += [raw, b""]  # a blank line after each: skipped, but line numbers still count it
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out) == 0
    err = capsys.readouterr().err
    n = 1 + len(BAD_LINES)
    assert f"read {n}, accepted 1, rejected {len(BAD_LINES)}" in err  # blank lines are not counted
    assert len(read_jsonl(out)) == 1
    rejects = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert len(rejects) == len(BAD_LINES)
    for i, ((raw, kind, piece), rej) in enumerate(zip(BAD_LINES, rejects, strict=True)):
        assert rej["line"] == 2 + 2 * i  # physical line number in the file
        assert rej["kind"] == kind, rej
        assert piece in rej["reason"], rej
        assert rej["raw"] == raw.decode("utf-8", errors="backslashreplace")
    # invalid bytes are shown safely, as escapes, in the rejects file (which is itself valid UTF-8)
    assert any("\\xe9" in r["raw"] for r in rejects)


def test_bom_crlf_and_blank_lines_are_accepted(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"input": "p1", "output": "r1"}\r\n\r\n   \n'
                    b'{"input": "p2", "output": "r2"}\r\n\n{"input": "p3", "output": "r3"}')  # no final newline
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out) == 0
    assert [r["input"] for r in read_jsonl(out)] == ["p1", "p2", "p3"]
    assert b"\r" not in out.read_bytes()
    assert "read 3, accepted 3, rejected 0" in capsys.readouterr().err


def test_very_long_line_streams(tmp_path):
    paper = ("All work and no play makes a long paper. " * 600_000)  # ~25 MB on one line
    src = write_lines(tmp_path / "in.jsonl", [good(1), {"paper_id": "big", "input": paper, "output": "r"}, good(2)])
    assert src.stat().st_size > 20_000_000
    out = tmp_path / "out.jsonl"
    stats = convert(src, out)
    assert (stats.read, stats.accepted) == (3, 3)
    assert read_jsonl(out)[1]["input"] == paper


def test_duplicates_are_dropped_only_with_dedup(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [good(1), good(2), good(1), good(1), good(3, output="other")])
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out) == 0
    assert "read 5, accepted 5, rejected 0\n" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 5

    assert run_cli(src, out, "--dedup") == 0
    assert "read 5, accepted 3, rejected 2, duplicates dropped 2" in capsys.readouterr().err
    assert [r["paper_id"] for r in read_jsonl(out)] == ["p1", "p2", "p3"]
    rejects = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["line"], r["kind"]) for r in rejects] == [(3, "duplicate"), (4, "duplicate")]
    assert "line 1" in rejects[0]["reason"]


def test_same_paper_other_review_is_not_a_duplicate(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [good(1), good(1, output="a second review")])
    assert convert(src, tmp_path / "out.jsonl", dedup=True).written == 2


def test_dedup_ignores_whitespace_formatting_key_order_and_escapes(tmp_path):
    """--dedup compares what the records say: whitespace inside the texts, JSON formatting, key order and
    \\uXXXX escapes are not differences; any other character, or another field value, is."""
    first = {"paper_id": "p1", "input": "Deep nets généralisent.\nWe show why.", "output": "Fine review."}
    same = [
        json.dumps(first, ensure_ascii=True, indent=None, separators=(" , ", " :  ")),  # formatting, \u escapes
        {"output": "Fine review.", "input": "Deep nets généralisent.\nWe show why.", "paper_id": "p1"},  # order
        {"paper_id": "p1", "input": "  Deep  nets\tgénéralisent.\r\n\nWe show why. \n", "output": "Fine review.\n"},
        {"paper_id": "p1", "input": "Deepnets généralisent.We showwhy.", "output": "Fine review."},
    ]
    other = [
        {"paper_id": "p1", "input": "Deep nets generalisent.\nWe show why.", "output": "Fine review."},  # é -> e
        {"paper_id": "p2", "input": "Deep nets généralisent.\nWe show why.", "output": "Fine review."},
        {"paper_id": "p1", "input": "Deep nets généralisent.\nWe show why.", "output": "Fine review.",
         "venue": "ICLR"},
    ]
    src = write_lines(tmp_path / "in.jsonl", [first, *same, *other])
    out = tmp_path / "out.jsonl"
    stats = convert(src, out, dedup=True)
    assert (stats.accepted, stats.duplicates) == (1 + len(other), len(same))
    assert read_jsonl(out)[0] == {"instruction": REVIEWER_INSTRUCTION, **first}  # the first one, verbatim
    rejects = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["line"], r["kind"]) for r in rejects] == [(i, "duplicate") for i in range(2, 2 + len(same))]
    assert all("line 1" in r["reason"] for r in rejects)


REPEATED_KEYS = [
    (b'{"input": "", "input": "real paper", "output": "r"}', "'input'"),
    (b'{"input": "p", "output": "r", "output": "r"}', "'output'"),
    (b'{"input": "p", "output": "r", "meta": {"a": 1, "a": 2}}', "'a'"),
    (b'{"input": "p", "output": "r", "paper_id"  :  1, "paper_id":2}', "'paper_id'"),
    (b'{"input": "p", "output": "r", "\\u0069nput": "escaped name"}', "'input'"),
]


@pytest.mark.parametrize("raw,key", REPEATED_KEYS, ids=["input", "output", "nested", "spaces", "escaped"])
def test_repeated_key_is_rejected_and_out_loads_in_hf_datasets(tmp_path, raw, key):
    """orjson keeps the last of two equal keys; HF datasets (LLaMA-Factory's loader) rejects the whole file.
    Such a line is rejected with the key named; a text holding an escaped quote before a colon is not."""
    tricky = json.dumps({"input": 'He wrote "input": "x", then "output":y', "output": "r \\\": z"})
    src = write_lines(tmp_path / "in.jsonl", [good(1), raw, tricky])
    out = tmp_path / "out.jsonl"
    stats = convert(src, out)
    assert (stats.accepted, stats.rejected, dict(stats.kinds)) == (2, 1, {"repeated key": 1})
    (rej,) = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert rej["line"] == 2 and key in rej["reason"] and "appears twice" in rej["reason"]
    import datasets

    loaded = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 2 and loaded[1]["input"].startswith('He wrote "input"')


def test_memory_stays_flat_without_dedup(tmp_path):
    """Nothing is kept per record without --dedup: 10x the records, the same peak of Python allocations."""
    import tracemalloc

    peaks = []
    for n in (2_000, 20_000):
        src = write_lines(tmp_path / f"in{n}.jsonl", [good(i, input=f"Paper {i} " + "text " * 40) for i in range(n)])
        tracemalloc.start()
        convert(src, tmp_path / "out.jsonl")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] + 512 * 1024, peaks  # (a per-record index of 0.24 KB would add 4 MB)


def test_instruction_file(tmp_path):
    (tmp_path / "instr.txt").write_text("Review this paper.\nBe fair.\n", encoding="utf-8")
    src = write_lines(tmp_path / "in.jsonl", [good(1)])
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out, "--instruction-file", tmp_path / "instr.txt") == 0
    assert read_jsonl(out)[0]["instruction"] == "Review this paper.\nBe fair."


def test_default_instruction_is_verbatim(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [good(1, instruction="an instruction from the source")])
    convert(src, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl")[0]["instruction"] == REVIEWER_INSTRUCTION


def test_jq_maps_another_schema(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "paper": {"text": "Paper A"}, "reviews": [{"text": "Review A1"}, {"text": "Review A2"}]},
        {"id": "b", "paper": {"text": "Paper B"}, "reviews": []},  # .reviews[0].text is null -> rejected
        {"id": "c", "paper": "not an object", "reviews": [{"text": "R"}]},  # jq error: cannot index string
        {"id": "d", "paper": {"text": "Paper D"}, "reviews": [{"text": "Review D"}]},
        [1, 2],  # not an object is fine for jq input; indexing an array with .paper is a jq error
    ])
    out = tmp_path / "out.jsonl"
    prog = "{paper_id: .id, input: .paper.text, output: .reviews[0].text}"
    assert run_cli(src, out, "--jq", prog) == 0
    recs = read_jsonl(out)
    assert recs == [
        {"instruction": REVIEWER_INSTRUCTION, "input": "Paper A", "output": "Review A1", "paper_id": "a"},
        {"instruction": REVIEWER_INSTRUCTION, "input": "Paper D", "output": "Review D", "paper_id": "d"},
    ]
    rejects = {r["line"]: r for r in read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")}
    assert rejects[2]["kind"] == "non-string output" and "jq output" in rejects[2]["reason"]
    assert rejects[3]["kind"] == "jq error" and "Cannot index string" in rejects[3]["reason"]
    assert rejects[5]["kind"] == "jq error"
    assert "read 5, accepted 2, rejected 3" in capsys.readouterr().err


def test_jq_one_record_per_review(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [
        {"id": "a", "paper": "Paper A", "reviews": ["R1", "R2", "R3"]},
        {"id": "b", "paper": "Paper B", "reviews": []},  # no output at all -> rejected
    ])
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out, "--jq", ".reviews[] as $r | {paper_id: .id, input: .paper, output: $r}") == 0
    assert [r["output"] for r in read_jsonl(out)] == ["R1", "R2", "R3"]
    assert read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")[0]["kind"] == "jq no output"
    assert "read 2, accepted 1, rejected 1, records written 3" in capsys.readouterr().err


def test_jq_syntax_error_is_a_user_error(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [good(1)])
    assert run_cli(src, tmp_path / "out.jsonl", "--jq", "{input: .paper.") == 2
    assert "error: --jq program does not compile" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_strict_stops_at_first_bad_line_and_writes_nothing(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [good(1), "", good(2), '{"input": "p"}', "garbage"])
    out = tmp_path / "out.jsonl"
    out.write_text("previous version\n")
    proc = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "convert", str(src), str(out), "--strict"],
                          capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode != 0
    assert f"{src}:4: missing field 'output'" in proc.stderr
    assert out.read_text() == "previous version\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no rejects, no temp files


def test_nothing_accepted_fails_without_writing_out(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", ["garbage", '{"input": "p"}'])
    out = tmp_path / "out.jsonl"
    assert run_cli(src, out) == 2
    err = capsys.readouterr().err
    assert "nothing accepted" in err and "all 2 lines were rejected" in err and "was not written" in err
    assert not out.exists()
    assert len(read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")) == 2  # the reasons are kept


def test_empty_input_and_missing_input(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", ["", "  "])
    assert run_cli(src, tmp_path / "out.jsonl") == 2
    assert "has no records" in capsys.readouterr().err
    assert run_cli(tmp_path / "nope.jsonl", tmp_path / "out.jsonl") == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_out_cannot_be_the_input(tmp_path, capsys):
    src = write_lines(tmp_path / "in.jsonl", [good(1)])
    before = src.read_bytes()
    assert run_cli(src, src) == 2
    assert "is the input file" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_stale_rejects_file_is_removed_and_custom_rejects_path(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [good(1), "garbage"])
    out = tmp_path / "out.jsonl"
    custom = tmp_path / "bad" / "rejected.jsonl"
    stats = convert(src, out, rejects=custom)
    assert stats.rejects == custom and len(read_jsonl(custom)) == 1
    write_lines(src, [good(1)])
    assert convert(src, out, rejects=custom).rejects is None
    assert not custom.exists()  # no stale rejects from the earlier run


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: /sys then)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    folder = Path("/sys")
    try:
        (folder / f".probe-{os.getpid()}").open("w").close()
    except OSError:
        return folder
    pytest.skip("running as root with a writable /sys: no unwritable folder to test with")


@pytest.mark.parametrize("where", ["folder", "under-a-file", "unwritable", "rejects-folder"])
def test_unwritable_outputs_fail_before_reading_input(tmp_path, where):
    """A one-line error, exit 2, before any input is read: the input is a FIFO nobody writes to, so a
    converter that started reading would hang here (and time out)."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    out, extra = {
        "folder": (tmp_path / "a-folder", []),
        "under-a-file": (tmp_path / "a-file" / "out.jsonl", []),
        "unwritable": (unwritable_folder(tmp_path) / "out.jsonl", []) if where == "unwritable" else (None, []),
        "rejects-folder": (tmp_path / "out.jsonl", ["--rejects", str(tmp_path / "a-folder")]),
    }[where]
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "convert", str(fifo), str(out), *extra],
                          capture_output=True, text=True, env=cli_env(), timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("is a folder" if where in ("folder", "rejects-folder") else "cannot write") in proc.stderr


# ---- interrupts: a real subprocess, a real signal, mid-write ------------------------------------------------
def _start_mid_run(tmp_path: Path):
    """Start `convert` on a FIFO fed with ~40 MB of records and return once it is provably mid-write:
    the temp output holds data and the process is waiting for more input."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"previous": "complete version"}\n')
    proc = subprocess.Popen([sys.executable, "-m", "llamafactory_ext.cli", "convert", str(fifo), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    paper = "x" * 50_000
    release = threading.Event()

    def feed():
        try:
            with open(fifo, "wb") as f:
                for i in range(800):
                    f.write(orjson.dumps({"paper_id": i, "input": paper, "output": "review"}) + b"\n")
                f.flush()
                release.wait(120)  # keep the pipe open: the converter blocks mid-run
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sizes = [p.stat().st_size for p in tmp_path.glob(".out.jsonl.*.tmp") if "rejects" not in p.name]
        if sizes and sizes[0] > 30_000_000:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        pytest.fail("the converter never got mid-run")
    return proc, out, release, feeder


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupt_leaves_previous_out(tmp_path, sig):
    proc, out, release, feeder = _start_mid_run(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    release.set()
    feeder.join(10)
    assert out.read_bytes() == b'{"previous": "complete version"}\n'
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"interrupted" in err
        assert not list(tmp_path.glob(".*.tmp"))  # Ctrl-C cleans its temp files up
    elif sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM and b"Traceback" not in err, err
        assert not list(tmp_path.glob(".*.tmp"))  # so does SIGTERM
    else:
        assert proc.returncode == -signal.SIGKILL  # nothing can clean up after SIGKILL, but OUT is intact
