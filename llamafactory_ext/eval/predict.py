"""`run predict` (`make predict`): review the test split (or any papers) with LLaMA-Factory's predict, then metrics.

    llamafactory-ext run predict --model mistral --data 15k --temps "0.35 0.5" [--base] [--papers file.jsonl]

The run is resolved once (train/resolve.py). The model is the run's merged/ (or the untuned base with --base);
the papers are the test split that belongs to the training data (its manifest), --dataset, or --papers FILE
(converted and cut to the family's inference budget into runs/<run>/predict/<file stem>/, data/prepare.py).
One `llamafactory-cli train` with do_predict per temperature writes predict/[base_]temp_<T>/
generated_predictions.jsonl (predict_args_*.yaml beside it is what ran); then `extract` writes reviews.jsonl,
per-paper Markdown and ONE metrics table over every run predicted into that folder (base and tuned, every
temperature). The predicted papers are copied beside the reviews (predict/papers.jsonl), for the judge.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from pathlib import Path

from llamafactory_ext import UserError, families, units
from llamafactory_ext.data import checks
from llamafactory_ext.data.register import dataset_file
from llamafactory_ext.eval.predictor import Target, extract_all, predict_args, tokenizer_of
from llamafactory_ext.fileio import atomic_write, atomic_write_text, dump_yaml
from llamafactory_ext.train import launcher, resolve, sft

EXTRA_ARGS = "overrides"
def target(ns: argparse.Namespace, r: resolve.Run, *, dry_run: bool) -> Target:
    """--papers FILE, --dataset, or the test split that belongs to the training data (its manifest)."""
    if ns.papers:
        from llamafactory_ext.data.prepare import papers, safe_stem

        root = r.predict_root / safe_stem(ns.papers)
        path = papers(ns.papers, root, tokenizer=tokenizer_of(r), template=r.template, paper_tokens=r.paper_budget)
        return Target("papers", root, root, path)
    dataset = ns.dataset or r.test_dataset
    if not dataset:
        raise UserError(f"no test split is known for {','.join(r.train_datasets) or 'this run'} (no manifest names "
                        f"one); pass DATASET=<registered test split> or PAPERS=file.jsonl")
    found = checks.problems({**r.trained_args, "eval_dataset": dataset}, r.family, r.project, key="eval_dataset",
                            mode="inference")
    if found:
        raise UserError("; ".join(found))
    return Target(dataset, r.dataset_dir, r.predict_root, dataset_file(dataset, r.info, r.dataset_dir))


def gpu_batch(r: resolve.Run, model: str, ns: argparse.Namespace, papers: Path | None) -> int | None:
    """On a GPU, unless BATCH= is given: the largest batch whose KV cache, weights and prefill fit the card
    (fit/speed.py), said with why and the expected time. None elsewhere (the family's predict_batch)."""
    if not launcher.has_cuda():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    from llamafactory_ext import gpus
    from llamafactory_ext.fit import memory, speed

    arch = memory.resolve_arch(str(r.project.path(model)) if r.project.path(model).exists() else model)
    props = torch.cuda.get_device_properties(0)
    card = gpus.by_device_name(torch.cuda.get_device_name(0))
    prompt = r.paper_budget + 128  # the paper, the instruction and the template
    new = ns.max_new_tokens or r.max_new_tokens
    batch, why = speed.predict_batch(arch, prompt, new, props.total_memory / speed.GiB)
    batch = max(batch, 1)
    n = sum(1 for line in papers.open("rb") if line.strip()) if papers and papers.is_file() else None
    eta = (f"; {n:,} papers in ~{speed.predict_seconds(arch, n, batch, prompt, new, card) / 3600:.1f} h"
           f" (one at a time ~{speed.predict_seconds(arch, n, 1, prompt, new, card) / 3600:.1f} h)") if n else ""
    print(f"predict: batch {batch} on {torch.cuda.get_device_name(0)} ({props.total_memory / speed.GiB:.0f} GiB): "
          f"bf16 weights {why['weights_gib']} GiB + {why['per_sequence_gib']} GiB per paper (KV cache "
          f"{why['kv_bytes_per_token']:,} B/token x {prompt + new:,} tokens, and its prefill) within "
          f"{why['usable_gib']} GiB{eta}; BATCH= to choose", file=sys.stderr)
    return batch


def sharded(ns: argparse.Namespace, r: resolve.Run, model: str, temps: list[float]) -> int:
    """PAPERS= SHARDS=K SHARD=i: review one shard, resumably; the last shard to finish merges (eval/shards.py)."""
    from llamafactory_ext.data.prepare import safe_stem
    from llamafactory_ext.eval import shards

    count, index = shards.check_shard(ns.shards, ns.shard)
    if not ns.papers:
        raise UserError("SHARDS= splits a PAPERS= file: give PAPERS=big.jsonl (the test split too: "
                        "PAPERS=data/build/<name>/test.jsonl)")
    if ns.max_samples:
        raise UserError("SHARDS= reviews whole shards: drop MAX_SAMPLES=")
    src = Path(ns.papers)
    if not src.is_file():
        raise UserError(f"PAPERS={src}: no such file")
    if ns.dry_run:
        stem_root = r.predict_root / safe_stem(src)
        return shards.dry_run(r, ns, model, temps, src, shards.Shard(shards.shards_root(stem_root, count), index,
                                                                     count, safe_stem(src)))
    if ns.backend != "vllm":
        ns.batch_size = ns.batch_size or gpu_batch(r, model, ns, None)
    stem_root = r.predict_root / safe_stem(src)
    shard = shards.Shard(shards.shards_root(stem_root, count), index, count, safe_stem(src))
    rc = shards.review_shard(r, ns, model, temps, src, shard)
    if rc:
        return rc
    if shards.complete(stem_root, count, temps, ns.base):
        for temp in temps:
            shards.merge(r.project, stem_root, count, temp, ns.base, quiet=ns.quiet)
    else:
        print(f"{shard.label()} done; the other shards are not finished: when they are, the last one joins them "
              f"(or run `make predict-merge ... PAPERS={src} SHARDS={count}`)", file=sys.stderr)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    resolve.add_run_arguments(p)
    p.add_argument("--temp", default=None, help="temperature (default: the family's, 0.35)")
    p.add_argument("--temps", default=None, help='sweep, e.g. "0.35 0.5"')
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the family's, 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the family's")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="papers generated together (default: the family's predict_batch)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataset", default=None, help="registered test split (default: the training data's)")
    p.add_argument("--papers", default=None, metavar="FILE",
                   help="predict on any paper-review JSONL ({input[, output]}) instead of the test split")
    p.add_argument("--shards", default=None, metavar="K",
                   help="with --papers: split the papers into K disjoint shards by paper (SHARDS=); see eval/shards.py")
    p.add_argument("--shard", default=None, metavar="I", help="which shard this process reviews, 0..K-1 (SHARD=)")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help="with --shards: papers per resumable chunk (default 4 x the batch; 512 with vLLM)")
    p.add_argument("--base", action="store_true", help="the untuned base model instead of runs/<run>/merged")
    p.add_argument("--model-dir", default=None, help="model to predict with (default: runs/<run>/merged)")
    p.add_argument("--backend", default="huggingface", choices=("huggingface", "vllm"))
    p.add_argument("--no-extract", action="store_true")
    p.add_argument("--quiet", action="store_true", help="do not print the metrics table")
    p.add_argument("--dry-run", action="store_true", help="print the predict arguments; load nothing")
    sft.add_log_argument(p)
    sft.add_distributed_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value LLaMA-Factory arguments")


def check_numbers(ns: argparse.Namespace) -> None:
    """Counts and top_p as given (make variable and flag named), before anything loads: 0 would otherwise mean
    "the default" silently, and a negative count or a top_p above 1 would reach LLaMA-Factory."""
    for given, v in (("BATCH={} (--batch-size)", ns.batch_size), ("MAX_NEW_TOKENS={} (--max-new-tokens)",
                     ns.max_new_tokens), ("MAX_SAMPLES={} (--max-samples)", ns.max_samples), ("--chunk {}", ns.chunk)):
        if v is not None and v < 1:
            raise UserError(f"{given.format(v)}: must be at least 1; leave it out for the default")
    if ns.top_p is not None and not 0 < ns.top_p <= 1:
        raise UserError(f"TOP_P={ns.top_p:g} (--top-p): the share of probability mass sampled from, "
                        f"0 < TOP_P <= 1 (the family's default: {families.TOP_P})")


def run(ns: argparse.Namespace) -> int:
    check_numbers(ns)
    if ns.backend == "vllm":
        from llamafactory_ext.eval import vllm_predict

        vllm_predict.require()  # before anything is written
    r = resolve.from_args(ns)
    if ns.base:
        model = r.base_model
        resolve.ensure_inputs(r, {"model_name_or_path": model}, dry_run=ns.dry_run)
    else:
        model = r.project.rel(ns.model_dir) if ns.model_dir else r.project.rel(r.merged)
        if not (r.project.path(model) / "config.json").is_file():
            raise UserError(f"no merged model in {model}; run `make merge MODEL={r.family.name} DATA={r.data}` "
                            f"first (or BASE=1 for the untuned base model)")
    temps = units.temperatures(ns.temps) if ns.temps else [units.temperature(ns.temp or r.temperature)]
    if ns.shards is not None or ns.shard is not None:
        return sharded(ns, r, model, temps)
    t = target(ns, r, dry_run=ns.dry_run)
    ids = t.out_root / "papers.jsonl"
    if t.papers is not None and t.papers != ids and not ns.dry_run:
        # the predicted papers beside the reviews: they name the papers for extract, and give `make judge` the
        # paper texts
        with open(t.papers, "rb") as src, atomic_write(ids) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    dist = launcher.distributed(nproc=ns.nproc, nnodes=ns.nnodes, node_rank=ns.node_rank,
                                master_addr=ns.master_addr, master_port=ns.master_port, training=False)
    if ns.backend != "vllm" and not ns.dry_run:
        ns.batch_size = ns.batch_size or gpu_batch(r, model, ns, t.papers)
        if importlib.util.find_spec("vllm") is not None:
            print("note: vLLM is installed: BACKEND=vllm is the faster path (continuous batching)", file=sys.stderr)
    outs = []
    for temp in temps:
        out = r.predict_dir(temp, ns.base, t.out_root)
        args = predict_args(r, t, model, temp, out, ns)
        if ns.dry_run:
            print(dump_yaml(args))
            continue
        final = t.out_root / f"predict_args_{units.temp_dir(temp, ns.base)}.yaml"
        atomic_write_text(final, dump_yaml(args))
        if ns.backend == "vllm":
            from llamafactory_ext.eval import vllm_predict

            vllm_predict.predict(str(r.project.path(model)), args["template"], t.dataset, out, temperature=temp,
                                 top_p=args["top_p"], max_new_tokens=args["max_new_tokens"], seed=ns.seed,
                                 dataset_dir=str(t.dataset_dir), max_samples=ns.max_samples, bf16=args["bf16"])
        else:
            env = launcher.environment(dist, offline=r.own_model or not ns.base, quiet=ns.log is not None)
            rc = launcher.launch(["llamafactory-cli", "train", r.project.rel(final)], env, r.project.root,
                                 log=ns.log, label=f"predict {'base' if ns.base else 'tuned'}",
                                 progress=ns.log and launcher.tqdm_progress(ns.log, "batches"))
            if rc != 0:
                return rc
        outs.append(out)
    if outs and not ns.no_extract:
        extract_all(t.out_root, ids if t.papers is not None else None, quiet=ns.quiet, shown=r.project.rel)
    return 0
