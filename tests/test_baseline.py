"""The GPT-4o baseline renderer reproduces the bench's four-criteria `output` byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT

from llamafactory_ext.cli import main
from llamafactory_ext.eval.baseline import convert, render_gpt4o

SHARED = ROOT.parent / "shared" / "data" / "iclr2022"


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


def _check(raw: list[dict], paper_review: list[dict]) -> int:
    expected = {r["paper_id"]: r["output"] for r in paper_review}
    assert {r["paper_id"] for r in raw} == set(expected)
    for r in raw:
        assert render_gpt4o(r) == expected[r["paper_id"]], r["paper_id"]
    return len(raw)


def test_sample_slice_renders_exactly():
    assert _check(_rows(ROOT / "data/sample/gpt4o_reviews_raw.jsonl"), _rows(ROOT / "data/sample/paper_review.jsonl")) == 36


def test_committed_gpt4o_reviews_is_up_to_date(tmp_path):
    out = tmp_path / "g.jsonl"
    assert main(["baseline", str(ROOT / "data/sample/gpt4o_reviews_raw.jsonl"), str(out)]) == 0
    assert out.read_bytes() == (ROOT / "data/sample/gpt4o_reviews.jsonl").read_bytes()
    assert set(_rows(out)[0]) == {"paper_id", "review"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared ICLR 2022 bench is not on this machine")
def test_all_389_shared_papers_render_exactly():
    assert _check(_rows(SHARED / "gpt4o_reviews.jsonl"), _rows(SHARED / "paper_review.jsonl")) == 389


def test_bad_input_is_reported(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"paper_id": "x", "summary": "s", "strengths": "not a list", "weaknesses": [], '
                   '"questions": [], "limitations": []}\n')
    assert main(["baseline", str(raw), str(tmp_path / "o.jsonl")]) == 2
    assert "raw.jsonl:1: field 'strengths' must be a list of strings" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(Exception, match="no such file"):
        convert(tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
