"""Is this data fit for these LLaMA-Factory arguments? Checked against each file's manifest before anything loads.

A dataset must be registered and built; a file `make data` built must have been made for this mode (training
or inference), this chat template, a budget the `cutoff_len` covers, and this tokenizer (same name or the same
fingerprint). Each problem says the `make data` command that rebuilds the data for this run.
"""

from __future__ import annotations

from pathlib import Path

from llamafactory_ext import UserError, families
from llamafactory_ext.data import manifest
from llamafactory_ext.data.register import dataset_file, load_info


def names(args: dict, key: str = "dataset") -> list[str]:
    """The datasets of `dataset: a,b` (LLaMA-Factory splits on commas)."""
    return [n.strip() for n in str(args.get(key) or "").split(",") if n.strip()]


def problems(args: dict, family: families.Family, project, *, key: str = "dataset", mode: str = "train",
             pending: set[str] = frozenset(), notes: list[str] | None = None) -> list[str]:
    """Registered? built? Made for this cutoff_len, template and tokenizer (its manifest)? With `notes` (a dry
    run), a registered but unbuilt file is a note there, not a problem. `project`: where LLaMA-Factory runs."""
    dataset_dir = project.path(str(args.get("dataset_dir", ".")))
    info = load_info(dataset_dir)
    out = []
    for name in names(args, key):
        if name in pending:
            continue
        if name not in info:
            out.append(f"{key}: {name!r} is not registered in {dataset_dir / 'dataset_info.json'}; "
                       f"build it with `make data MODEL={family.name} ...` (registered: {', '.join(info)})")
            continue
        path = dataset_file(name, info, dataset_dir)
        if path is None:
            continue  # a hub / remote dataset: LLaMA-Factory's business
        if not path.is_file():
            msg = (f"{key}: {name} -> {path} is not built yet; run "
                   f"`make data MODEL={family.name}{'' if name.startswith('sample') else ' IN=...'}` first")
            (notes if notes is not None else out).append(msg)
            continue
        doc = manifest.read(path)
        if doc is None:
            continue  # registered by hand: nothing recorded to check against
        if doc.mode != mode:
            out.append(f"{key}: {name} was built for {doc.mode}, not {mode} (use its "
                       f"{'test' if mode == 'inference' else 'training'} split)")
        template = args.get("template")
        if doc.template != template:
            out.append(f"{key}: {name} was cut for template {doc.template!r}, this run uses {template!r}; "
                       + rebuild(doc, family, project, "" if template == family.template else f"TEMPLATE={template}")
                       + " for this model")
        cutoff = args.get("cutoff_len", 2048)
        if mode == "train" and isinstance(doc.budget, int) and isinstance(cutoff, int) and cutoff < doc.budget:
            out.append(f"cutoff_len {cutoff} is below the {doc.budget} tokens {name} was cut to: LLaMA-Factory would "
                       f"cut the end of the prompt or the review; {rebuild(doc, family, project, f'CUTOFF={cutoff}')}"
                       f" (or train with CUTOFF={doc.budget})")
        problem = tokenizer_problem(doc, args.get("model_name_or_path"), project)
        if problem:
            out.append(f"{key}: {name}: {problem}; "
                       f"{rebuild(doc, family, project, 'MODEL_PATH=' + str(args.get('model_name_or_path')))}")
    return out


def rebuild(doc: manifest.Manifest, family: families.Family, project, extra: str = "") -> str:
    """The `make data` command that rebuilds the data `doc` describes, for this family."""
    parts = [f"MODEL={family.name}"]
    if project.path(doc.source or "") != project.sample:
        parts.append(f"IN={doc.source}")
        if doc.name_stem:
            parts.append(f"NAME={doc.name_stem}")
    return "re-run `make data " + " ".join(parts + ([extra] if extra else [])) + "`"


def tokenizer_problem(doc: manifest.Manifest, model: str | None, project) -> str | None:
    """None when the tokenizer `doc` was cut with is the model's (same name, or the same fingerprint)."""
    if not model or doc.tokenizer in (None, model) or Path(str(doc.tokenizer)) == Path(model):
        return None
    from llamafactory_ext.data.truncate import load_template, load_tokenizer

    local = project.path(model)
    try:
        tok = load_tokenizer(str(local) if local.exists() else model)
        load_template(tok, doc.template or "empty")
    except UserError as e:
        return (f"cut with the tokenizer of {doc.tokenizer}, and the tokenizer of {model} cannot be loaded to "
                f"compare ({str(e)[:200]})")
    if manifest.tokenizer_fingerprint(tok) != doc.tokenizer_sha256:
        return f"cut with the tokenizer of {doc.tokenizer}, which differs from {model}'s"
    return None
