"""Review any number of papers in resumable shards: `make predict PAPERS=big.jsonl SHARDS=K SHARD=i`.

- Split by paper: a paper's shard is sha1(its id) mod K, its id as `prepare.paper_name` gives it (the `paper_id`,
  else a hash of its text). The K shards are disjoint, together they are the file, and re-running a shard selects
  the same papers. One process per GPU or node reviews one shard (a Slurm array: `slurm/predict_array.sbatch`).
- Resumable: a shard's papers are reviewed in chunks of --chunk papers, each one LLaMA-Factory predict (or vLLM
  with BACKEND=vllm) into a temp folder that is renamed into place when it finishes. A killed shard keeps every
  finished chunk; the re-run reviews only the papers no chunk holds (by paper id) and never rewrites a finished
  chunk. A second process on the same shard is refused (a lock), not run twice.
- Merge: `llamafactory-ext predict-merge` (run by the last shard to finish, too) joins every shard's chunks into
  `predict/<stem>/[base_]temp_<T>/generated_predictions.jsonl` and `predict/<stem>/papers.jsonl`, then writes
  reviews.jsonl and the metrics as an unsharded predict does. A paper reviewed twice (overlapping shards) or not at
  all (a shard never run, a chunk missing) is refused, naming the papers and the shard.

Layout: `runs/<run>/predict/<stem>/shards-of-<K>/<i>/`: source.jsonl (the shard's lines of the file), papers.jsonl
+ dataset_info.json (converted and cut, as data/prepare.py `papers` does), `[base_]temp_<T>/chunks/<n>/`
(papers.jsonl, generated_predictions.jsonl of that chunk).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from llamafactory_ext import UserError, units
from llamafactory_ext.fileio import atomic_write, atomic_write_text, dump_yaml, remove_stale_temps

CHUNKS = "chunks"


def shard_of(paper_id: str, shards: int) -> int:
    return int(hashlib.sha1(paper_id.encode("utf-8", "surrogatepass")).hexdigest()[:12], 16) % shards


def check_shard(shards, shard) -> tuple[int, int]:
    """SHARDS=K SHARD=i as numbers: K >= 1, 0 <= i < K."""
    k = units.count(shards, "SHARDS", unit="papers", example="4")
    if shard in (None, ""):
        raise UserError(f"SHARDS={k} needs SHARD=<0..{k - 1}>: which part this process reviews")
    if not str(shard).isdigit() or int(shard) >= k:
        raise UserError(f"SHARD={shard!r} with SHARDS={k}: shards go from 0 to {k - 1}")
    return k, int(shard)


@dataclass(frozen=True)
class Shard:
    root: Path  # predict/<stem>/shards-of-<K>/
    index: int
    count: int
    stem: str

    @property
    def dir(self) -> Path:
        return self.root / str(self.index)

    def temp_dir(self, temp: float, base: bool) -> Path:
        return self.dir / units.temp_dir(temp, base)

    def label(self) -> str:
        return f"shard {self.index} of {self.count}"


def shards_root(stem_root: Path, count: int) -> Path:
    return stem_root / f"shards-of-{count}"


def _lines(src: Path, shard: Shard):
    """(line, in this shard) for every non-blank line of `src`. A line that is not a JSON object goes by the hash
    of its bytes (convert rejects it in its shard)."""
    from llamafactory_ext.data.prepare import paper_name

    with open(src, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            key = paper_name(record, shard.stem) if isinstance(record, dict) else hashlib.sha1(line).hexdigest()
            yield line, shard_of(key, shard.count) == shard.index


def select(src: Path, shard: Shard) -> tuple[int, int]:
    """Write the shard's lines of `src` to shard/source.jsonl (atomically); returns (selected, all non-blank)."""
    n = picked = 0
    with atomic_write(shard.dir / "source.jsonl") as out:
        for line, mine in _lines(src, shard):
            n += 1
            if mine:
                picked += 1
                out.write(line if line.endswith(b"\n") else line + b"\n")
    return picked, n


def dry_run(r, ns, model: str, temps: list[float], src: Path, shard: Shard) -> int:
    """What `review_shard` would do, writing nothing: the shard's share of the file, what is reviewed already."""
    picked = total = 0
    for _, mine in _lines(src, shard):
        total += 1
        picked += mine
    chunk = ns.chunk or (512 if ns.backend == "vllm" else 4 * (ns.batch_size or r.predict_batch))
    print(f"{shard.label()}: {picked} of the {total} lines of {src} (by paper id), reviewed with {model} "
          f"({ns.backend}) in chunks of {chunk} papers into {r.project.rel(shard.dir)}/")
    for temp in temps:
        done = len(done_ids(shard.temp_dir(temp, ns.base)))
        print(f"  {units.temp_dir(temp, ns.base)}: {done} papers reviewed before")
    print("dry run: nothing written, no weights loaded")
    return 0


def _ids(path: Path) -> list[str]:
    return [orjson.loads(x)["paper_id"] for x in path.read_bytes().splitlines() if x.strip()]


def done_ids(temp_dir: Path) -> dict[str, Path]:
    """paper id -> the finished chunk that reviewed it (chunks whose predictions are whole)."""
    out: dict[str, Path] = {}
    for chunk in sorted((temp_dir / CHUNKS).glob("[0-9]*")):
        preds = chunk / "generated_predictions.jsonl"
        if not preds.is_file() or not (chunk / "papers.jsonl").is_file():
            continue
        for pid in _ids(chunk / "papers.jsonl"):
            out.setdefault(pid, chunk)
    return out


def _lock(shard: Shard):
    from filelock import FileLock, Timeout

    lock = FileLock(str(shard.dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(f"{shard.label()} is being reviewed by another process right now ({shard.dir}); wait for it, "
                        f"or give this process another SHARD=") from None
    return lock


def review_shard(r, ns, model: str, temps: list[float], src: Path, shard: Shard) -> int:
    """Prepare the shard's papers, then review every paper no finished chunk holds, chunk by chunk."""
    from llamafactory_ext.data.prepare import papers
    from llamafactory_ext.eval import predictor as predict

    shard.dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(shard)
    try:
        picked, total = select(src, shard)
        print(f"{shard.label()}: {picked} of the {total} lines of {src.name}", file=sys.stderr)
        if picked == 0:  # an empty shard is a finished one
            atomic_write_text(shard.dir / "papers.jsonl", "")
            print(f"{shard.label()}: no papers fall in this shard; nothing to review", file=sys.stderr)
            return 0
        papers_file = papers(shard.dir / "source.jsonl", shard.dir, tokenizer=predict.tokenizer_of(r),
                             template=r.template, paper_tokens=r.paper_budget, stem=shard.stem)
        rows = [orjson.loads(x) for x in papers_file.read_bytes().splitlines() if x.strip()]
        chunk = ns.chunk or (512 if ns.backend == "vllm" else 4 * (ns.batch_size or r.predict_batch))
        for temp in temps:
            tdir = shard.temp_dir(temp, ns.base)
            remove_stale_temps(tdir / CHUNKS / "chunk")  # chunks a killed run left half-done
            done = done_ids(tdir)
            todo = [row for row in rows if row["paper_id"] not in done]
            print(f"{shard.label()} {units.temp_dir(temp, ns.base)}: {len(rows) - len(todo)} of {len(rows)} papers "
                  f"reviewed before, {len(todo)} to go in chunks of {chunk}", file=sys.stderr)
            for start in range(0, len(todo), chunk):
                rc = _review_chunk(r, ns, model, temp, todo[start:start + chunk], tdir, len(rows) - len(todo) + start,
                                   len(rows), shard)
                if rc:
                    return rc
    finally:
        lock.release()
    return 0


def _review_chunk(r, ns, model: str, temp: float, rows: list[dict], tdir: Path, before: int, total: int,
                  shard: Shard) -> int:
    import tempfile

    from llamafactory_ext.data.register import register
    from llamafactory_ext.eval import predictor as predict
    from llamafactory_ext.fileio import _host_tag
    from llamafactory_ext.train import launcher

    chunks = tdir / CHUNKS
    chunks.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in chunks.glob("[0-9]*") if p.name.isdigit()), default=0)
    tmp = Path(tempfile.mkdtemp(prefix=f".chunk.{os.getpid()}-{_host_tag()}.", suffix=".tmp", dir=chunks))
    t0 = time.monotonic()
    try:
        with atomic_write(tmp / "papers.jsonl") as f:
            for row in rows:
                f.write(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
        register("chunk", tmp / "papers.jsonl", tmp / "dataset_info.json", force=True)
        target = predict.Target("chunk", tmp, tmp, tmp / "papers.jsonl")
        args = predict.predict_args(r, target, model, temp, tmp, ns)
        if ns.backend == "vllm":
            from llamafactory_ext.eval import vllm_predict

            vllm_predict.predict(str(r.project.path(model)), args["template"], "chunk", tmp, temperature=temp,
                                 top_p=args["top_p"], max_new_tokens=args["max_new_tokens"], seed=ns.seed,
                                 dataset_dir=str(tmp), bf16=args["bf16"])
            rc = 0
        else:
            atomic_write_text(tmp / "predict_args.yaml", dump_yaml(args))
            env = launcher.environment(offline=True, quiet=True)
            log = tdir / "logs" / f"chunk-{number:05d}.log"  # kept when the chunk fails
            rc = launcher.launch(["llamafactory-cli", "train", r.project.rel(tmp / "predict_args.yaml")], env,
                                 r.project.root, log=log, label=f"chunk {number}",
                                 progress=launcher.tqdm_progress(log, "batches"))
        if rc == 0:
            if sum(1 for x in (tmp / "generated_predictions.jsonl").read_bytes().splitlines() if x.strip()) != len(rows):
                raise UserError(f"{tmp}: LLaMA-Factory wrote another number of predictions than papers; see its log")
            tmp.rename(chunks / f"{number:05d}")
            print(f"{shard.label()}: chunk {number} done, {before + len(rows)} of {total} papers reviewed "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)
        return rc
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ merge
def status(root: Path, count: int, temp: float, base: bool) -> tuple[list[dict], list[str]]:
    """(every paper of every shard with its prediction, problems). A problem: a shard not prepared, a paper
    without a finished chunk, a paper in two shards or chunks."""
    problems, merged, where = [], [], {}
    for i in range(count):
        sdir = root / str(i)
        papers_file = sdir / "papers.jsonl"
        if not papers_file.is_file():
            problems.append(f"shard {i} of {count} was never run (no {papers_file})")
            continue
        rows = [orjson.loads(x) for x in papers_file.read_bytes().splitlines() if x.strip()]
        tdir = sdir / units.temp_dir(temp, base)
        preds: dict[str, dict] = {}
        for chunk in sorted((tdir / CHUNKS).glob("[0-9]*")):
            ids = _ids(chunk / "papers.jsonl")
            lines = [json.loads(x) for x in (chunk / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
                     if x.strip()]
            for pid, pred in zip(ids, lines, strict=True):
                if pid in preds:
                    problems.append(f"paper {pid!r} was reviewed twice in shard {i} ({chunk.name} and another chunk)")
                preds[pid] = pred
        missing = [row["paper_id"] for row in rows if row["paper_id"] not in preds]
        if missing:
            problems.append(f"shard {i} of {count}: {len(missing)} of {len(rows)} papers not reviewed yet "
                            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); run SHARD={i} again")
        for row in rows:
            if row["paper_id"] in where:
                problems.append(f"paper {row['paper_id']!r} is in shard {where[row['paper_id']]} and shard {i}: the "
                                f"shards overlap (another SHARDS= or another file?)")
            where[row["paper_id"]] = i
            if row["paper_id"] in preds:
                merged.append({"paper": row, "prediction": preds[row["paper_id"]]})
    return merged, problems


def merge(project, stem_root: Path, count: int, temp: float, base: bool, *, quiet: bool = False) -> Path:
    """Join the shards (see the module docstring); returns the merged predictions file."""
    from llamafactory_ext.eval import predictor as predict

    root = shards_root(stem_root, count)
    if not root.is_dir():
        raise UserError(f"no shards of {count} in {project.rel(stem_root)} (no {root.name}/); run "
                        f"`make predict ... PAPERS=... SHARDS={count} SHARD=<i>` first")
    merged, problems = status(root, count, temp, base)
    if problems:
        raise UserError(f"cannot merge the {count} shards of {project.rel(stem_root)} at {units.temp_dir(temp, base)}: "
                        + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    out = stem_root / units.temp_dir(temp, base)
    with atomic_write(stem_root / "papers.jsonl") as f:
        for m in merged:
            f.write(orjson.dumps(m["paper"], option=orjson.OPT_APPEND_NEWLINE))
    with atomic_write(out / "generated_predictions.jsonl", "w", encoding="utf-8") as f:
        for m in merged:
            f.write(json.dumps(m["prediction"], ensure_ascii=False) + "\n")
    predict.extract_all(stem_root, stem_root / "papers.jsonl", quiet=quiet, shown=project.rel)
    print(f"merged {len(merged)} papers from {count} shard(s) into {project.rel(out / 'reviews.jsonl')}",
          file=sys.stderr)
    return out / "generated_predictions.jsonl"


def complete(stem_root: Path, count: int, temps: list[float], base: bool) -> bool:
    """Every shard reviewed every one of its papers at every temperature."""
    root = shards_root(stem_root, count)
    return all(not status(root, count, t, base)[1] for t in temps)


def add_arguments(p) -> None:
    from llamafactory_ext.train import resolve

    p.add_argument("run_dir", nargs="?", metavar="RUN", help="a run folder (runs/<name>) or its name; default: the "
                                                             "run of --model x --data")
    resolve.add_run_arguments(p)
    p.add_argument("--papers", default=None, metavar="FILE", help="the PAPERS= file that was sharded (its stem names "
                                                                  "the folder; default: the only sharded one)")
    p.add_argument("--shards", default=None, help="SHARDS= it was split into (default: the only count there)")
    p.add_argument("--temp", default=None, help="TEMP= (default: every temperature the shards reviewed)")
    p.add_argument("--base", action="store_true", help="only the untuned base model's reviews (BASE=1; default: all)")


def run(ns) -> int:
    """`llamafactory-ext predict-merge`: join a run's shards (see the module docstring)."""
    from llamafactory_ext import project as project_mod
    from llamafactory_ext.data.prepare import safe_stem
    from llamafactory_ext.train import resolve

    proj = project_mod.get()
    if ns.run_dir:
        given = Path(ns.run_dir)
        rdir = given if given.is_dir() else proj.runs / ns.run_dir
        if not rdir.is_dir():
            raise UserError(f"RUN {ns.run_dir}: no such run folder (looked at {given} and {proj.rel(rdir)})")
    else:
        rdir = resolve.from_args(ns).dir
    every = sorted(rdir.glob("predict/*/shards-of-*"))
    found = every
    if ns.papers:
        found = [f for f in found if f.parent.name == safe_stem(ns.papers)]
    if ns.shards:
        found = [f for f in found if f.name == f"shards-of-{units.count(ns.shards, 'SHARDS', unit='papers')}"]
    if len(found) != 1:
        there = ", ".join(proj.rel(f) + "/" for f in every) or "none"
        if found:
            hint = "say which with PAPERS= and SHARDS= (--papers, --shards)"
        elif ns.papers or ns.shards:
            hint = "run `make predict PAPERS=... SHARDS=... SHARD=i` first, or give the PAPERS=/SHARDS= it was run with"
        else:
            hint = "run `make predict PAPERS=... SHARDS=... SHARD=i` first"
        raise UserError(f"{'several' if found else 'no'} sharded predictions"
                        f"{' of ' + str(ns.papers) if ns.papers else ''}{' in ' + str(ns.shards) + ' shards' if ns.shards else ''}"
                        f" in {proj.rel(rdir)}/predict (there: {there}); {hint}")
    root = found[0]
    count = int(root.name.rsplit("-", 1)[1])
    found = sorted({bt for d in root.glob("*/*temp_*") if (bt := units.parse_temp_dir(d.name))})
    wanted = [(b, t) for b, t in found if (not ns.base or b) and (ns.temp is None or t == units.temperature(ns.temp))]
    if not wanted:
        raise UserError(f"{proj.rel(root)}: no shard has reviewed anything yet"
                        + (f" at {units.temp_dir(units.temperature(ns.temp), ns.base)}" if ns.temp is not None else ""))
    for base, t in wanted:
        merge(proj, root.parent, count, t, base)
    return 0
