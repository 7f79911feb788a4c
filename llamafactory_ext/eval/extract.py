"""Turn LLaMA-Factory's generated_predictions.jsonl into reviews and a metrics table.

Per run (one PRED file; named by --name, else by its folder, e.g. `temp_0.35`) it writes
`OUT/<run>/reviews.jsonl` (paper_id, the full review and its four sections parsed, has_all_sections)
and `OUT/<run>/md/<paper_id>.md`. Over all runs: `OUT/metrics.md` and `OUT/metrics.csv`, one row
per run: BLEU-4 and ROUGE-1/2/L exactly as LLaMA-Factory's predict computes them (the formula
of its `ComputeSimilarity`: jieba words for ROUGE, characters for BLEU-4 with smoothing method3, x100,
averaged), the share of reviews with all four sections, and length statistics.

--ids is the alpaca JSONL that was predicted (same order, one `paper_id` per line); without it
papers are numbered by line. When it also has `output`, every label is checked against it (first
200 non-space characters), so a misaligned file is caught instead of silently mislabelling papers,
and a prediction run with max_samples (the first N records) is accepted.

    llamafactory-ext extract runs/tiny_sample/predict/temp_0.35/generated_predictions.jsonl \\
        runs/tiny_sample/predict/temp_0.5/generated_predictions.jsonl \\
        --ids data/build/sample/test.jsonl --out runs/tiny_sample/predict
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import sys
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.eval.sections import SECTION_KEYS, parse_sections, render_markdown
from llamafactory_ext.fileio import atomic_write, atomic_write_text, read_jsonl, unique_paper_id

METRIC_COLUMNS = ["run", "n", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "all_sections_%",
                  "words_mean", "words_median", "chars_mean", "chars_median", "ref_words_mean"]


# ----------------------------------------------------------------------------- reading
def read_predictions(path: Path) -> list[dict]:
    """[{'predict', 'label'}] from a generated_predictions.jsonl, validated line by line."""
    out = []
    for i, row in read_jsonl(path, "predictions file"):
        for k in ("predict", "label"):
            if not isinstance(row.get(k), str):
                raise UserError(f"{path}:{i}: field {k!r} must be a string (is this LLaMA-Factory's "
                                f"generated_predictions.jsonl?)")
        out.append({"predict": row["predict"], "label": row["label"]})
    if not out:
        raise UserError(f"{path}: no predictions in the file")
    return out


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s)


def read_ids(path: Path, preds: list[dict], pred_path: Path) -> list[str]:
    """paper_ids for `preds` from the predicted alpaca file; checks count and (if present) labels."""
    rows = read_jsonl(path, "--ids file")
    checkable = all(isinstance(r.get("output"), str) for _, r in rows)
    if len(rows) > len(preds) and checkable:
        # LLaMA-Factory's max_samples predicts the first N records; every label is checked below.
        print(f"note: {pred_path} has {len(preds)} predictions, --ids {path} {len(rows)} records: using the "
              f"first {len(preds)} (max_samples?)", file=sys.stderr)
        rows = rows[:len(preds)]
    if len(rows) != len(preds):
        raise UserError(f"--ids {path} has {len(rows)} records but {pred_path} has {len(preds)} predictions; "
                        f"pass the exact file that was predicted")
    ids, seen = [], {}
    for (i, row), pred in zip(rows, preds, strict=True):
        pid = unique_paper_id(path, i, row, seen)
        ref = row.get("output")
        if isinstance(ref, str):  # alignment: the label (maybe cut by cutoff_len) starts the reference
            if not _squash(ref).startswith(_squash(pred["label"])[:200]):
                raise UserError(f"{path}:{i} (paper_id {pid!r}): its 'output' does not match the label of "
                                f"prediction {len(ids) + 1} in {pred_path}; the two files are not aligned")
        ids.append(pid)
    return ids


# ----------------------------------------------------------------------------- metrics
def similarity(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Mean BLEU-4 / ROUGE-1/2/L (x100) of texts, computed as LLaMA-Factory 0.9.5's `ComputeSimilarity`
    (train/sft/metric.py) computes them after decoding: jieba words for ROUGE (0 when either side has no
    word), characters for BLEU-4 with smoothing method3, each score rounded to 4 places, then the mean.
    Written out here, not imported: `llamafactory.train.sft.metric` imports all of LLaMA-Factory (~8 s at
    every `make predict`); tests/test_extract.py checks it against LLaMA-Factory's own class on real reviews,
    and test_pipeline against the predict_results.json of a real predict."""
    import logging

    import jieba
    import numpy as np
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    scores: dict[str, list[float]] = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(preds, labels, strict=True):
        hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
        if not " ".join(hyp).split() or not " ".join(ref).split():
            rouge = {k: 0.0 for k in ("rouge-1", "rouge-2", "rouge-l")}
        else:
            rouge = {k: v["f"] for k, v in Rouge().get_scores(" ".join(hyp), " ".join(ref))[0].items()}
        for k, v in rouge.items():
            scores[k].append(round(v * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def run_row(name: str, reviews: list[dict], labels: list[str]) -> dict:
    texts = [r["review"] for r in reviews]
    words = [len(t.split()) for t in texts]
    chars = [len(t) for t in texts]
    row = {"run": name, "n": len(texts)}
    pairs = [(t, ref) for t, ref in zip(texts, labels, strict=True) if ref.strip()]
    if pairs:  # over the papers that have a reference review (predict PAPERS=file may hold some without)
        row.update(similarity([t for t, _ in pairs], [ref for _, ref in pairs]))
        row["ref_words_mean"] = statistics.fmean(len(ref.split()) for _, ref in pairs)
    else:  # no reference review at all: no reference metrics
        row.update({k: "" for k in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "ref_words_mean")})
    row["all_sections_%"] = 100.0 * sum(r["has_all_sections"] for r in reviews) / len(reviews)
    row.update(words_mean=statistics.fmean(words), words_median=statistics.median(words),
               chars_mean=statistics.fmean(chars), chars_median=statistics.median(chars))
    return row


def format_markdown(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(METRIC_COLUMNS) + " |", "|" + "---|" * len(METRIC_COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in METRIC_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: (round(r[c], 4) if isinstance(r[c], float) else r[c]) for c in METRIC_COLUMNS})
    return buf.getvalue()


# ----------------------------------------------------------------------------- writing
def safe_filename(paper_id: str) -> str:
    """A paper_id as a file name: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", paper_id).lstrip(".")
    return name or "_"


def write_run(run_dir: Path, ids: list[str], preds: list[dict]) -> list[dict]:
    """reviews.jsonl + md/<paper_id>.md for one run; returns the review records."""
    reviews = []
    for pid, p in zip(ids, preds, strict=True):
        sec = parse_sections(p["predict"])
        reviews.append({"paper_id": pid, "review": p["predict"], **{k: sec[k] for k in SECTION_KEYS},
                        "has_all_sections": sec["has_all_sections"]})
    with atomic_write(run_dir / "reviews.jsonl", "w", encoding="utf-8") as f:
        for r in reviews:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    md_dir = run_dir / "md"
    names = {safe_filename(r["paper_id"]) + ".md" for r in reviews}
    if len(names) != len(reviews):
        raise UserError("two paper_ids map to the same Markdown file name; make the ids differ in "
                        "more than punctuation")
    for r in reviews:
        atomic_write_text(md_dir / (safe_filename(r["paper_id"]) + ".md"),
                          render_markdown(r, title=f"Review of {r['paper_id']}", raw=r["review"]))
    for old in md_dir.glob("*.md"):  # files of papers no longer in this run
        if old.name not in names:
            old.unlink()
    return reviews


def extract(preds_paths: list[Path], out: Path, ids_path: Path | None = None,
            names: list[str] | None = None) -> list[dict]:
    """The whole command; returns the metric rows (one per PRED file)."""
    if names and len(names) != len(preds_paths):
        raise UserError(f"got {len(names)} --name for {len(preds_paths)} prediction files; give one per file "
                        f"or none")
    names = names or [Path(p).resolve().parent.name for p in preds_paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"run name {sorted(dup)[0]!r} is used by more than one prediction file; "
                        f"name them with --name (one per file)")
    for n in names:
        if not n or n in (".", "..") or "/" in n or "\\" in n:
            raise UserError(f"run name {n!r} is not usable as a folder name; pass --name")
    rows = []
    for path, name in zip(map(Path, preds_paths), names, strict=True):
        preds = read_predictions(path)
        ids = read_ids(ids_path, preds, path) if ids_path else [str(i) for i in range(len(preds))]
        reviews = write_run(out / name, ids, preds)
        rows.append(run_row(name, reviews, [p["label"] for p in preds]))
    atomic_write_text(out / "metrics.md", format_markdown(rows))
    atomic_write_text(out / "metrics.csv", format_csv(rows))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preds", nargs="+", metavar="PRED", help="generated_predictions.jsonl (one per run)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (runs go to DIR/<run>/)")
    p.add_argument("--ids", metavar="IDS_JSONL", help="the alpaca JSONL that was predicted (has paper_id)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="run name, once per PRED in order (default: the PRED file's folder name)")


def run(args: argparse.Namespace) -> int:
    rows = extract([Path(p) for p in args.preds], Path(args.out), Path(args.ids) if args.ids else None,
                   args.name)
    sys.stdout.write(format_markdown(rows))
    print(f"wrote {Path(args.out) / 'metrics.md'}, {Path(args.out) / 'metrics.csv'} and "
          f"{', '.join(str(Path(args.out) / r['run'] / 'reviews.jsonl') for r in rows)}", file=sys.stderr)
    return 0
