"""Benchmark `llamafactory-ext convert` and `truncate` against their baselines, in one run (`make bench-data`).

    python tests/bench_data.py [--papers 2000] [--only convert|truncate] [--workdir DIR] [--loop-sample 100]

Not collected by pytest (no `test_` prefix). Prerequisite for convert: the `jq` binary (Debian:
`apt-get install -y jq`).

convert:

Generates a realistic paper-review JSONL (ICLR papers from the shared data or the committed sample, cut
or repeated to ~50 KB each, real reviews, some non-ASCII, and ~0.5 % bad lines), then measures, in one run
and as separate processes (so every figure includes its own start-up):
  - `llamafactory-ext convert` on the clean file and on the file with bad lines;
  - the seed's loop, `while read line; do echo "$line" | jq -c '...'; done`, on a small sample,
    extrapolated per line (it spawns one jq per line);
  - one single `jq -c` process doing the same mapping over the whole clean file (jq stops at the
    first bad line, so it only gets the clean file);
  - a bare orjson read-parse-dump loop (the speed of light for this job in Python);
  - convert's peak RSS on the file and on one twice as large (flat memory: it streams).
Prints a Markdown table and checks the targets: >= 100x the seed loop, >= 3x single jq, >= 0.5x bare orjson.

truncate (the same file through convert; budget 12,288, LLaMA-Factory's template of each tokenizer), once
with the tiny Mistral tokenizer and once with SmolLM2-135M-Instruct's real 49K-vocabulary one (skipped, and
said so, when SmolLM2 is not built: `llamafactory-ext smollm2`). Measures, as separate processes, CPU time
(user + sys, children included), wall time and peak RSS of:
  - the floor: a process that loads the tokenizer and tokenizes each record's texts once, one call per text
    (instruction + "\\n" + paper, and the review) — what any exact cut must at least do;
  - `llamafactory-ext truncate` with 1 and with 2 tokenizer threads (`--workers`).
Start-up (the same commands on a one-record file) is shown apart; "streaming" ratios leave it out.
Checks: truncate's CPU time within 1.3x the floor's, and its output byte-identical to the plain algorithm
(tests/truncate_reference.py) on the first `--check` records.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT.parent / "shared" / "data" / "iclr2022" / "paper_review.jsonl", ROOT / "data" / "sample" / "paper_review.jsonl"]
JQ_FILTER = "{instruction: $instr, input: .input, output: .output, paper_id: .paper_id}"
BARE_LOOP = """
import sys, orjson
instr = sys.argv[3]
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as out:
    for line in f:
        r = orjson.loads(line)
        out.write(orjson.dumps({"instruction": instr, "input": r["input"], "output": r["output"],
                                "paper_id": r["paper_id"]}) + b"\\n")
"""
BAD_LINES = [b"{not json", b'{"input": "paper only"}', b'{"input": "", "output": "r"}', b"[1, 2]",
             b'{"input": "caf\xe9", "output": "r"}', b'{"input": 3, "output": "r"}']


def generate(path: Path, papers: int, *, bad: bool, seed: int = 0) -> int:
    """Write `papers` records of ~50 KB (plus ~0.5 % bad lines if `bad`); returns the line count."""
    src = next((p for p in SOURCES if p.exists()), None)
    if src is None:
        sys.exit("no source data found: " + ", ".join(map(str, SOURCES)))
    real = [json.loads(line) for line in src.read_text(encoding="utf-8").split("\n") if line.strip()]
    rng = random.Random(seed)
    lines = 0
    with open(path, "wb") as f:
        for i in range(papers):
            base = real[i % len(real)]
            text = base["input"]
            while len(text) < 50_000:
                text += "\n\n" + real[rng.randrange(len(real))]["input"]
            start = rng.randrange(0, max(1, len(text) - 50_000))
            paper = f"# Paper {i} — résumé ünïcödé 论文\n\n" + text[start:start + 50_000]
            f.write(orjson.dumps({"paper_id": f"{base['paper_id']}-{i}", "input": paper, "output": base["output"]})
                    + b"\n")
            lines += 1
            if bad and i % 200 == 199:
                f.write(BAD_LINES[(i // 200) % len(BAD_LINES)] + b"\n")
                lines += 1
    return lines


# A small launcher process measures each command: its child's peak RSS is then the command's own, not
# inherited from this (large) process; with `-S` it skips site-packages and stays at a few MB itself.
LAUNCHER = """
import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 2)
    if sys.argv[1] == "-":
        os.dup2(fd, 1)
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)
"""


def timed(cmd: list[str] | str, *, shell: bool = False, cpu: bool = False) -> tuple[float, ...]:
    """Run a command (stdout and stderr discarded unless a shell redirects them);
    -> (wall seconds, peak RSS in KiB of it and its children, exit code[, CPU seconds])."""
    argv = ["bash", "-c", cmd] if shell else cmd
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, "-", *argv], capture_output=True, text=True,
                         check=True).stdout.split()
    wall, rss, code, cpu_s = float(out[0]), int(out[1]), int(out[2]), float(out[3])
    return (wall, rss, code, cpu_s) if cpu else (wall, rss, code)


CLI = str(Path(sys.executable).with_name("llamafactory-ext"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--papers", type=int, default=2000, help="records in the benchmark file (default 2000)")
    ap.add_argument("--only", choices=("convert", "truncate"), help="run one of the two benchmarks")
    ap.add_argument("--loop-sample", type=int, default=100, help="lines timed for the per-line jq loop (default 100)")
    ap.add_argument("--repeats", type=int, default=3, help="convert: runs per measurement, fastest kept (default 3)")
    ap.add_argument("--truncate-repeats", type=int, default=1,
                    help="truncate: runs per measurement, least CPU kept (default 1: a run takes a minute)")
    ap.add_argument("--check", type=int, default=200, metavar="N",
                    help="truncate: compare the output with the plain algorithm on the first N records "
                         "(default 200; -1 = all, 0 = none)")
    ap.add_argument("--workdir", help="where to put the generated files (default: a temp folder, removed)")
    args = ap.parse_args()
    if args.only != "truncate" and shutil.which("jq") is None:
        sys.exit("the jq binary is needed (Debian/Ubuntu: apt-get install -y jq)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        clean = work / "clean.jsonl"
        n_clean = generate(clean, args.papers, bad=False)
        ok = True
        if args.only != "truncate":
            ok &= bench_convert(args, work, clean, n_clean)
        if args.only != "convert":
            ok &= bench_truncate(args, work, clean, n_clean)
        return 0 if ok else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def bench_convert(args, work: Path, clean: Path, n_clean: int) -> bool:
    jq = shutil.which("jq")
    from llamafactory_ext import REVIEWER_INSTRUCTION as instr

    cli = CLI
    dirty, double = work / "dirty.jsonl", work / "double.jsonl"
    n_dirty = generate(dirty, args.papers, bad=True)
    generate(double, 2 * args.papers, bad=True)
    size = clean.stat().st_size
    print(f"file: {n_clean} lines, {size / 1e6:.1f} MB ({size / n_clean / 1e3:.1f} KB/line); "
          f"jq: {subprocess.run([jq, '--version'], capture_output=True, text=True).stdout.strip()}; "
          f"python {sys.version.split()[0]}, orjson {orjson.__version__}", file=sys.stderr)

    out = work / "out.jsonl"
    one = work / "one.jsonl"  # one record: what a tool costs before it streams anything (start-up)
    with open(clean, "rb") as f:
        one.write_bytes(f.readline())

    def convert_cmd(path):
        return [cli, "convert", str(path), str(out)]

    def bare_cmd(path):
        return [sys.executable, "-c", BARE_LOOP, str(path), str(out), instr]

    def jq_cmd(path):
        return f"{jq} -c --arg instr {sh(instr)} {sh(JQ_FILTER)} {sh(str(path))} > {sh(str(out))}"

    jobs = {  # name -> (command, shell); run round-robin so that load from other processes hits all alike
        "convert": (convert_cmd(clean), False), "dirty": (convert_cmd(dirty), False),
        "bare": (bare_cmd(clean), False), "jq": (jq_cmd(clean), True),
        "start convert": (convert_cmd(one), False), "start bare": (bare_cmd(one), False),
        "start jq": (jq_cmd(one), True),
    }
    results: dict[str, list] = {name: [] for name in jobs}
    for _ in range(args.repeats):
        for name, (cmd, shell) in jobs.items():
            results[name].append(timed(cmd, shell=shell))
    best = {name: min(rs, key=lambda r: r[0]) for name, rs in results.items()}  # the least disturbed run
    runs = {k: best[k] for k in ("convert", "dirty", "bare", "jq")}
    startup = {k: best[f"start {k}"][0] for k in ("convert", "bare", "jq")}
    startup["dirty"] = startup["convert"]
    double_run = timed(convert_cmd(double))
    sample = work / "sample.jsonl"
    with open(clean, "rb") as f, open(sample, "wb") as smp:
        for _ in range(args.loop_sample):
            smp.write(f.readline())
    loop_cmd = (f"while IFS= read -r line; do echo \"$line\" | {jq} -c --arg instr {sh(instr)} {sh(JQ_FILTER)}; "
                f"done < {sh(str(sample))} > {sh(str(out))}")
    loop = timed(loop_cmd, shell=True)
    runs["loop"] = (loop[0] * n_clean / args.loop_sample, loop[1], loop[2])  # extrapolated to the file
    startup["loop"] = 0.0  # its cost is all per line
    floor = timed(["true"])
    for name, r in [*runs.items(), ("convert (2x file)", double_run)]:
        if r[2] != 0:
            sys.exit(f"{name} failed with exit code {r[2]}")

    lines = {"dirty": n_dirty}
    whole = {k: r[0] * n_clean / lines.get(k, n_clean) for k, r in runs.items()}  # s for n_clean lines
    stream = {k: max(r[0] - startup[k], 1e-6) * n_clean / lines.get(k, n_clean) for k, r in runs.items()}
    mb = size / 1e6

    def row(name, key, note=""):
        w, st = whole[key], stream[key]
        return (f"| {name} | {w:.2f} s{note} | {startup[key]:.2f} s | {mb / w:,.1f} | {mb / st:,.1f} | "
                f"{n_clean / w:,.0f} | {whole['loop'] / w:,.0f}x | {whole['jq'] / w:.2f}x | "
                f"{whole['bare'] / w:.2f}x | {runs[key][1] / 1024:,.0f} MiB |")

    print(f"\n{n_clean} records of ~{size / n_clean / 1e3:.0f} KB ({mb:.0f} MB). Every figure is a whole process, "
          f"fastest of {args.repeats}; start-up = the same command on a one-record file; streaming MB/s leaves "
          f"start-up out. The seed loop ran {args.loop_sample} lines, extrapolated.\n")
    print("| method | time for the file | start-up | MB/s | streaming MB/s | lines/s | vs seed loop | vs single jq "
          "| vs bare orjson | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(row("`llamafactory-ext convert`", "convert"))
    print(row(f"`llamafactory-ext convert`, {n_dirty - n_clean} bad lines", "dirty"))
    print(row("bare orjson read-parse-dump loop", "bare"))
    print(row("single `jq -c` process", "jq"))
    print(row("seed: `while read; echo \\| jq` per line", "loop", " (extrapolated)"))
    print(f"\nconvert peak RSS: {runs['dirty'][1] / 1024:,.0f} MiB on {dirty.stat().st_size / 1e6:.0f} MB, "
          f"{double_run[1] / 1024:,.0f} MiB on {double.stat().st_size / 1e6:.0f} MB (twice the records); "
          f"the measuring launcher itself accounts for {floor[1] / 1024:.0f} MiB of every figure.")

    targets = [("seed loop", "loop", 100), ("single jq", "jq", 3), ("bare orjson", "bare", 0.5)]
    print()
    ok = True
    for label, key, target in targets:
        r_whole, r_stream = whole[key] / whole["convert"], stream[key] / stream["convert"]
        met = r_whole >= target
        ok &= met
        print(f"- vs {label} >= {target}x: {r_whole:,.2f}x whole process ({'met' if met else 'MISSED'}), "
              f"{r_stream:,.2f}x streaming")
    flat = double_run[1] < 1.5 * runs["dirty"][1]
    ok &= flat
    print(f"- flat memory (twice the data, < 1.5x the peak RSS): {'met' if flat else 'MISSED'}")
    return ok


# The floor for truncate: each record's texts tokenized once, one tokenizer call per text, nothing else.
FLOOR = """
import sys, orjson
from llamafactory_ext.data.truncate import load_tokenizer
tok = load_tokenizer(sys.argv[1])
n = 0
with open(sys.argv[2], "rb") as f:
    for line in f:
        r = orjson.loads(line)
        n += len(tok.encode(r["instruction"] + "\\n" + r["input"], add_special_tokens=False))
        n += len(tok.encode(r["output"], add_special_tokens=False))
print(n)
"""
BUDGET = 12288


def tokenizers() -> list[tuple[str, Path | None, str, str]]:
    """(name, model folder or None, LLaMA-Factory template, why it is missing)."""
    from llamafactory_ext.models import tiny

    rows = [("tiny Mistral (byte-level BPE, 2K vocabulary)", tiny.build("mistral", ROOT / "build" / "tiny" / "mistral"),
             "mistral", "")]
    from llamafactory_ext.models import smollm2

    folder = ROOT / smollm2.DEFAULT_OUT
    if not smollm2.is_built(folder):
        return [*rows, ("SmolLM2-135M-Instruct", None, "smollm2",
                        "SmolLM2 is not built here: run `llamafactory-ext smollm2` (or `make demo`) once")]
    return [*rows, ("SmolLM2-135M-Instruct (byte-level BPE, 49K vocabulary)", smollm2.ensure(folder), "smollm2", "")]


def head(src: Path, dst: Path, n: int) -> Path:
    with open(src, "rb") as f, open(dst, "wb") as out:
        for i, line in enumerate(f):
            if i == n:
                break
            out.write(line)
    return dst


def check_identical(model: Path, template: str, src: Path, work: Path) -> str:
    """truncate's output vs the plain algorithm's on `src`: '' when byte-identical, else what differs."""
    sys.path.insert(0, str(ROOT / "tests"))
    import truncate_reference

    from llamafactory_ext.data.truncate import load_template, load_tokenizer, truncate

    out = work / "check.jsonl"
    truncate(src, out, tokenizer=str(model), template=template, max_tokens=BUDGET, plot=False)
    tok = load_tokenizer(str(model))
    want, _ = truncate_reference.truncate_file(tok, load_template(tok, template), src, max_tokens=BUDGET)
    got = out.read_bytes()
    if got == want:
        return ""
    bad = next(i for i, (a, b) in enumerate(zip(got.split(b"\n"), want.split(b"\n"), strict=False)) if a != b)
    return f"record {bad + 1} differs"


def truncate_commands(model: Path, template: str, src: Path, out: Path) -> dict[str, list[str]]:
    cli = [CLI, "truncate", str(src), str(out), "--tokenizer", str(model), "--template", template,
           "--max-tokens", str(BUDGET), "--no-plot", "--workers"]
    return {"floor": [sys.executable, "-c", FLOOR, str(model), str(src)], "truncate, 1 thread": [*cli, "1"],
            "truncate, 2 threads": [*cli, "2"]}


def bench_truncate(args, work: Path, clean: Path, n_clean: int) -> bool:
    from llamafactory_ext.data.convert import convert

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as `make` sets it: the threads are truncate's own
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")
    alpaca, one, out = work / "alpaca.jsonl", work / "alpaca_one.jsonl", work / "truncated.jsonl"
    convert(clean, alpaca)
    head(alpaca, one, 1)
    size = alpaca.stat().st_size
    print(f"\n## truncate: {n_clean} papers ({size / 1e6:.0f} MB of alpaca JSONL), budget {BUDGET:,} tokens\n\n"
          f"CPU = user + sys of the whole process (children included), least of {args.truncate_repeats}; start-up = "
          "the same command on a one-record file; streaming leaves start-up out. Floor = the tokenizer called once "
          "per text of each record (instruction + paper, review), nothing else.\n")
    ok = True
    for name, model, template, missing in tokenizers():
        if model is None:
            print(f"### {name}: SKIPPED — {missing}\n")
            continue

        jobs = truncate_commands(model, template, alpaca, out)
        one_jobs = truncate_commands(model, template, one, out)
        runs: dict[str, list] = {k: [] for k in jobs}
        starts: dict[str, list] = {k: [] for k in jobs}
        for _ in range(args.truncate_repeats):  # round-robin: load from other processes hits all alike
            for key, cmd in jobs.items():
                runs[key].append(timed(cmd, cpu=True))
                starts[key].append(timed(one_jobs[key], cpu=True))
        for key in jobs:
            if any(r[2] != 0 for r in runs[key] + starts[key]):
                sys.exit(f"{name}: {key} failed")
        best = {k: min(v, key=lambda r: r[3]) for k, v in runs.items()}
        start = {k: min(r[3] for r in v) for k, v in starts.items()}
        fastest = {k: min(r[0] for r in v) for k, v in runs.items()}
        floor_cpu, floor_stream = best["floor"][3], best["floor"][3] - start["floor"]
        print(f"### {name}\n")
        print("| run | CPU | start-up CPU | CPU / floor | streaming CPU / floor | wall (fastest) | wall / floor "
              "| peak RSS |")
        print("|---|---|---|---|---|---|---|---|")
        for key in jobs:
            wall, rss, _, cpu = best[key]
            print(f"| {key} | {cpu:.1f} s | {start[key]:.1f} s | {cpu / floor_cpu:.2f}x "
                  f"| {(cpu - start[key]) / floor_stream:.2f}x | {fastest[key]:.1f} s "
                  f"| {fastest[key] / fastest['floor']:.2f}x | {rss / 1024:,.0f} MiB |")
        ratio = best["truncate, 1 thread"][3] / floor_cpu
        met = ratio <= 1.3
        ok &= met
        print(f"\n- truncate within 1.3x the floor's CPU time: {ratio:.2f}x ({'met' if met else 'MISSED'})")
        w1, w2 = fastest["truncate, 1 thread"], fastest["truncate, 2 threads"]
        one_t, two_t = best["truncate, 1 thread"], best["truncate, 2 threads"]
        print(f"- 2 threads vs 1: wall {w2 / w1:.2f}x, CPU {two_t[3] / one_t[3]:.2f}x, peak RSS {two_t[1] / one_t[1]:.2f}x")
        if args.check:
            src = alpaca if args.check < 0 else head(alpaca, work / "check_in.jsonl", args.check)
            n = n_clean if args.check < 0 else min(args.check, n_clean)
            diff = check_identical(model, template, src, work)
            ok &= not diff
            print(f"- byte-identical to the plain algorithm on the first {n} records: "
                  f"{'yes' if not diff else 'NO, ' + diff}")
        print()
    return ok


def sh(s: str) -> str:
    import shlex

    return shlex.quote(s)


if __name__ == "__main__":
    sys.exit(main())
