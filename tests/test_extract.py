"""extract: section parsing, LLaMA-Factory-identical metrics, per-run outputs, and a real predict run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from llamafactory_ext import REVIEWER_INSTRUCTION, cli
from llamafactory_ext.eval.extract import extract, similarity
from llamafactory_ext.eval.sections import (
    HEADERS,
    SECTION_KEYS,
    parse_sections,
    render_markdown,
    render_review,
)

SIG, ACC, REJ, SUG = SECTION_KEYS


def _load(path: Path) -> list[dict]:
    """JSONL rows (split on "\\n" only: str.splitlines would also split at U+2028 inside strings)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]


# ----------------------------------------------------------------------------- parse_sections
def test_training_layout_round_trips_byte_for_byte(sample_jsonl):
    for row in _load(sample_jsonl):
        out = row["output"]
        sec = parse_sections(out)
        assert sec["has_all_sections"] is True
        assert render_review(sec) == out


@pytest.mark.parametrize("header, key", [
    ("[Significance and novelty]", SIG),
    ("**Significance and novelty**", SIG),
    ("## Potential reasons for acceptance", ACC),
    ("### 2. Potential Reasons for Acceptance:", ACC),
    ("Importance and novelty:", SIG),
    ("** importance and novelty **", SIG),  # the instruction's own spelling
    ("IMPORTANCE AND NOVELTY", SIG),
    ("Reasons to reject", REJ),
    ("- **Potential reasons for rejection**", REJ),
    ("__Suggestions for improvement__", SUG),
    ("# Suggestions", SUG),
    ("[suggestions for improvements]", SUG),
])
def test_header_variants(header, key):
    sec = parse_sections(f"preamble that is ignored\n{header}\nbody line\n")
    assert sec[key] == "body line"
    assert all(sec[k] == "" for k in SECTION_KEYS if k != key)
    assert sec["has_all_sections"] is False


@pytest.mark.parametrize("line, key, content", [
    ("Importance and novelty: The paper is new.", SIG, "The paper is new."),
    ("**Significance and novelty:** It matters.", SIG, "It matters."),
    ("**Potential reasons for rejection**: weak baselines", REJ, "weak baselines"),
    ("[Suggestions for improvement] - add ablations", SUG, "- add ablations"),
])
def test_content_on_the_header_line(line, key, content):
    assert parse_sections(line)[key] == content


@pytest.mark.parametrize("prose", [
    "Significance of the results is unclear.",
    "Suggestions for improvement include more baselines.",
    "**Novelty** of this work is limited.",
    "* Significance: a bullet inside another section",
    "The reasons for acceptance are clear: strong results.",
])
def test_prose_is_not_a_header(prose):
    sec = parse_sections(f"[Potential reasons for acceptance]\n- good\n{prose}\n")
    assert sec[ACC] == f"- good\n{prose}"
    assert sec[SIG] == sec[REJ] == sec[SUG] == ""


def test_all_four_sections_in_markdown_and_repeats_are_joined():
    text = ("## Significance and novelty\nNew idea.\n\n## Potential reasons for acceptance\n- a\n"
            "## Potential reasons for rejection\n- r\n## Suggestions for improvement\n- s1\n"
            "## Suggestions for improvement\n- s2\n")
    sec = parse_sections(text)
    assert sec == {SIG: "New idea.", ACC: "- a", REJ: "- r", SUG: "- s1\n\n- s2", "has_all_sections": True}


def test_empty_or_headerless_text():
    for text in ("", "just some words\nwithout any header"):
        sec = parse_sections(text)
        assert [sec[k] for k in SECTION_KEYS] == ["", "", "", ""] and sec["has_all_sections"] is False
    md = render_markdown(parse_sections("garbage out"), title="T", raw="garbage out")
    assert "## Raw model output" in md and "garbage out" in md
    assert md.count("_(section missing in the model output)_") == 4


def test_a_present_but_empty_section_is_missing():
    sec = parse_sections("[Significance and novelty]\nx\n[Potential reasons for acceptance]\n\n"
                         "[Potential reasons for rejection]\ny\n[Suggestions for improvement]\nz")
    assert sec[ACC] == "" and sec["has_all_sections"] is False


# ----------------------------------------------------------------------------- metrics
class _IndexTokenizer:
    """Lets LLaMA-Factory's ComputeSimilarity score strings: token id i 'decodes' to texts[i]."""

    pad_token_id = 0

    def __init__(self, texts: list[str]):
        self.texts = texts

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.texts[int(row[0])] for row in ids]


def _llamafactory_scores(preds: list[str], labels: list[str]) -> dict[str, float]:
    """LLaMA-Factory's own ComputeSimilarity (what its predict writes to predict_results.json) on texts."""
    import numpy as np
    from llamafactory.train.sft.metric import ComputeSimilarity
    from transformers import EvalPrediction

    n = len(preds)
    metric = ComputeSimilarity(tokenizer=_IndexTokenizer(list(preds) + list(labels)))
    ev = EvalPrediction(predictions=np.arange(n).reshape(n, 1), label_ids=np.arange(n, 2 * n).reshape(n, 1))
    return metric(ev, compute_result=True)


def test_similarity_is_llamafactory_own_metric(sample_jsonl):
    """extract's metric (written out, so that `make predict` does not import LLaMA-Factory for it) gives what
    LLaMA-Factory's ComputeSimilarity gives: real reviews scored against other papers' reviews, a review against
    its own first half, an empty side, another script."""
    reviews = [json.loads(x)["output"] for x in sample_jsonl.open()][:12]
    preds = reviews[:6] + [r[: len(r) // 2] for r in reviews[6:9]] + ["", "完全不同的文本 with mixed scripts", "   "]
    labels = reviews[6:12] + reviews[6:9] + ["non-empty label", "完全不同 text", "a label"]
    got, want = similarity(preds, labels), _llamafactory_scores(preds, labels)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert 0 < got["rouge-1"] < 100 and 0 < got["bleu-4"] < 100
    assert similarity(["same text here"], ["same text here"])["bleu-4"] == pytest.approx(100.0)
    one = similarity([""], ["non-empty label"])
    assert one["rouge-1"] == one["rouge-l"] == 0.0


# ----------------------------------------------------------------------------- the command
def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def two_runs(tmp_path, sample_jsonl):
    rows = _load(sample_jsonl)[:3]
    ids = _write_jsonl(tmp_path / "test.jsonl", [
        {"paper_id": r["paper_id"], "instruction": REVIEWER_INSTRUCTION, "input": r["input"][:200],
         "output": r["output"]} for r in rows])
    good = [{"prompt": "p", "predict": r["output"], "label": r["output"]} for r in rows]
    bad = [{"prompt": "p", "predict": "**Significance and novelty**: meh\nno other sections",
            "label": " " + r["output"]} for r in rows]  # mistral labels start with a space: still aligned
    return {
        "rows": rows, "ids": ids,
        "a": _write_jsonl(tmp_path / "pred" / "temp_0.35" / "generated_predictions.jsonl", good),
        "b": _write_jsonl(tmp_path / "pred" / "temp_0.5" / "generated_predictions.jsonl", bad),
    }


def test_extract_two_runs(tmp_path, two_runs, capsys):
    out = tmp_path / "out"
    rc = cli.main(["extract", str(two_runs["a"]), str(two_runs["b"]), "--ids", str(two_runs["ids"]),
                   "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| temp_0.35 |" in printed and "| temp_0.5 |" in printed
    with (out / "metrics.csv").open() as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert set(table) == {"temp_0.35", "temp_0.5"}
    a, b = table["temp_0.35"], table["temp_0.5"]
    assert a["n"] == b["n"] == "3"
    assert float(a["bleu-4"]) == pytest.approx(100.0) and float(a["rouge-l"]) == pytest.approx(100.0)
    assert float(a["all_sections_%"]) == 100.0 and float(b["all_sections_%"]) == 0.0
    assert float(b["bleu-4"]) < 10
    words = [len(r["output"].split()) for r in two_runs["rows"]]
    assert float(a["words_mean"]) == pytest.approx(sum(words) / 3, abs=1e-3)
    assert float(a["words_median"]) == sorted(words)[1]
    assert (out / "metrics.md").read_text().count("\n") == 4  # header, rule, two rows

    recs = _load(out / "temp_0.35" / "reviews.jsonl")
    assert [r["paper_id"] for r in recs] == [r["paper_id"] for r in two_runs["rows"]]
    assert recs[0]["review"] == two_runs["rows"][0]["output"]
    assert set(recs[0]) == {"paper_id", "review", *SECTION_KEYS, "has_all_sections"}
    bad = _load(out / "temp_0.5" / "reviews.jsonl")
    assert bad[0][SIG] == "meh\nno other sections" and bad[0]["has_all_sections"] is False
    md = (out / "temp_0.35" / "md" / f"{recs[0]['paper_id']}.md").read_text()
    assert all(f"## {h}" in md for h in HEADERS.values())
    assert len(list((out / "temp_0.5" / "md").glob("*.md"))) == 3


def test_max_samples_prefix_of_ids_is_accepted(tmp_path, two_runs, capsys):
    preds = _load(two_runs["a"])[:2]
    a = _write_jsonl(tmp_path / "ms" / "generated_predictions.jsonl", preds)
    extract([a], tmp_path / "o", ids_path=two_runs["ids"])
    assert "using the first 2 (max_samples?)" in capsys.readouterr().err
    recs = _load(tmp_path / "o" / "ms" / "reviews.jsonl")
    assert [r["paper_id"] for r in recs] == [r["paper_id"] for r in two_runs["rows"][:2]]


def test_extract_without_ids_and_with_names(tmp_path, two_runs):
    out = tmp_path / "o"
    rows = extract([two_runs["a"], two_runs["b"]], out, names=["x", "y"])
    assert [r["run"] for r in rows] == ["x", "y"]
    recs = _load(out / "x" / "reviews.jsonl")
    assert [r["paper_id"] for r in recs] == ["0", "1", "2"]
    assert sorted(p.name for p in (out / "x" / "md").iterdir()) == ["0.md", "1.md", "2.md"]


@pytest.mark.parametrize("case, message", [
    ("count", "has 2 records but"),
    ("count_noref", "has 4 records but"),
    ("misaligned", "does not match the label of prediction 1"),
    ("badjson", "generated_predictions.jsonl:2: not valid JSON"),
    ("nofield", "generated_predictions.jsonl:1: field 'predict' must be a string"),
    ("dupname", "is used by more than one prediction file"),
    ("names", "got 1 --name for 2 prediction files"),
    ("dupid", "test.jsonl:3: duplicate paper_id"),
    ("noid", "test.jsonl:2: field 'paper_id' must be a non-empty string"),
])
def test_extract_errors(tmp_path, two_runs, capsys, case, message):
    a, ids = two_runs["a"], two_runs["ids"]
    args = [str(a), "--ids", str(ids)]
    lines = ids.read_text().splitlines()
    if case == "count":
        ids.write_text("\n".join(lines[:2]) + "\n")
    elif case == "count_noref":  # more ids than predictions is only accepted when labels can be checked
        rows = [{"paper_id": f"x{i}"} for i in range(4)]
        _write_jsonl(ids, rows)
    elif case == "misaligned":
        ids.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    elif case == "badjson":
        a.write_text(a.read_text().splitlines()[0] + "\n{oops\n")
    elif case == "nofield":
        a.write_text(json.dumps({"prompt": "p", "label": "l"}) + "\n")
    elif case == "dupname":
        other = _write_jsonl(tmp_path / "else" / "temp_0.35" / "generated_predictions.jsonl",
                             _load(a))
        args = [str(a), str(other)]
    elif case == "names":
        args = [str(a), str(two_runs["b"]), "--name", "only-one"]
    elif case in ("dupid", "noid"):
        rows = [json.loads(x) for x in lines]
        if case == "dupid":
            rows[2]["paper_id"] = rows[0]["paper_id"]
        else:
            rows[1]["paper_id"] = ""
        _write_jsonl(ids, rows)
    rc = cli.main(["extract", *args, "--out", str(tmp_path / "out")])
    assert rc == 2
    assert message in capsys.readouterr().err

# (that these metrics equal LLaMA-Factory's own predict_results.json on a real predict: test_pipeline.py
# test_metrics_are_written, on both tiny runs)
