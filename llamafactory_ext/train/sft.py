"""`run sft` (`make sft`): train MODEL x DATA with `llamafactory-cli train`, on one process, N GPUs or N nodes.

    llamafactory-ext run sft --model mistral --data 15k [--rope linear] [--resume auto] [--nproc 8]
    llamafactory-ext run sft --model tiny --data mine --dry-run          # print + validate, load nothing
    llamafactory-ext run sft --model mistral --data 15k --nnodes 2 --node-rank 0 --master-addr host0

The run is resolved once (train/resolve.py). Before anything loads: the data must fit the arguments (its
manifests: data/checks.py), every key and value must pass LLaMA-Factory's own parser (parsecheck.py: a dry run
checks in a child process, a real run in its training process before anything loads), the
RoPE fix must be active when `rope_scaling` is set, and the distributed setting must make sense (launcher.py).
Then the resume decision (RESUME=auto|never|<checkpoint>, runs.py) and `llamafactory-cli train
runs/<run>/sft_args.yaml`: what ran is always on disk.

On N nodes every node runs the same command with its own NODE_RANK. Node 0 owns the run folder (sft_args.yaml,
run.json, moving old runs aside); the others only read it and write `sft_args.node<i>.yaml`. Every node prints
the hash of its training data (manifest digests), and every training process checks, before the first step,
that its data, arguments and resume point are rank 0's (train/callbacks.py): a node given other data stops with
both hashes named instead of hanging. `ddp_timeout` (how long ranks wait for each other, e.g. while rank 0
tokenizes) is set from the data's size unless given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.data import checks
from llamafactory_ext.fileio import atomic_write_text, dump_yaml
from llamafactory_ext.train import launcher, resolve, runs
from llamafactory_ext.train.callbacks import CHECK_ENV  # what every training process compares with rank 0's

EXTRA_ARGS = "overrides"  # cli.py appends stray `key=value` arguments here
TOKENIZE_RATE = 100_000  # tokens/s one LLaMA-Factory preprocessing worker tokenizes, at least (bench-data: 0.2-0.5M)
MIN_DDP_TIMEOUT = 1800  # s, HF's default
LONG_DDP_TIMEOUT = 86_400  # s; beyond a day a hung node is said to stall the others (the 7B recipes: the seed's 180000000)


def problems(run: resolve.Run, args: dict, pending: set[str] = frozenset(), notes: list[str] | None = None
             ) -> list[str]:
    """Everything checkable before LLaMA-Factory loads anything."""
    out = checks.problems(args, run.family, run.project, pending=pending, notes=notes)
    ds = args.get("deepspeed")
    if ds and isinstance(ds, str) and not run.project.path(ds).is_file():
        out.append(f"deepspeed: {ds} does not exist")
    if args.get("rope_scaling"):
        from llamafactory_ext import patches

        reason = patches.preflight()
        if reason:
            out.append(f"rope_scaling: {args['rope_scaling']} needs our RoPE fix, which is not active ({reason}); "
                       f"stock LLaMA-Factory 0.9.5 breaks RoPE scaling on transformers 5 (see patches.py)")
    return out


def decide_resume(run: resolve.Run, args: dict, resume: str, *, dry_run: bool, owner: bool = True) -> list[str]:
    """Set resume_from_checkpoint / overwrite_output_dir for RESUME=auto|never|<path>; returns what it did
    (messages). Moves broken checkpoints and unresumable leftovers aside (never deletes), except in a dry run
    and on a node that does not own the run folder (`owner=False`: node_rank > 0 only reads it)."""
    out = run.project.path(args["output_dir"])
    rdir = run.dir
    move = not dry_run and owner
    args["overwrite_output_dir"] = False
    args.pop("resume_from_checkpoint", None)
    said = []
    started = out.is_dir() and any(out.iterdir())
    if resume in ("never", "fresh", "no"):
        if started:
            said.append(f"RESUME={resume}: the previous run in {run.project.rel(out)} is moved aside (nothing deleted)"
                        + ("" if owner else " by node 0"))
            if move:
                said[-1] = f"RESUME={resume}: moved the previous run aside to {runs.move_aside(out, out.parent)}"
        return said
    if resume != "auto":
        ckpt = Path(resume)
        if not ckpt.is_dir():
            found = runs.resume_plan(out)[0] if out.is_dir() else None
            hint = f" (the newest whole one in {out} is {found})" if found else ""
            raise UserError(f"RESUME={resume}: no such checkpoint folder{hint}")
        problem = runs.checkpoint_problem(ckpt)
        if problem:
            raise UserError(f"RESUME={resume}: cannot resume from it: {problem}")
        args["resume_from_checkpoint"] = run.project.rel(ckpt)
        return [f"resuming from {ckpt}"]
    if not started:
        return [f"starting a new run in {run.project.rel(out)}"]
    new = runs.identity(args, run.project.path(str(args.get("dataset_dir", "."))))
    old = runs.recorded_identity(rdir)
    changed = runs.differences(old, new) if old else []
    if changed:
        raise UserError(f"{run.project.rel(rdir)} holds a run of another setup ({'; '.join(changed)}). RESUME=never "
                        f"starts it over (the old run is moved aside), or RUN=<name> trains into runs/<name>")
    ckpt, broken = runs.resume_plan(out)
    for path, why in broken:
        said.append(f"skipping broken checkpoint {path.name}: {why}")
        if move and ckpt is not None:  # (with nothing to resume, the whole folder is moved aside below)
            said[-1] += f"; moved to {runs.move_aside(path, rdir / 'broken')}"
    if ckpt is not None:
        args["resume_from_checkpoint"] = run.project.rel(ckpt)
        return said + [f"resuming from {run.project.rel(ckpt)}"]
    if (out / "adapter_model.safetensors").exists():
        raise UserError(f"{run.project.rel(out)} holds a finished run and no checkpoint to resume from; RESUME=never "
                        "starts over (the old run is moved aside, not deleted), RUN=<name> trains into runs/<name>")
    said.append(f"nothing resumable in {run.project.rel(out)}; starting over" + ("" if not move else
                f" (moved what was there to {runs.move_aside(out, out.parent)})"))
    return said


def data_hash(run: resolve.Run, args: dict) -> tuple[str, str]:
    """(hash, what it covers) of the training data: each dataset file's sha256 and its manifest's digest (how it
    was built), as the run's identity records them."""
    ident = runs.identity(args, run.project.path(str(args.get("dataset_dir", "."))))["datasets"]
    parts = {name: [e.get("sha256"), e.get("manifest")] for name, e in ident.items()}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest, ", ".join(f"{n} sha256 {(e[0] or 'missing')[:12]}" + (f" manifest {e[1][:12]}" if e[1] else "")
                             for n, e in parts.items())


def ddp_timeout(run: resolve.Run, args: dict) -> tuple[int, str]:
    """Seconds ranks wait for each other: long enough for rank 0 to tokenize the data (3x an estimate from the
    manifest's records x budget at TOKENIZE_RATE per preprocessing worker), at least HF's 1800 s."""
    doc = run.manifest
    if doc is None or not doc.records:
        return MIN_DDP_TIMEOUT, "no manifest to size it from"
    tokens = doc.records * int(doc.budget or args.get("cutoff_len", 2048))
    workers = int(args.get("preprocessing_num_workers") or 1)
    estimate = tokens / (TOKENIZE_RATE * workers)
    seconds = max(MIN_DDP_TIMEOUT, 60 * math.ceil(3 * estimate / 60))
    return seconds, (f"tokenizing {doc.records:,} records x <={doc.budget or args.get('cutoff_len')} tokens with "
                     f"{workers} worker(s) takes <= {estimate:.0f} s at {TOKENIZE_RATE:,} tokens/s each")


def add_arguments(p: argparse.ArgumentParser) -> None:
    resolve.add_run_arguments(p)
    p.add_argument("--rope", default=None, help="RoPE scaling: linear | dynamic")
    p.add_argument("--cutoff", default=None, help="override cutoff_len (e.g. 8192 or 8k; k = 1,024 tokens)")
    p.add_argument("--resume", default="auto",
                   help="auto (default: the newest whole checkpoint of this run) | never | path/to/checkpoint-N")
    p.add_argument("--dry-run", action="store_true", help="print and validate the final arguments; load nothing")
    add_log_argument(p)
    add_distributed_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value LLaMA-Factory arguments")


def add_log_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", type=Path, default=None, metavar="FILE",
                   help="LLaMA-Factory's output goes to FILE; one progress line is shown instead")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", default=None, help="processes (GPUs) per node (default: NPROC_PER_NODE or all GPUs)")
    p.add_argument("--nnodes", default=None, help="nodes (default: NNODES or 1)")
    p.add_argument("--node-rank", default=None, help="this node's index, 0 .. NNODES-1 (default: NODE_RANK or 0)")
    p.add_argument("--master-addr", default=None, help="address of node 0 (needed with NNODES > 1)")
    p.add_argument("--master-port", default=None, help=f"rendezvous port (default {launcher.DEFAULT_MASTER_PORT} "
                                                       "on every node)")


def run(ns: argparse.Namespace) -> int:
    from llamafactory_ext.train import parsecheck

    r = resolve.from_args(ns, rope=ns.rope, cutoff=ns.cutoff,
                          overrides=resolve.parse_overrides(ns.overrides, "run sft"))
    args = dict(r.args)
    dist = launcher.distributed(nproc=ns.nproc, nnodes=ns.nnodes, node_rank=ns.node_rank,
                                master_addr=ns.master_addr, master_port=ns.master_port,
                                deepspeed=bool(args.get("deepspeed")))
    owner = dist.node_rank == 0
    notes, pending = resolve.ensure_inputs(r, args, dry_run=ns.dry_run or not owner)
    if not owner and pending:  # only node 0 builds the shared sample; here it must be there already
        raise UserError(f"node {dist.node_rank}: the sample data ({', '.join(pending)}) is not built; run "
                        f"`make data MODEL={r.family.name}` on this node (or on node 0 of a shared filesystem) first")
    found = problems(r, args, pending, notes if ns.dry_run else None)
    final = r.dir / ("sft_args.yaml" if owner else f"sft_args.node{dist.node_rank}.yaml")
    if ns.dry_run:
        print(f"# resolved: {r.describe()}; would be written to {r.project.rel(final)}")
        for n in notes:
            print(f"# {n}")
    if not found:
        decide_resume(r, dict(args), ns.resume or "auto", dry_run=True)  # a refused resume: before the slow check
        if ns.dry_run:  # a real run checks the same values in its training process, before anything loads
            found = parsecheck.check(args)
    if found:
        for p in found:
            print(f"error: {p}", file=sys.stderr)
        raise UserError(f"{len(found)} problem(s) with the arguments above; nothing was started")
    said = decide_resume(r, args, ns.resume or "auto", dry_run=ns.dry_run, owner=owner)
    if dist.world_size > 1 and "ddp_timeout" not in args:
        args["ddp_timeout"], why = ddp_timeout(r, args)
        said.append(f"ddp_timeout {args['ddp_timeout']} s ({why}; key=value ddp_timeout=N to choose)")
    elif dist.nnodes > 1 and str(args["ddp_timeout"]).isdigit() and int(args["ddp_timeout"]) > LONG_DDP_TIMEOUT:
        sized, why = ddp_timeout(r, {k: v for k, v in args.items() if k != "ddp_timeout"})
        said.append(f"ddp_timeout {int(args['ddp_timeout']):,} s (the recipe's): a node that hangs without exiting "
                    f"keeps the others waiting that long (a node that dies ends them: its connections break); key=value "
                    f"ddp_timeout={sized} bounds it ({why})")
    digest, covers = data_hash(r, args)
    env = launcher.environment(dist, offline=r.own_model, dry_run=ns.dry_run, quiet=ns.log is not None,
                               extra={parsecheck.IN_PROCESS: "1"})
    if dist.torchrun:
        check = {"node": dist.node_rank, "data": digest, "covers": covers,
                 "args": hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest(),
                 "resume": args.get("resume_from_checkpoint")}
        env[CHECK_ENV] = json.dumps(check)
    if dist.nnodes > 1:
        said.append(f"{dist.describe()}; training data hash {digest[:16]} ({covers})")
        said.append(f"checkpoints are written by node 0 into {r.project.rel(r.adapter)}; RESUME=auto needs them on "
                    f"every node: a shared filesystem, or a copy of that folder on each node")
    if ns.dry_run:
        print(dump_yaml(args))
        print(f"# launch: {launcher.shown(env)} llamafactory-cli train {r.project.rel(final)}")
        for s in said:
            print(f"# {s}")
        print("dry run: arguments OK (no weights loaded)")
        return 0
    for s in said if ns.log is None else ():  # with a log, they head it
        print(s, file=sys.stderr if s.startswith("skipping") else sys.stdout)
    r.dir.mkdir(parents=True, exist_ok=True)
    if owner and "resume_from_checkpoint" not in args:  # a new run: record what defines it
        runs.write_identity(r.dir, runs.identity(args, r.project.path(str(args.get("dataset_dir", ".")))))
    atomic_write_text(final, dump_yaml(args))
    rc = launcher.launch(["llamafactory-cli", "train", r.project.rel(final)], env, r.project.root,
                         log=ns.log, progress=steps_progress(r), label="sft", header=said)
    if rc and dist.nnodes > 1:
        print(f"error: training stopped on node {dist.node_rank} (exit {rc}). When another node fails or is stopped, "
              f"every node stops (its log above names the peer); fix it, then run the same command on every node: "
              f"RESUME=auto continues from the newest whole checkpoint", file=sys.stderr)
    return rc


def steps_progress(r: resolve.Run):
    """(steps done, total, "steps") from LLaMA-Factory's trainer_log.jsonl while a training runs."""
    log = r.adapter / "trainer_log.jsonl"

    def progress():
        try:
            last = log.read_text(encoding="utf-8").strip().splitlines()[-1]
            row = json.loads(last)
            return int(row["current_steps"]), int(row["total_steps"]), "steps"
        except (OSError, IndexError, ValueError, KeyError):
            return None

    return progress
