"""`make data`: convert -> split by paper -> truncate -> manifest -> register, for one model family.

    llamafactory-ext data --model smollm2                          # the shipped 36-paper sample
    llamafactory-ext data --model mistral --in paper_review.jsonl  # your data, today's names
    llamafactory-ext data --model tiny --in mine.jsonl --name mine --test-size 6 --jq '{input: .paper, output: .review}'

Dataset names it registers (in dataset_info.json):
  - no --in: the sample, `<sample>_train` / `<sample>_test` (`sample_train` for MODEL=tiny,
    `sample_smollm2_train` for smollm2, ...; see families.py);
  - --in without --name: `paper_review_{5k,15k}_<model>` (nested: the 5K records are the first 5K of
    the 15K) and `paper_review_test_<model>`;
  - --in with --name N: `N_train` (every training paper), `N_test`, and `N_<size>` for each of --sizes.
Training records are cut with the family's tokenizer and chat template so that instruction + paper +
review + template tokens fit the budget (--cutoff, default the `cutoff_len` of the family's base recipe);
reviews are never cut. Test papers keep their first `paper_budget` tokens (inference). Each file gets a
manifest (`<file>.manifest.json`, see manifest.py) that `run sft` / `run predict` check before they start.

`papers()` is the same pipeline for papers to review (`make predict PAPERS=file.jsonl`): convert (reference
reviews optional), cut to the family's inference budget, name the papers, register in the folder's own
dataset_info.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from llamafactory_ext import UserError, families, units
from llamafactory_ext.data import manifest

DEFAULT_SIZES = "5000,15000"  # without --name: the seed's two training sets
DEFAULT_TEST_SIZE = "500"  # papers held out for predict (with --in)


@contextlib.contextmanager
def _make_terms(test_size_given: bool, test_size) -> Iterator[None]:
    """split's errors name its own flags (--test-size, --sizes): add what to set in `make data`."""
    try:
        yield
    except UserError as e:
        if not str(e).startswith(("--test-size", "--sizes")):
            raise
        default = "" if test_size_given else f"; not set, it is {test_size}"
        raise UserError(f"{e}\n  with make data: TEST_SIZE= (papers held out: a count, or a fraction such as 0.1"
                        f"{default}) and SIZES= (training subsets in records, e.g. 5k,15k)") from None


def prepare(model: str, src: str | Path | None = None, name: str | None = None, *, cutoff=None,
            paper_tokens=None, test_size=None, sizes: str | None = None, jq: str | None = None,
            model_path: str | None = None, template: str | None = None, dataset_info: str | Path | None = None,
            build_root: Path | None = None, seed: int = 0, project=None) -> dict[str, manifest.Manifest]:
    """Build and register the datasets of one family; returns {dataset name: manifest}."""
    from llamafactory_ext import models
    from llamafactory_ext import project as project_mod
    from llamafactory_ext.data.convert import convert
    from llamafactory_ext.data.register import register
    from llamafactory_ext.data.split import parse_sizes, parse_test_size, size_name, split
    from llamafactory_ext.data.truncate import load_template, load_tokenizer, truncate

    fam = families.get(model)
    proj = project or project_mod.get()
    dataset_info = Path(dataset_info) if dataset_info is not None else proj.dataset_info
    build_root = Path(build_root) if build_root is not None else proj.data_build
    test_size_given = test_size is not None
    template = template or fam.template
    budget = units.count(cutoff, "CUTOFF") if cutoff else families.train_budget(fam, proj.recipes)
    paper_budget = units.count(paper_tokens, "PAPER_TOKENS") if paper_tokens else fam.paper_budget
    if name is not None and not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"NAME={name!r}: use letters, digits, '_' and '-' (it becomes the dataset names "
                        f"{name}_train and {name}_test)")
    if src is None:
        if name or sizes or jq:
            raise UserError("NAME=, SIZES= and JQ= need IN=/path/to/paper_review.jsonl (without IN, "
                            "`make data` builds the shipped sample)")
        src, prefix, build = proj.sample, fam.sample, build_root / fam.sample
        test_size = test_size or fam.sample_test
    else:
        prefix = name
        build = build_root / name if name else build_root / "paper_review" / fam.name
        sizes = sizes if sizes is not None else (None if name else DEFAULT_SIZES)
        test_size = test_size or DEFAULT_TEST_SIZE
    src = Path(src)
    if not src.is_file():
        raise UserError(f"IN={src}: no such file" if not src.exists() else f"IN={src} is not a file")
    with _make_terms(test_size_given, test_size):
        size_list = parse_sizes(sizes) if sizes else []
        test_size = parse_test_size(str(test_size))

    # the tokenizer first: a wrong MODEL_PATH fails in a second, not after the conversion
    # recorded as the recipes name it (a hub id, or a path relative to the project) so that the checks match
    tokenizer = str(model_path) if model_path else proj.rel(models.ensure(fam, proj)) if fam.local else fam.model
    tok = load_tokenizer(str(proj.path(tokenizer)) if fam.local and not model_path else tokenizer)
    load_template(tok, template)  # fixes eos/pad exactly as training will, before fingerprinting
    tok_sha = manifest.tokenizer_fingerprint(tok)
    src_sha = manifest.sha256_file(src)

    print(f"data: {src} -> {proj.rel(build)}/ for MODEL={fam.name} (template {template}, tokenizer {tokenizer}, "
          f"{budget} tokens per training record, {paper_budget} paper tokens at inference)", file=sys.stderr)
    conv = convert(src, build / "all.jsonl", jq_program=jq)
    print(f"convert: {conv.summary(False)}", file=sys.stderr)
    if conv.kinds:
        print(f"convert: {conv.rejects_line(proj.rel(conv.rejects))}", file=sys.stderr)
    with _make_terms(test_size_given, test_size):
        parts = split(build / "all.jsonl", test_size=test_size, sizes=size_list, seed=seed, out_dir=build)

    if prefix is None:  # today's names for --in without --name
        test_name = f"paper_review_test_{fam.name}"
        trains = {f"paper_review_{size_name(k)}_{fam.name}": (p, build / f"train_{size_name(k)}.jsonl", k)
                  for k, p in parts.subsets.items()}
    else:
        test_name = f"{prefix}_test"
        trains = {f"{prefix}_train": (parts.train, build / "train.jsonl", parts.counts["train"])}
        trains.update({f"{prefix}_{size_name(k)}": (p, build / f"train_{size_name(k)}.jsonl", k)
                       for k, p in parts.subsets.items()})
    common = {"family": fam.name, "tokenizer": tokenizer, "tokenizer_sha256": tok_sha, "template": template,
              "source": proj.rel(src), "source_sha256": src_sha, "read": conv.read, "accepted": conv.accepted,
              "rejected": conv.rejected, "test_size": parts.papers["test"], "seed": seed}
    jobs = [(n, *job, False) for n, job in trains.items()]
    jobs.append((test_name, parts.test, build / "test.jsonl", parts.counts["test"], True))
    out = {}
    for dataset, split_file, dst, n_in, inference in jobs:
        st = truncate(split_file, dst, tokenizer=tok, max_tokens=budget, template=template,
                      inference=inference, paper_tokens=paper_budget)
        if st.records == 0:
            raise UserError(f"{dataset}: every record was dropped (instruction + review alone exceed {budget} "
                            f"tokens); see {dst}.rejects.jsonl and raise CUTOFF")
        doc = manifest.write(dst, dataset=dataset, mode="inference" if inference else "train",
                             budget=None if inference else budget, paper_tokens=paper_budget if inference else None,
                             split_records=n_in, records=st.records, tokens=sum(st.after), cut=st.cut, dropped=st.dropped,
                             test_dataset=None if inference else test_name, **common)
        register(dataset, dst, dataset_info, force=True)
        out[dataset] = doc
        print(f"registered {dataset}: {proj.rel(dst)} ({st.records} records, {st.cut} cut, {st.dropped} dropped)")
    return out


def paper_name(record: dict, stem: str) -> str:
    """A paper's id: its `paper_id`, else `<file stem>-<first 10 hex digits of the SHA-1 of its text>` (stable when
    the file is reordered, grows or is split into shards; the same text twice: `-2`, `-3` in file order)."""
    import hashlib

    pid = record.get("paper_id")
    if isinstance(pid, str) and pid:
        return pid
    text = record.get("input") if isinstance(record.get("input"), str) else ""
    return f"{stem}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def papers(src: str | Path, root: Path, *, tokenizer, template: str, paper_tokens: int, name: str = "papers",
           stem: str | None = None) -> Path:
    """Papers to review (`{"input": paper[, "output": review]}` JSONL) -> `root/papers.jsonl`: converted (reference
    reviews optional), every paper named (`paper_name`, with `stem`, default the file's), cut to `paper_tokens`,
    registered as `name` in `root/dataset_info.json` (the project's own is not touched). Returns the papers file."""
    from llamafactory_ext.data.convert import convert
    from llamafactory_ext.data.register import register
    from llamafactory_ext.data.truncate import truncate

    src = Path(src)
    if not src.is_file():
        raise UserError(f"PAPERS={src}: no such file" if not src.exists() else f"PAPERS={src} is not a file")
    root.mkdir(parents=True, exist_ok=True)
    conv = convert(src, root / "converted.jsonl", reviews=False)
    print(f"papers: {conv.summary(False)}", file=sys.stderr)
    if conv.kinds:
        print(f"papers: {conv.rejects_line()}", file=sys.stderr)
    _name_papers(root / "converted.jsonl", root / "named.jsonl", stem or safe_stem(src))
    st = truncate(root / "named.jsonl", root / "papers.jsonl", tokenizer=tokenizer, template=template,
                  inference=True, paper_tokens=paper_tokens, plot=False)
    print(f"papers: {st.records} papers, {st.cut} cut to {paper_tokens} tokens", file=sys.stderr)
    register(name, root / "papers.jsonl", root / "dataset_info.json", force=True)
    return root / "papers.jsonl"


def safe_stem(path: str | Path) -> str:
    """A file's stem as a folder and id prefix: anything but letters, digits, '_', '.', '-' becomes '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)


def _name_papers(src: Path, dst: Path, stem: str) -> None:
    """Copy alpaca `src` to `dst` with every record's `paper_id` set (`paper_name`)."""
    import orjson

    from llamafactory_ext.fileio import atomic_write

    seen: dict[str, int] = {}
    with open(src, "rb") as f, atomic_write(dst) as out:
        for line in f:
            if not line.strip():
                continue
            record = orjson.loads(line)
            pid = paper_name(record, stem)
            if pid != record.get("paper_id"):  # a name made from the text: the same text again gets -2, -3
                seen[pid] = seen.get(pid, 0) + 1
                if seen[pid] > 1:
                    pid = f"{pid}-{seen[pid]}"
            if record.get("paper_id") != pid:
                record["paper_id"] = pid
                line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
            out.write(line if line.endswith(b"\n") else line + b"\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=families.DEFAULT,
                   help=f"model family: {' | '.join(families.names())} (default {families.DEFAULT})")
    p.add_argument("--in", dest="src", default=None, help="your paper-review JSONL (default: the shipped sample)")
    p.add_argument("--name", default=None, help="dataset name: registers NAME_train, NAME_test (, NAME_<size>)")
    p.add_argument("--model-path", default=None, help="local model folder whose tokenizer to use")
    p.add_argument("--template", default=None,
                   help="LLaMA-Factory chat template to cut with (default: the family's; pass the same TEMPLATE= "
                        "to make sft)")
    p.add_argument("--cutoff", default=None,
                   help="tokens per training record, e.g. 8192 or 8k (k = 1,024 tokens; default: the cutoff_len of "
                        "the family's base recipe)")
    p.add_argument("--paper-tokens", default=None, help="paper tokens kept for predict (default: the family's)")
    p.add_argument("--test-size", default=None, help="papers held out for predict: a count or a fraction")
    p.add_argument("--sizes", default=None, help="nested training subsets in records, e.g. 5k,15k (k = 1,000 records)")
    p.add_argument("--jq", default=None, metavar="FILTER", help="jq program mapping each line to {input, output}")
    p.add_argument("--dataset-info", default=None, help="the dataset_info.json to register in (default: the project's)")


def run(args: argparse.Namespace) -> int:
    prepare(args.model, args.src, args.name, cutoff=args.cutoff, paper_tokens=args.paper_tokens,
            test_size=args.test_size, sizes=args.sizes, jq=args.jq, model_path=args.model_path,
            template=args.template, dataset_info=args.dataset_info)
    return 0
