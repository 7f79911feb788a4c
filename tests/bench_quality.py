"""Does the pipeline make a reviewer? Base vs tuned SmolLM2-135M-Instruct on held-out real papers.

    make bench-quality                                  # = python tests/bench_quality.py
    python tests/bench_quality.py --test-size 40 --temps "0.35 0.5"

Trains with the shipped recipe (sft_recipes/smollm2_sample.yaml: its steps, learning rate, 640-token records)
on papers of the ICLR 2022 bench in ../shared/data/iclr2022 (389 papers; the shipped 36-paper sample when
that folder is absent), holds out --test-size papers (disjoint from training, split by paper), predicts them
with the untuned base model and with the tuned one, and writes one table (metrics.csv / .md) and one PNG
comparing them. Everything runs in build/bench-quality/ with its own dataset_info.json: your runs/ and
dataset_info.json are not touched. Prints the time of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data" / "iclr2022" / "paper_review.jsonl"


def workspace(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for d in ("sft_recipes", "deepspeed", "build", "data/sample"):
        link = path / d
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(ROOT / d)
    info = path / "dataset_info.json"
    if not info.exists():
        info.write_text("{}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED if SHARED.is_file() else ROOT / "data/sample/paper_review.jsonl"),
                   help="paper-review JSONL (default: the shared ICLR 2022 bench, else the shipped sample)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--test-size", type=int, default=20, help="held-out papers (default 20)")
    p.add_argument("--temps", default="0.35", help='temperatures, e.g. "0.35 0.5"')
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the family's")
    p.add_argument("--out", default=str(ROOT / "build" / "bench-quality"), help="scratch project folder")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    sys.path.insert(0, str(ROOT))
    from llamafactory_ext import families
    from llamafactory_ext.data.prepare import prepare
    from llamafactory_ext.demo import _launch, format_table, plot_comparison, read_metrics

    fam = families.get(args.model)
    ws = workspace(Path(args.out))
    os.chdir(ws)
    shutil.rmtree(ws / "runs" / "bench", ignore_errors=True)
    times, t0 = {}, time.monotonic()

    def stage(name, fn, *a, **kw):
        s = time.monotonic()
        out = fn(*a, **kw)
        times[name] = time.monotonic() - s
        print(f"[bench-quality] {name}: {times[name]:.0f} s", file=sys.stderr, flush=True)
        return out

    stage("model", families.ensure_model, fam)
    built = stage("data", prepare, fam.name, Path(args.data).resolve(), "bench", test_size=str(args.test_size))
    common = ["--model", fam.name, "--data", "bench", "--run", "bench"]
    stage("sft", _launch, ["sft", *common, "--resume", "never"])
    stage("merge", _launch, ["merge", *common])
    extra = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []
    stage("predict base", _launch, ["predict", *common, "--base", "--temps", args.temps, *extra])
    stage("predict tuned", _launch, ["predict", *common, "--temps", args.temps, *extra])
    times["total"] = time.monotonic() - t0

    pred = ws / "runs" / "bench" / "predict"
    rows = read_metrics(pred / "metrics.csv")
    train = built["bench_train"]
    state = json.loads((ws / "runs/bench/adapter/trainer_state.json").read_text())
    title = (f"{fam.name}: base vs tuned, {rows[0]['n']} held-out papers "
             f"({state['global_step']} steps on {train['records']} papers, {train['budget']}-token records)")
    png = plot_comparison(rows, pred / "base_vs_tuned.png", title)
    print(f"\n{title}\n")
    print(format_table(rows))
    print(f"\ndata: {args.data}; held-out papers: {rows[0]['n']}; steps: {state['global_step']}; "
          f"record budget: {train['budget']} tokens; paper budget at inference: {fam.paper_budget} tokens")
    print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"wrote {pred / 'metrics.csv'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
