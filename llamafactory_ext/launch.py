"""Launch LLaMA-Factory's own train / export / predict for MODEL x DATA.

    llamafactory-ext run sft --model mistral --data 15k [--rope linear] [--resume auto] [--nproc 8]
    llamafactory-ext run sft --model tiny --data mine --dry-run          # print + validate, load nothing
    llamafactory-ext run merge --model mistral --data 15k
    llamafactory-ext run predict --model mistral --data 15k --temps "0.35 0.5" [--base] [--papers file.jsonl]

(`make sft|merge|predict MODEL=.. DATA=..` call these.) MODEL x DATA resolves to a recipe (recipes.py);
everything of one run lives in `runs/<model>_<data>/` or `runs/<RUN>/` (runs.py). Every run writes its
final arguments to `sft_args.yaml` / `merge_args.yaml` / `predict_args_*.yaml` and launches
`llamafactory-cli` on that file, so what ran is always on disk. Extra `key=value` arguments override
recipe keys (LLaMA-Factory's own names, e.g. `cutoff_len=8192`).

Environment: only LLaMA-Factory's own launcher variables are read (NPROC_PER_NODE, NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT, FORCE_TORCHRUN, as `llamafactory-cli` reads them); every other setting is a flag.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llamafactory_ext import UserError, families, manifest, recipes, runs
from llamafactory_ext.fileio import atomic_write_text

EXTRA_ARGS = "overrides"  # cli.py appends stray `key=value` arguments here
ROPE_TYPES = ("linear", "dynamic")
LAUNCH_ENV = ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
              "RDZV_ID", "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS")
PREDICT_CUTOFF = 1_000_000


def cgroup_cpus(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """The CPU quota of this container in whole cores (rounded up), or None without one (cgroup v2 `cpu.max`,
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`). `docker --cpus=2` on a 64-core host: 2, not 64."""
    root = Path(root)
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def cpu_threads(sample_s: float = 0.5, cgroup_root: str | Path = "/sys/fs/cgroup") -> tuple[int, str]:
    """Torch threads for a CPU run: one per core that this process may use and that is idle right now (at
    least 1), and why.

    Measured (tests/bench_threads.py, SmolLM2-135M, 2 cores): on idle cores 2 threads take 0.56-0.65x the
    wall time of 1 per training step and 0.53-0.59x per prefill; on a busy machine 2 threads ran 2.5-6x
    SLOWER than 1 (spin-waiting on a core another process holds). So count the idle cores now, from the
    /proc/stat lines of the cores in this process's affinity mask over `sample_s` seconds (not the load
    average, which still holds the previous stage), capped by the container's CPU quota.
    """
    cpus = sorted(os.sched_getaffinity(0))

    def snap() -> tuple[int, int]:
        per_cpu = {ln.split()[0]: [int(x) for x in ln.split()[1:]]
                   for ln in Path("/proc/stat").read_text().splitlines() if ln[:3] == "cpu" and ln[3:4].isdigit()}
        rows = [per_cpu[f"cpu{c}"] for c in cpus]
        return sum(map(sum, rows)), sum(v[3] + (v[4] if len(v) > 4 else 0) for v in rows)  # total, idle+iowait

    quota = cgroup_cpus(cgroup_root)
    n = min(len(cpus), quota or len(cpus))
    limit = f"{n} usable core{'s' if n > 1 else ''}" + (f" (container quota {quota})" if quota else "")
    try:
        t0, i0 = snap()
        time.sleep(sample_s)
        t1, i1 = snap()
    except (OSError, ValueError, KeyError):
        return 1, f"CPU load unknown; {limit}"
    busy = len(cpus) * (1 - (i1 - i0) / max(t1 - t0, 1))
    threads = max(1, min(n, int(len(cpus) - busy + 0.5)))
    return threads, f"{busy:.1f} of {len(cpus)} cores busy; {limit}"


def positive_int(name: str, value, example: str = "8192 or 8k") -> int:
    """`8192` or `8k` -> 8192; anything else is a clear error."""
    text = str(value).strip().lower()
    try:
        n = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{name}={value!r}: expected a positive whole number (e.g. {example})")
    return n


def parse_temps(text: str) -> list[float]:
    temps = []
    for item in re.split(r"[ ,]+", text.strip()):
        if not item:
            continue
        try:
            t = float(item)
        except ValueError:
            t = -1.0
        if not 0 <= t <= 5:
            raise UserError(f"TEMPS/TEMP: {item!r} is not a temperature (e.g. TEMPS=\"0.35 0.5\")")
        temps.append(t)
    if not temps:
        raise UserError("TEMPS is empty (e.g. TEMPS=\"0.35 0.5\")")
    return temps


def parse_overrides(items: list[str], action: str) -> dict:
    flags = [i.split("=")[0] for i in items if i.startswith("-")]
    if flags:
        raise UserError(f"`run {action}` has no option {', '.join(flags)} (see `llamafactory-ext run {action} --help`)")
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (example: cutoff_len=8192)")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v != "" else None
    return out


def dump_yaml(args: dict) -> str:
    return yaml.safe_dump(args, sort_keys=False, allow_unicode=True)


def _datasets(args: dict, key: str = "dataset") -> list[str]:
    return [n.strip() for n in str(args.get(key) or "").split(",") if n.strip()]


# ------------------------------------------------------------------------------------------ sft
def sft_args(ns: argparse.Namespace) -> tuple[dict, Path, recipes.Choice]:
    """The final LLaMA-Factory arguments for `make sft` (before the resume decision), the run folder, the recipe."""
    choice = recipes.resolve(ns.model, ns.data)
    args = recipes.load_yaml(choice.recipe)
    if choice.dataset:
        args["dataset"] = choice.dataset
    rdir = runs.run_dir(ns.model, ns.data, ns.run)
    args["output_dir"] = str(rdir / "adapter")
    if ns.model_path:
        args["model_name_or_path"] = ns.model_path
    if ns.template:
        args["template"] = ns.template
    if ns.rope:
        if ns.rope not in ROPE_TYPES:
            raise UserError(f"unknown ROPE={ns.rope!r}; valid values: {', '.join(ROPE_TYPES)}")
        args["rope_scaling"] = ns.rope
    if ns.cutoff:
        args["cutoff_len"] = positive_int("CUTOFF", ns.cutoff)
    args.update(parse_overrides(ns.overrides, "sft"))
    return args, rdir, choice


def ensure_inputs(args: dict, family: families.Family, *, dry_run: bool) -> tuple[list[str], set[str]]:
    """Build what this machine builds itself, when missing: the family's local model (tiny, SmolLM2) and the
    shipped sample data. Returns (notes, datasets a dry run would build)."""
    notes, pending = [], set()
    if family.local and str(args.get("model_name_or_path")) == family.model:
        if dry_run:
            if not (Path(family.model) / "config.json").is_file():
                notes.append(f"would build the {family.name} model into {family.model} first")
        else:
            families.ensure_model(family)
    sample = family.datasets()[0]
    if sample in _datasets(args) and args.get("dataset_dir", ".") in (".", ""):
        path = manifest.dataset_file(sample, manifest.load_info())
        if path is None or not path.is_file():
            if dry_run:
                notes.append(f"would build the sample data ({sample}) first: `make data MODEL={family.name}`")
                pending.add(sample)
            else:
                from llamafactory_ext.prepare import prepare

                prepare(family.name)
    return notes, pending


def data_problems(args: dict, family: families.Family, *, key: str = "dataset", mode: str = "train",
                  pending: set[str] = frozenset(), notes: list[str] | None = None) -> list[str]:
    """Registered? built? Made for this cutoff_len, template and tokenizer (its manifest)? With `notes` (a dry
    run), a registered but unbuilt file is a note there, not a problem."""
    dataset_dir = args.get("dataset_dir", ".")
    info = manifest.load_info(dataset_dir)
    problems = []
    for name in _datasets(args, key):
        if name in pending:
            continue
        if name not in info:
            problems.append(f"{key}: {name!r} is not registered in {Path(dataset_dir) / 'dataset_info.json'}; "
                            f"build it with `make data MODEL={family.name} ...` (registered: {', '.join(info)})")
            continue
        path = manifest.dataset_file(name, info, dataset_dir)
        if path is None:
            continue  # a hub / remote dataset: LLaMA-Factory's business
        if not path.is_file():
            msg = (f"{key}: {name} -> {path} is not built yet; run "
                   f"`make data MODEL={family.name}{'' if name.startswith('sample') else ' IN=...'}` first")
            (notes if notes is not None else problems).append(msg)
            continue
        doc = manifest.read(path)
        if doc is None:
            continue  # registered by hand: nothing recorded to check against
        if doc.get("mode") != mode:
            problems.append(f"{key}: {name} was built for {doc.get('mode')}, not {mode} (use its "
                            f"{'test' if mode == 'inference' else 'training'} split)")
        if doc.get("template") != args.get("template"):
            problems.append(f"{key}: {name} was cut for template {doc.get('template')!r}, this run uses "
                            f"{args.get('template')!r}; "
                            + _rebuild(doc, family, "" if args.get("template") == family.template
                                       else f"TEMPLATE={args.get('template')}") + " for this model")
        budget = doc.get("budget")
        cutoff = args.get("cutoff_len", 2048)
        if mode == "train" and isinstance(budget, int) and isinstance(cutoff, int) and cutoff < budget:
            problems.append(f"cutoff_len {cutoff} is below the {budget} tokens {name} was cut to: LLaMA-Factory "
                            f"would cut the end of the prompt or the review; {_rebuild(doc, family, f'CUTOFF={cutoff}')}"
                            f" (or train with CUTOFF={budget})")
        problem = tokenizer_problem(doc, args.get("model_name_or_path"))
        if problem:
            problems.append(f"{key}: {name}: {problem}; "
                            f"{_rebuild(doc, family, 'MODEL_PATH=' + str(args.get('model_name_or_path')))}")
    return problems


def _rebuild(doc: dict, family: families.Family, extra: str = "") -> str:
    """The `make data` command that rebuilds the data `doc` describes, for this family."""
    from llamafactory_ext.prepare import SAMPLE_IN

    src = doc.get("source", "")
    parts = [f"MODEL={family.name}"]
    if Path(src) != SAMPLE_IN:
        parts.append(f"IN={src}")
        name = str(doc.get("dataset", ""))
        if name.endswith(("_train", "_test")) and not name.startswith("paper_review_"):
            parts.append(f"NAME={name.rsplit('_', 1)[0]}")
    return "re-run `make data " + " ".join(parts + ([extra] if extra else [])) + "`"


def tokenizer_problem(doc: dict, model: str | None) -> str | None:
    """None when the tokenizer `doc` was cut with is the model's (same name, or the same fingerprint)."""
    if not model or doc.get("tokenizer") in (None, model) or Path(str(doc.get("tokenizer"))) == Path(model):
        return None
    from llamafactory_ext.truncate import load_template, load_tokenizer

    try:
        tok = load_tokenizer(model)
        load_template(tok, doc.get("template", "empty"))
    except UserError as e:
        return (f"cut with the tokenizer of {doc.get('tokenizer')}, and the tokenizer of {model} cannot be "
                f"loaded to compare ({str(e)[:200]})")
    if manifest.tokenizer_fingerprint(tok) != doc.get("tokenizer_sha256"):
        return f"cut with the tokenizer of {doc.get('tokenizer')}, which differs from {model}'s"
    return None


def sft_problems(args: dict, family: families.Family, pending: set[str] = frozenset(),
                 notes: list[str] | None = None) -> list[str]:
    """Everything checkable before LLaMA-Factory loads anything."""
    problems = data_problems(args, family, pending=pending, notes=notes)
    ds = args.get("deepspeed")
    if ds and isinstance(ds, str) and not Path(ds).is_file():
        problems.append(f"deepspeed: {ds} does not exist")
    if args.get("rope_scaling"):
        from llamafactory_ext import patches

        reason = patches.preflight()
        if reason:
            problems.append(f"rope_scaling: {args['rope_scaling']} needs our RoPE fix, which is not active ({reason}); "
                            f"stock LLaMA-Factory 0.9.5 breaks RoPE scaling on transformers 5 (see patches.py)")
    return problems


def decide_resume(args: dict, rdir: Path, resume: str, *, dry_run: bool) -> list[str]:
    """Set resume_from_checkpoint / overwrite_output_dir for RESUME=auto|never|<path>; returns what it did
    (messages). Moves broken checkpoints and unresumable leftovers aside (never deletes), except in a dry run."""
    out = Path(args["output_dir"])
    args["overwrite_output_dir"] = False
    args.pop("resume_from_checkpoint", None)
    said = []
    started = out.is_dir() and any(out.iterdir())
    if resume in ("never", "fresh", "no"):
        if started:
            said.append(f"RESUME={resume}: the previous run in {out} is moved aside (nothing deleted)")
            if not dry_run:
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
        args["resume_from_checkpoint"] = str(ckpt)
        return [f"resuming from {ckpt}"]
    if not started:
        return [f"starting a new run in {out}"]
    new = runs.identity(args, args.get("dataset_dir", "."))
    old = runs.recorded_identity(rdir)
    changed = runs.differences(old, new) if old else []
    if changed:
        raise UserError(f"{rdir} holds a run of another setup ({'; '.join(changed)}). RESUME=never starts it over "
                        f"(the old run is moved aside), or RUN=<name> trains into runs/<name>")
    ckpt, broken = runs.resume_plan(out)
    for path, why in broken:
        said.append(f"skipping broken checkpoint {path.name}: {why}")
        if not dry_run and ckpt is not None:  # (with nothing to resume, the whole folder is moved aside below)
            said[-1] += f"; moved to {runs.move_aside(path, rdir / 'broken')}"
    if ckpt is not None:
        args["resume_from_checkpoint"] = str(ckpt)
        return said + [f"resuming from {ckpt}"]
    if (out / "adapter_model.safetensors").exists():
        raise UserError(f"{out} holds a finished run and no checkpoint to resume from; RESUME=never starts over "
                        "(the old run is moved aside, not deleted), RUN=<name> trains into runs/<name>")
    said.append(f"nothing resumable in {out}; starting over" + ("" if dry_run else
                f" (moved what was there to {runs.move_aside(out, out.parent)})"))
    return said


def launch_env(ns: argparse.Namespace, args: dict) -> dict[str, str]:
    # LLaMA-Factory's launcher does int(os.getenv("NNODES", "1")): an exported-but-empty variable crashes it
    env = {k: v for k, v in os.environ.items() if v != "" or k not in LAUNCH_ENV}
    bindir = str(Path(sys.executable).parent)  # torchrun and llamafactory-cli of this venv
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    nproc = getattr(ns, "nproc", None) or os.environ.get("NPROC_PER_NODE") or None
    nproc = positive_int("NPROC", nproc, example="8") if nproc else None
    nnodes = positive_int("NNODES", ns.nnodes, example="2") if getattr(ns, "nnodes", None) else 1
    node_rank = getattr(ns, "node_rank", None)
    if node_rank not in (None, "") and not str(node_rank).isdigit():
        raise UserError(f"NODE_RANK={node_rank!r}: expected 0, 1, ... (this node's index)")
    distributed = bool(args.get("deepspeed")) or (nproc or 1) > 1 or nnodes > 1
    if distributed:
        env["FORCE_TORCHRUN"] = "1"
        if not nproc:
            import torch

            nproc = max(torch.cuda.device_count(), 1)  # LLaMA-Factory's default is 0 on a CPU machine
        env["NPROC_PER_NODE"] = str(nproc)
    for key, attr in (("NNODES", "nnodes"), ("NODE_RANK", "node_rank"), ("MASTER_ADDR", "master_addr"),
                      ("MASTER_PORT", "master_port")):
        val = getattr(ns, attr, None)
        if val not in (None, ""):
            env[key] = str(val)
    if not _has_cuda() and "OMP_NUM_THREADS" not in env and not getattr(ns, "dry_run", False):
        threads, why = cpu_threads()
        env["OMP_NUM_THREADS"] = str(threads)
        env.setdefault("MKL_NUM_THREADS", str(threads))
        print(f"note: CPU run, {threads} torch thread(s) ({why}; set OMP_NUM_THREADS to choose)",
              file=sys.stderr)
    return env


def _has_cuda() -> bool:
    """Without importing torch (seconds): an NVIDIA driver is loaded."""
    return Path("/proc/driver/nvidia/version").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip(" -1"))


def _launch(cmd: list[str], env: dict[str, str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def cmd_sft(ns: argparse.Namespace) -> int:
    from llamafactory_ext import parsecheck

    args, rdir, choice = sft_args(ns)
    family = families.get(ns.model)
    env = launch_env(ns, args)
    notes, pending = ensure_inputs(args, family, dry_run=ns.dry_run)
    problems = sft_problems(args, family, pending, notes if ns.dry_run else None)
    if not problems:
        problems = parsecheck.check(args)
    final = rdir / "sft_args.yaml"
    if ns.dry_run:
        print(f"# resolved from {choice.recipe}" + (f" with dataset {choice.dataset}" if choice.dataset else "")
              + f"; would be written to {final}")
        for n in notes:
            print(f"# {n}")
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        raise UserError(f"{len(problems)} problem(s) with the arguments above; nothing was started")
    said = decide_resume(args, rdir, ns.resume or "auto", dry_run=ns.dry_run)
    if ns.dry_run:
        print(dump_yaml(args))
        launch = {k: env[k] for k in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR",
                                      "MASTER_PORT") if k in env}
        print(f"# launch: {' '.join(f'{k}={v}' for k, v in launch.items())} llamafactory-cli train {final}")
        for s in said:
            print(f"# {s}")
        print("dry run: arguments OK (no weights loaded)")
        return 0
    for s in said:
        print(s, file=sys.stderr if s.startswith("skipping") else sys.stdout)
    rdir.mkdir(parents=True, exist_ok=True)
    if "resume_from_checkpoint" not in args:  # a new run: record what defines it
        runs.write_identity(rdir, runs.identity(args, args.get("dataset_dir", ".")))
    atomic_write_text(final, dump_yaml(args))
    return _launch(["llamafactory-cli", "train", str(final)], env)


# ------------------------------------------------------------------------------------------ merge
def trained_args(ns: argparse.Namespace) -> tuple[dict, Path]:
    """The arguments the last `make sft` of this run used (falls back to the recipe)."""
    rdir = runs.run_dir(ns.model, ns.data, ns.run)
    saved = rdir / "sft_args.yaml"
    if saved.exists():
        args = recipes.load_yaml(saved)
    else:
        choice = recipes.resolve(ns.model, ns.data)
        args = recipes.load_yaml(choice.recipe)
        if choice.dataset:
            args["dataset"] = choice.dataset
    if ns.model_path:
        args["model_name_or_path"] = ns.model_path
    if ns.template:
        args["template"] = ns.template
    return args, rdir


def cmd_merge(ns: argparse.Namespace) -> int:
    trained, rdir = trained_args(ns)
    ensure_inputs({"model_name_or_path": trained.get("model_name_or_path")}, families.get(ns.model),
                  dry_run=ns.dry_run)
    adapter = Path(trained.get("output_dir", rdir / "adapter"))
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in {adapter}; run `make sft MODEL={ns.model} DATA={ns.data}` first")
    merged = rdir / "merged"
    args = {
        # Merge onto the ORIGINAL, unquantized base (a 4-bit base cannot take a merged adapter:
        # LLaMA-Factory raises "Cannot merge adapters to a quantized model").
        "model_name_or_path": trained["model_name_or_path"],
        "adapter_name_or_path": str(adapter),
        "template": trained["template"],
        "finetuning_type": "lora",
        "export_dir": str(merged),
        "export_size": 5,
        "export_device": "cpu",
        "infer_dtype": "bfloat16" if trained.get("bf16") else "auto",
    }
    if trained.get("rope_scaling"):  # bake the training-time RoPE scaling into the merged config.json
        args["rope_scaling"] = trained["rope_scaling"]
        args["cutoff_len"] = trained.get("cutoff_len", 2048)
    args.update(parse_overrides(ns.overrides, "merge"))
    if ns.dry_run:
        print(dump_yaml(args))
        return 0
    final = rdir / "merge_args.yaml"
    tmp = merged.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(final, dump_yaml({**args, "export_dir": str(tmp)}))
    rc = _launch(["llamafactory-cli", "export", str(final)], launch_env(ns, {}))
    if rc == 0:
        if merged.exists():
            shutil.rmtree(merged)
        tmp.rename(merged)
        atomic_write_text(final, dump_yaml(args))
        print(f"merged model: {merged}")
    return rc


# ------------------------------------------------------------------------------------------ predict
def predict_target(ns: argparse.Namespace, trained: dict, rdir: Path, family: families.Family
                   ) -> tuple[str, str, Path, Path | None]:
    """(dataset, dataset_dir, output root, ids file) for this predict: --papers FILE, --dataset, or the test
    split that belongs to the training data (its manifest)."""
    if ns.papers:
        return papers_dataset(ns, trained, rdir, family)
    dataset_dir = trained.get("dataset_dir", ".")
    info = manifest.load_info(dataset_dir)
    dataset = ns.dataset
    if not dataset:
        trains = _datasets(trained)
        dataset = recipes.test_dataset(trains[0], info, dataset_dir) if trains else None
        if not dataset:
            raise UserError(f"no test split is known for {','.join(trains) or 'this run'} (no manifest names one); "
                            f"pass DATASET=<registered test split> or PAPERS=file.jsonl")
    problems = data_problems({**trained, "eval_dataset": dataset}, family, key="eval_dataset", mode="inference")
    if problems:
        raise UserError("; ".join(problems))
    return dataset, dataset_dir, rdir / "predict", manifest.dataset_file(dataset, info, dataset_dir)


def papers_dataset(ns: argparse.Namespace, trained: dict, rdir: Path, family: families.Family
                   ) -> tuple[str, str, Path, Path]:
    """PAPERS=file.jsonl: convert + cut to the family's inference budget into runs/<run>/predict/<stem>/,
    registered in a dataset_info.json of that folder (the project's own is not touched)."""
    from llamafactory_ext.convert import convert
    from llamafactory_ext.register import register
    from llamafactory_ext.truncate import truncate

    src = Path(ns.papers)
    if not src.is_file():
        raise UserError(f"PAPERS={src}: no such file")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", src.stem)
    root = rdir / "predict" / stem
    root.mkdir(parents=True, exist_ok=True)
    conv = convert(src, root / "converted.jsonl", reviews=False)
    print(f"papers: {conv.summary(False)}", file=sys.stderr)
    if conv.kinds:
        print(f"papers: {conv.rejects_line()}", file=sys.stderr)
    tokenizer = str(trained["model_name_or_path"])
    st = truncate(root / "converted.jsonl", root / "papers.jsonl", tokenizer=tokenizer, template=trained["template"],
                  inference=True, paper_tokens=family.paper_budget, plot=False)
    print(f"papers: {st.records} papers, {st.cut} cut to {family.paper_budget} tokens", file=sys.stderr)
    _name_papers(root / "papers.jsonl", stem)
    register("papers", root / "papers.jsonl", root / "dataset_info.json", force=True)
    return "papers", str(root), root, root / "papers.jsonl"


def _name_papers(path: Path, stem: str) -> None:
    """Give every paper without a `paper_id` one (`<file stem>-<n>`): the reviews are named after them."""
    import json

    from llamafactory_ext.fileio import atomic_write_text

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if all(isinstance(r.get("paper_id"), str) and r["paper_id"] for r in rows):
        return
    for i, r in enumerate(rows, 1):
        if not (isinstance(r.get("paper_id"), str) and r["paper_id"]):
            r["paper_id"] = f"{stem}-{i}"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def cmd_predict(ns: argparse.Namespace) -> int:
    trained, rdir = trained_args(ns)
    family = families.get(ns.model)
    if ns.base:
        model = str(trained["model_name_or_path"])
        ensure_inputs({"model_name_or_path": model}, family, dry_run=ns.dry_run)
    else:
        model = ns.model_dir or str(rdir / "merged")
        if not (Path(model) / "config.json").is_file():
            raise UserError(f"no merged model in {model}; run `make merge MODEL={ns.model} DATA={ns.data}` first "
                            f"(or BASE=1 for the untuned base model)")
    temps = parse_temps(ns.temps or str(ns.temp if ns.temp is not None else family.temps[0]))
    dataset, dataset_dir, out_root, split = predict_target(ns, trained, rdir, family)
    ids = out_root / "papers.jsonl"
    if split is not None and split != ids and not ns.dry_run:
        # the predicted papers beside the reviews: they name the papers for extract, and give
        # `make judge` the paper texts
        from llamafactory_ext.fileio import atomic_write

        with open(split, "rb") as src, atomic_write(ids) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    prefix = "base_" if ns.base else ""
    outs = []
    for t in temps:
        out = out_root / f"{prefix}temp_{t:g}"
        args = {
            "stage": "sft",
            "do_predict": True,
            "predict_with_generate": True,
            "model_name_or_path": model,
            "template": trained["template"],
            "eval_dataset": dataset,
            "dataset_dir": dataset_dir,
            # LLaMA-Factory counts the reference review in the predict budget and, when over, cuts the END
            # of the prompt (the `[/INST]` / `<start_of_turn>model` marker). Papers are already cut to the
            # family's inference budget, so the budget here only has to never bite.
            "cutoff_len": PREDICT_CUTOFF,
            "do_sample": t > 0,
            "temperature": t if t > 0 else 1.0,
            "top_p": ns.top_p,
            "max_new_tokens": ns.max_new_tokens or family.max_new_tokens,
            "per_device_eval_batch_size": ns.batch_size or family.predict_batch,
            "output_dir": str(out),
            "overwrite_output_dir": True,
            "report_to": "none",
            "seed": ns.seed,
            "bf16": bool(trained.get("bf16")),
        }
        if ns.max_samples:
            args["max_samples"] = ns.max_samples
        args.update(parse_overrides(ns.overrides, "predict"))
        if ns.dry_run:
            print(dump_yaml(args))
            continue
        final = out_root / f"predict_args_{prefix}temp_{t:g}.yaml"
        atomic_write_text(final, dump_yaml(args))
        if ns.backend == "vllm":
            from llamafactory_ext import vllm_predict

            vllm_predict.predict(model, args["template"], dataset, out, temperature=t, top_p=ns.top_p,
                                 max_new_tokens=args["max_new_tokens"], seed=ns.seed, dataset_dir=dataset_dir,
                                 max_samples=ns.max_samples, bf16=args["bf16"])
        else:
            rc = _launch(["llamafactory-cli", "train", str(final)], launch_env(ns, {}))
            if rc != 0:
                return rc
        outs.append(out)
    if outs and not ns.no_extract:
        extract_all(out_root, ids if split is not None else None)
    return 0


def extract_all(out_root: Path, ids: Path | None) -> list[dict]:
    """reviews.jsonl + per-paper Markdown + ONE metrics table over every run predicted into `out_root` so far
    (this call's and earlier ones': base and tuned, every temperature)."""
    from llamafactory_ext import extract

    if ids is not None and not ids.is_file():
        raise UserError(f"{ids} (the predicted split) is missing: papers could not be named; run `make data` again")

    def order(p: Path) -> tuple:
        base, _, t = p.name.rpartition("temp_")
        return (base != "base_", float(t))

    done = sorted((p.parent for p in out_root.glob("*temp_*/generated_predictions.jsonl")), key=order)
    rows = extract.extract([p / "generated_predictions.jsonl" for p in done], out_root, ids, [p.name for p in done])
    sys.stdout.write(extract.format_markdown(rows))
    print(f"metrics: {out_root / 'metrics.csv'} ({out_root / 'metrics.md'})")
    return rows


# ------------------------------------------------------------------------------------------ CLI
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=families.DEFAULT, help=f"model family: {' | '.join(families.names())}")
    p.add_argument("--data", default="sample",
                   help="a shipped recipe's DATA (sample, 5k, 15k, ...) or your dataset NAME from `make data`")
    p.add_argument("--run", default=None, help="run folder name under runs/ (default: <model>_<data>)")
    p.add_argument("--model-path", default=None, help="local path or hub id replacing the recipe's model")
    p.add_argument("--template", default=None, help="LLaMA-Factory template replacing the family's")
    p.add_argument("--dry-run", action="store_true", help="print and validate the final arguments; load nothing")
    p.add_argument("overrides", nargs="*", help="key=value LLaMA-Factory arguments")


def _distributed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", default=None, help="processes (GPUs) per node (default: NPROC_PER_NODE or all GPUs)")
    p.add_argument("--nnodes", default=None)
    p.add_argument("--node-rank", default=None)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", default=None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sft = sub.add_parser("sft", help="train (LoRA/QLoRA) with llamafactory-cli train", allow_abbrev=False)
    _common(sft)
    sft.add_argument("--rope", default=None, help="RoPE scaling: linear | dynamic")
    sft.add_argument("--cutoff", default=None, help="override cutoff_len (e.g. 8192 or 8k)")
    sft.add_argument("--resume", default="auto",
                     help="auto (default: the newest whole checkpoint of this run) | never | path/to/checkpoint-N")
    _distributed(sft)
    merge = sub.add_parser("merge", help="merge the adapter into the base with llamafactory-cli export",
                           allow_abbrev=False)
    _common(merge)
    pred = sub.add_parser("predict", help="generate reviews of a test split or a file, then metrics",
                          allow_abbrev=False)
    _common(pred)
    pred.add_argument("--temp", type=float, default=None, help="temperature (default: the family's, 0.35)")
    pred.add_argument("--temps", default=None, help='sweep, e.g. "0.35 0.5"')
    pred.add_argument("--top-p", type=float, default=0.9)
    pred.add_argument("--max-new-tokens", type=int, default=None, help="default: the family's")
    pred.add_argument("--max-samples", type=int, default=None)
    pred.add_argument("--batch-size", type=int, default=None,
                      help="papers generated together (default: the family's predict_batch)")
    pred.add_argument("--seed", type=int, default=42)
    pred.add_argument("--dataset", default=None, help="registered test split (default: the training data's)")
    pred.add_argument("--papers", default=None, metavar="FILE",
                      help="predict on any paper-review JSONL ({input[, output]}) instead of the test split")
    pred.add_argument("--base", action="store_true", help="the untuned base model instead of runs/<run>/merged")
    pred.add_argument("--model-dir", default=None, help="model to predict with (default: runs/<run>/merged)")
    pred.add_argument("--backend", default="huggingface", choices=("huggingface", "vllm"))
    pred.add_argument("--no-extract", action="store_true")
    _distributed(pred)


def run(ns: argparse.Namespace) -> int:
    return {"sft": cmd_sft, "merge": cmd_merge, "predict": cmd_predict}[ns.action](ns)
