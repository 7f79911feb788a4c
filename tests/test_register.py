"""`llamafactory-ext register`: one entry in dataset_info.json, everything else untouched, atomic, locked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env

from llamafactory_ext import UserError
from llamafactory_ext.cli import main
from llamafactory_ext.data.register import register

COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}


def alpaca(path: Path, n: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": "I", "input": f"paper {i}", "output": f"review {i}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture
def info(tmp_path) -> Path:
    """An existing dataset_info.json with other entries and odd keys that must survive untouched."""
    path = tmp_path / "data" / "dataset_info.json"
    path.parent.mkdir()
    existing = {
        "zeta_sharegpt": {"file_name": "z.json", "formatting": "sharegpt", "columns": {"messages": "conversations"},
                          "tags": {"role_tag": "from"}},
        "alpha_hub": {"hf_hub_url": "someone/data", "subset": "x", "num_samples": 10},
        "middle": {"file_name": "m.jsonl", "custom_key": [1, 2, {"k": None}], "ümlaut": "ü"},
    }
    path.write_text(json.dumps(existing, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def test_adds_entry_and_keeps_everything_else(info, tmp_path, capsys):
    before = json.loads(info.read_text(encoding="utf-8"))
    data = alpaca(info.parent / "build" / "train.jsonl")
    assert main(["register", "reviews_train", str(data), "--dataset-info", str(info)]) == 0
    assert "reviews_train: added" in capsys.readouterr().out
    after = json.loads(info.read_text(encoding="utf-8"))
    assert list(after) == [*before, "reviews_train"]  # order kept, new entry at the end
    assert {k: after[k] for k in before} == before
    assert after["reviews_train"] == {"file_name": "build/train.jsonl", "formatting": "alpaca", "columns": COLUMNS}
    assert "ü" in info.read_text(encoding="utf-8")  # not \u-escaped


def test_file_outside_the_folder_is_absolute(info, tmp_path):
    data = alpaca(tmp_path / "elsewhere" / "test.jsonl")
    assert register("reviews_test", data, info) == "added"
    entry = json.loads(info.read_text())["reviews_test"]
    assert entry["file_name"] == str(data.resolve()) and Path(entry["file_name"]).is_absolute()


def test_identical_is_a_noop_and_different_needs_force(info, capsys):
    a = alpaca(info.parent / "a.jsonl")
    b = alpaca(info.parent / "b.jsonl")
    register("ds", a, info)
    text = info.read_bytes()
    assert main(["register", "ds", str(a), "--dataset-info", str(info)]) == 0
    assert "already registered identically" in capsys.readouterr().out
    assert info.read_bytes() == text

    with pytest.raises(UserError, match="already has a different dataset 'ds'.*--force"):
        register("ds", b, info)
    assert info.read_bytes() == text
    register("zz", a, info)
    assert register("ds", b, info, force=True) == "updated"
    after = json.loads(info.read_text())
    assert after["ds"]["file_name"] == "b.jsonl"
    assert list(after)[-2:] == ["ds", "zz"]  # replaced in place, not moved to the end


def test_creates_missing_dataset_info(tmp_path):
    info = tmp_path / "new" / "dataset_info.json"
    data = alpaca(tmp_path / "new" / "d.jsonl")
    assert register("d", data, info) == "added"
    assert json.loads(info.read_text()) == {"d": {"file_name": "d.jsonl", "formatting": "alpaca", "columns": COLUMNS}}


@pytest.mark.parametrize("content,message", [
    ('{"a": {"file_name": "x"},', "is not valid JSON"),
    ('["not", "an", "object"]', "must hold a JSON object"),
])
def test_malformed_dataset_info_is_named_and_never_overwritten(tmp_path, content, message):
    info = tmp_path / "dataset_info.json"
    info.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        register("d", alpaca(tmp_path / "d.jsonl"), info)
    assert str(info) in str(e.value)
    assert info.read_text() == content


@pytest.mark.parametrize("where", ["folder", "not-utf8", "under-a-file"])
def test_bad_dataset_info_place_is_a_one_line_error(tmp_path, capsys, where):
    data = alpaca(tmp_path / "d.jsonl")
    latin1 = '{"café": {"file_name": "x.jsonl"}}'.encode("latin-1")
    if where == "folder":
        info = tmp_path / "data"
        info.mkdir()
    elif where == "not-utf8":
        info = tmp_path / "dataset_info.json"
        info.write_bytes(latin1)
    else:
        (tmp_path / "file").write_text("x")
        info = tmp_path / "file" / "dataset_info.json"
    assert main(["register", "d", str(data), "--dataset-info", str(info)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert {"folder": "is a folder", "not-utf8": "is not UTF-8 text (byte 6 is 0xe9)",
            "under-a-file": "is a file, not a folder"}[where] in err
    if where == "not-utf8":
        assert info.read_bytes() == latin1  # untouched


def test_dataset_file_is_validated(tmp_path, info):
    with pytest.raises(UserError, match="does not exist"):
        register("d", tmp_path / "missing.jsonl", info)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"input": "p", "output": "r"}\n')
    with pytest.raises(UserError, match="no string 'instruction'"):
        register("d", bad, info)
    bad.write_text("{oops\n")
    with pytest.raises(UserError, match="bad.jsonl:1: invalid JSON"):
        register("d", bad, info)
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(UserError, match=".jsonl or .json"):
        register("d", txt, info)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"instruction": "i", "input": "p", "output": "r"}]))
    assert register("arr", array, info) == "added"
    with pytest.raises(UserError, match="without spaces or commas"):
        register("a,b", array, info)


def test_llamafactory_reads_the_entry(info):
    """LLaMA-Factory's own parser sees all three alpaca columns (none silently None)."""
    from llamafactory.data.parser import get_dataset_list

    register("reviews", alpaca(info.parent / "r.jsonl"), info)
    (attr,) = get_dataset_list(["reviews"], str(info.parent))
    assert (attr.load_from, attr.dataset_name, attr.formatting) == ("file", "r.jsonl", "alpaca")
    assert (attr.prompt, attr.query, attr.response) == ("instruction", "input", "output")


def test_concurrent_registrations_lose_nothing(tmp_path):
    """Eight processes register 10 names each at once: the lock keeps all 80."""
    info = tmp_path / "dataset_info.json"
    data = alpaca(tmp_path / "d.jsonl")
    code = ("import sys; from llamafactory_ext.data.register import register\n"
            "for i in range(10): register(f'w{sys.argv[1]}_{i}', sys.argv[2], sys.argv[3])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w), str(data), str(info)], env=cli_env())
             for w in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(json.loads(info.read_text())) == 80
    assert not list(tmp_path.glob(".*.tmp"))
