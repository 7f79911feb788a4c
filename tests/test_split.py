"""`llamafactory-ext split`: by paper, deterministic, nested subsets, atomic."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llamafactory_ext import UserError
from llamafactory_ext.cli import main
from llamafactory_ext.data.split import paper_key, parse_sizes, parse_test_size, size_name, split


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def make_records(n_papers: int = 60) -> list[dict]:
    """Papers with 1-3 reviews each; every fifth paper has no paper_id (identified by its text)."""
    recs = []
    for p in range(n_papers):
        for r in range(1 + p % 3):
            rec = {"instruction": "I", "input": f"paper {p} text", "output": f"review {r} of paper {p}"}
            if p % 5:
                rec["paper_id"] = f"p{p}"
            recs.append(rec)
    return recs


def write(path: Path, recs: list[dict], newline: str = "\n") -> Path:
    path.write_text("".join(json.dumps(r) + newline for r in recs), encoding="utf-8")
    return path


def keys(path: Path) -> set[str]:
    return {paper_key(json.loads(line)) for line in read_lines(path)}


def test_split_by_paper_keeps_every_record(tmp_path, capsys):
    recs = make_records()
    src = write(tmp_path / "reviews.jsonl", recs)
    assert main(["split", str(src), "--test-size", "10", "--seed", "1"]) == 0
    train, test = tmp_path / "reviews_train.jsonl", tmp_path / "reviews_test.jsonl"
    assert len(keys(test)) == 10 and len(keys(train)) == 50
    assert not keys(train) & keys(test)  # no paper on both sides, even with several reviews each
    assert Counter(read_lines(train) + read_lines(test)) == Counter(read_lines(src))  # nothing lost or doubled
    printed = capsys.readouterr().out
    assert f"test:  {len(read_lines(test))} records (10 papers)" in printed
    assert f"train: {len(read_lines(train))} records (50 papers)" in printed
    # the test file keeps the input order
    assert read_lines(test) == [line for line in read_lines(src) if line in set(read_lines(test))]


def test_papers_without_id_are_grouped_by_text(tmp_path):
    recs = [{"instruction": "I", "input": f"paper {p % 4}", "output": f"review {p}"} for p in range(12)]
    src = write(tmp_path / "r.jsonl", recs)
    split(src, test_size=1)
    test = [json.loads(line) for line in read_lines(tmp_path / "r_test.jsonl")]
    assert len(test) == 3 and len({r["input"] for r in test}) == 1  # all three reviews of that paper


@pytest.mark.parametrize("seed", range(6))
def test_reviews_with_and_without_paper_id_stay_together(tmp_path, seed):
    """A paper some of whose reviews carry its paper_id and others do not (or carry its text with other
    whitespace) is one paper; so are two ids whose records hold the same text. Never on both sides."""
    recs = []
    for p in range(30):
        text = f"Paper {p}: we study   attention.\nResults follow."
        recs += [{"input": text, "output": "r1", "paper_id": f"p{p}"},
                 {"input": text, "output": "r2"},  # the same paper, no id
                 {"input": " " + text.replace("   ", " ").replace("\n", "\n\n") + "\n", "output": "r3"}]
        if p % 10 == 0:  # the same text under a second id (a resubmission, a data error)
            recs.append({"input": text, "output": "r4", "paper_id": f"dup{p}"})
    src = write(tmp_path / "r.jsonl", recs)
    result = split(src, test_size=8, seed=seed)
    sides = {}
    for side, path in (("train", result.train), ("test", result.test)):
        for line in read_lines(path):
            paper = json.loads(line)["input"].split(":")[0].strip()
            sides.setdefault(paper, set()).add(side)
    assert len(sides) == 30 and all(len(v) == 1 for v in sides.values()), sides
    assert result.papers == {"train": 22, "test": 8}
    assert sum(len(read_lines(p)) for p in (result.train, result.test)) == len(recs)


def test_split_of_id_only_data_is_unchanged(tmp_path):
    """Papers named by paper_id keep the split earlier versions made (the same seed, the same test set)."""
    recs = [{"input": f"paper {p}", "output": "r", "paper_id": p} for p in range(100)]
    result = split(write(tmp_path / "r.jsonl", recs), test_size=5, seed=42)
    assert sorted(json.loads(line)["paper_id"] for line in read_lines(result.test)) == [17, 46, 47, 68, 91]  # what a673eb5 chose


@pytest.mark.parametrize("where", ["train-is-a-folder", "out-dir-is-a-file"])
def test_unwritable_outputs_fail_before_reading(tmp_path, capsys, where):
    """Checked before the input is read: the broken last line would otherwise be the error."""
    src = tmp_path / "r.jsonl"
    src.write_text('{"input": "a", "output": "r"}\n{"input": "b", "output": "r"}\n{broken\n')
    if where == "train-is-a-folder":
        (tmp_path / "r_train.jsonl").mkdir()
        args = []
    else:
        (tmp_path / "file").write_text("x")
        args = ["--out-dir", str(tmp_path / "file" / "sub")]
    assert main(["split", str(src), "--test-size", "1", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("is a folder" in err or "is a file, not a folder" in err), err


def test_fraction_and_determinism(tmp_path):
    recs = make_records()
    src = write(tmp_path / "a.jsonl", recs)
    split(src, test_size=0.25, seed=7, out_dir=tmp_path / "one")
    split(src, test_size=0.25, seed=7, out_dir=tmp_path / "two")
    split(src, test_size=0.25, seed=8, out_dir=tmp_path / "three")
    one, two, three = (tmp_path / d / "a_test.jsonl" for d in ("one", "two", "three"))
    assert len(keys(one)) == 15
    assert one.read_bytes() == two.read_bytes()
    assert (tmp_path / "one" / "a_train.jsonl").read_bytes() == (tmp_path / "two" / "a_train.jsonl").read_bytes()
    assert keys(one) != keys(three)
    # the same papers go to test whatever the order of the input file
    shuffled = write(tmp_path / "a_shuffled.jsonl", recs[::-1])
    split(shuffled, test_size=0.25, seed=7, out_dir=tmp_path / "four")
    assert keys(tmp_path / "four" / "a_shuffled_test.jsonl") == keys(one)


def test_nested_subsets(tmp_path, capsys):
    recs = [{"instruction": "I", "input": f"paper {p}", "output": "r", "paper_id": p} for p in range(2600)]
    src = write(tmp_path / "big.jsonl", recs)
    assert main(["split", str(src), "--test-size", "100", "--sizes", "2k,500,1000"]) == 0
    train = read_lines(tmp_path / "big_train.jsonl")
    assert len(train) == 2500
    sub = {name: read_lines(tmp_path / f"big_train_{name}.jsonl") for name in ("500", "1k", "2k")}
    assert [len(v) for v in sub.values()] == [500, 1000, 2000]
    assert sub["500"] == sub["1k"][:500] and sub["1k"] == sub["2k"][:1000] and sub["2k"] == train[:2000]
    assert train != sorted(train, key=lambda b: json.loads(b)["paper_id"])  # one shuffled order
    assert "train_2k: 2000 records" in capsys.readouterr().out


def test_size_larger_than_train_fails_and_writes_nothing(tmp_path, capsys):
    src = write(tmp_path / "r.jsonl", make_records(20))
    assert main(["split", str(src), "--test-size", "5", "--sizes", "5,1000"]) == 2
    err = capsys.readouterr().err
    assert "--sizes 1000 exceed the" in err and "training records" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


@pytest.mark.parametrize("size,message", [("20", "only 20 papers"), ("0", "give a number of papers"),
                                          ("1.5", "give a number of papers"), ("ten", "neither a number")])
def test_bad_test_size(tmp_path, capsys, size, message):
    src = write(tmp_path / "r.jsonl", make_records(20))
    assert main(["split", str(src), "--test-size", size]) == 2
    assert message in capsys.readouterr().err


def test_crlf_blank_lines_and_missing_final_newline(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_bytes(b'{"input": "a", "output": "r", "paper_id": 1}\r\n\n{"input": "b", "output": "r", "paper_id": 2}')
    result = split(src, test_size=1)
    lines = read_lines(result.train) + read_lines(result.test)
    assert len(lines) == 2 and all(line.endswith(b"\n") for line in lines)


def test_invalid_line_names_the_line(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text('{"input": "a", "output": "r"}\n{broken\n')
    with pytest.raises(UserError, match=r"r.jsonl:2: invalid JSON"):
        split(src, test_size=1)


def test_helpers():
    assert [size_name(k) for k in (500, 1000, 5000, 15000, 2500)] == ["500", "1k", "5k", "15k", "2500"]
    assert parse_sizes("15000, 5k,5000") == [5000, 15000]
    assert parse_test_size("500") == 500 and parse_test_size("0.1") == 0.1
    with pytest.raises(UserError, match="not a positive record count"):
        parse_sizes("5k,abc")
