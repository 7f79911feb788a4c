"""The recipe registry: MODEL x DATA -> a LLaMA-Factory YAML and the datasets it trains and predicts on.

    llamafactory-ext recipes          # every MODEL x DATA you can launch (like torchtune's `tune ls`)

DATA is resolved in this order:
  1. a shipped recipe `sft_recipes/<MODEL>_<DATA>.yaml` (e.g. MODEL=mistral DATA=15k);
  2. your data: a registered dataset `<DATA>_train` (from `make data ... NAME=<DATA>`), or `<DATA>` itself
     (e.g. `mine_5k`), trained with the family's base recipe (families.py `base_recipe`).
The test split predict uses comes from the training data's manifest (`test_dataset`), so your own data is
never evaluated on somebody else's test split.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from llamafactory_ext import UserError, families
from llamafactory_ext.data import manifest
from llamafactory_ext.data.register import dataset_file, load_info
from llamafactory_ext.fileio import load_yaml


@dataclass(frozen=True)
class Choice:
    model: str  # family name
    data: str
    recipe: Path
    dataset: str | None = None  # replaces the recipe's `dataset` (your own data); None: the recipe's own


def shipped(recipe_dir: Path) -> dict[tuple[str, str], Path]:
    """(model, data) -> recipe, from the files `sft_recipes/<model>_<data>.yaml`."""
    out = {}
    for p in sorted(Path(recipe_dir).glob("*.yaml")):
        # the longest family name that prefixes the file name (tiny_gemma before tiny); the rest is DATA
        model = next((m for m in sorted(families.FAMILIES, key=len, reverse=True) if p.stem.startswith(m + "_")),
                     None)
        if model:
            out[(model, p.stem[len(model) + 1:])] = p
    return out


def own_data(project, info: dict, model: str) -> list[str]:
    """DATA values for the registered data of family `model`: `<name>` for every `<name>_train` dataset built
    for that family (its manifest says so; unbuilt, a family's sample is its family's) or of unknown family
    (registered by hand). Left out: what a shipped recipe already answers (`<model>_<name>.yaml`, and the
    family's own sample when `<model>_sample.yaml` exists: that is DATA=sample)."""
    table = shipped(project.recipes)
    sample_of = {f.sample: f.name for f in families.FAMILIES.values()}
    out = []
    for name in sorted(n[:-len("_train")] for n in info if n.endswith("_train")):
        doc = manifest.read(dataset_file(f"{name}_train", info, project.root))
        owner = doc.family if doc else sample_of.get(name)
        if owner not in (None, model) or (model, name) in table:
            continue
        if sample_of.get(name) == model and (model, "sample") in table:
            continue
        out.append(name)
    return out


def resolve(project, model: str, data: str, info: dict | None = None) -> Choice:
    fam = families.get(model)
    table = shipped(project.recipes)
    if (model, data) in table:
        return Choice(model, data, table[(model, data)])
    info = load_info(project.root) if info is None else info
    base = project.recipes / f"{fam.base_recipe}.yaml"
    for dataset in (f"{data}_train", data):
        if dataset in info and not dataset.endswith("_test"):
            if not base.is_file():
                raise UserError(f"MODEL={model}'s base recipe {base} is missing")
            return Choice(model, data, base, dataset)
    mine = [f"DATA={d}" for m, d in table if m == model] + [f"DATA={d}" for d in own_data(project, info, model)]
    raise UserError(f"MODEL={model} DATA={data!r}: no recipe sft_recipes/{model}_{data}.yaml and no registered "
                    f"dataset {data}_train; valid for MODEL={model}: {', '.join(mine) or 'none'} "
                    f"(your own data: `make data MODEL={model} IN=file.jsonl NAME={data}`)")


def test_dataset(train: str, info: dict, dataset_dir: Path) -> str | None:
    """The test split that belongs to training dataset `train`: from its manifest, else by name."""
    doc = manifest.read(dataset_file(train, info, dataset_dir))
    if doc and doc.test_dataset:
        return doc.test_dataset
    if train.endswith("_train") and f"{train[:-6]}_test" in info:
        return f"{train[:-6]}_test"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="only this family")


def run(args: argparse.Namespace) -> int:
    from llamafactory_ext import project as project_mod

    proj = project_mod.get()
    info = load_info(proj.root)
    table = shipped(proj.recipes)
    models = [args.model] if args.model else list(families.FAMILIES)
    if args.model:
        families.get(args.model)
    print(f"{'MODEL':<12} {'DATA':<18} {'recipe':<40} trains on")
    for m in models:
        for (model, data), path in table.items():
            if model == m:
                ds = load_yaml(path).get("dataset", "?")
                built = "" if (dataset_file(ds, info, proj.root) or Path("-")).exists() else "  (not built)"
                print(f"{model:<12} {data:<18} {proj.rel(path):<40} {ds}{built}")
        for data in own_data(proj, info, m):
            base = proj.recipes / (families.get(m).base_recipe + ".yaml")
            print(f"{m:<12} {data:<18} {proj.rel(base):<40} {data}_train")
    print("\nmake sft MODEL=<MODEL> DATA=<DATA>   (DATA=<name> after `make data MODEL=<MODEL> IN=file NAME=<name>`)")
    return 0
