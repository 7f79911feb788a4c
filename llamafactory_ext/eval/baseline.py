"""Render GPT-4o's structured reviews in the four-criteria layout: the "vs GPT-4" side of the judge.

The mapping is the one the ICLR 2022 bench's `paper_review.jsonl` `output` uses (checked byte for
byte on all 389 papers by tests/test_baseline.py):

    summary                  -> [Significance and novelty]          (the text as is)
    strengths                -> [Potential reasons for acceptance]  ("- " bullets)
    weaknesses               -> [Potential reasons for rejection]   ("- " bullets)
    questions + limitations  -> [Suggestions for improvement]       ("- " bullets, in that order)

    llamafactory-ext baseline data/sample/gpt4o_reviews_raw.jsonl data/sample/gpt4o_reviews.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.eval.sections import bullets, render_review
from llamafactory_ext.fileio import atomic_write, read_jsonl

LIST_FIELDS = ("strengths", "weaknesses", "questions", "limitations")


def render_gpt4o(row: dict) -> str:
    """One structured GPT-4o review (summary, strengths, ...) -> the four-criteria review text."""
    return render_review({
        "significance_and_novelty": row["summary"],
        "reasons_for_acceptance": bullets(row["strengths"]),
        "reasons_for_rejection": bullets(row["weaknesses"]),
        "suggestions_for_improvement": bullets(list(row["questions"]) + list(row["limitations"])),
    })


def _check(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("paper_id"), str) or not row["paper_id"]:
        raise UserError(f"{where}: field 'paper_id' must be a non-empty string")
    if not isinstance(row.get("summary"), str):
        raise UserError(f"{where}: field 'summary' must be a string")
    for k in LIST_FIELDS:
        v = row.get(k)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise UserError(f"{where}: field {k!r} must be a list of strings")
    return row


def convert(raw_path: str | Path, out_path: str | Path) -> int:
    """Write `{"paper_id", "review"}` per line of `raw_path` to `out_path` (atomically); returns the count."""
    raw_path = Path(raw_path)
    out = []
    for i, row in read_jsonl(raw_path, "GPT-4o reviews"):
        row = _check(row, f"{raw_path}:{i}")
        out.append({"paper_id": row["paper_id"], "review": render_gpt4o(row)})
    with atomic_write(out_path, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("raw", help="GPT-4o structured reviews (JSONL: paper_id, summary, strengths, ...)")
    p.add_argument("out", help="output JSONL: paper_id, review")


def run(args: argparse.Namespace) -> int:
    n = convert(args.raw, args.out)
    print(f"{n} reviews -> {args.out}")
    return 0
