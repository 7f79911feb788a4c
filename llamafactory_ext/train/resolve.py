"""One run, resolved once: MODEL x DATA (+ RUN, MODEL_PATH, TEMPLATE, ROPE, CUTOFF, key=value) -> a `Run`.

Every command that works on a run takes the `Run` this module builds, and nothing else recomputes its parts:
`run sft|merge|predict`, `plan`, `doctor`, `judge`, `review` (and so `make sft|merge|predict|plan|doctor|judge|
review`); the WebUI lists the runs it finds. A Run holds
  - the family (families.py) and the recipe (recipes.py: a shipped `sft_recipes/<MODEL>_<DATA>.yaml`, or the
    family's base recipe over your dataset `<DATA>_train`);
  - `args`: the final LLaMA-Factory training arguments (recipe, then the dataset, output_dir, MODEL_PATH,
    TEMPLATE, ROPE, CUTOFF and key=value overrides, in that order) — what `run sft` writes to sft_args.yaml;
  - `recorded`: what the last training of this run really used (its sft_args.yaml), which merge, predict,
    review and judge follow, so a recipe edited after training does not change what a trained run was;
  - the run folder `runs/<RUN or MODEL_DATA>/` and its parts (adapter/, merged/, predict/temp_<T>/);
  - the training datasets, their manifest (data/manifest.py), the test split that belongs to them;
  - the budgets (the data's token budget, the family's paper budget) and the sampling defaults.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llamafactory_ext import UserError, families, units
from llamafactory_ext import project as project_mod
from llamafactory_ext.data import checks, manifest
from llamafactory_ext.data.register import dataset_file, load_info
from llamafactory_ext.fileio import load_yaml
from llamafactory_ext.train import recipes, runs

ROPE_TYPES = ("linear", "dynamic")
ARGS_FILE = "sft_args.yaml"  # the exact training arguments, written by `run sft` and by the WebUI's Train tab


def parse_overrides(items: list[str] | tuple[str, ...], action: str) -> dict:
    """`key=value` LLaMA-Factory arguments (values as YAML: `cutoff_len=8192`, `deepspeed=null`)."""
    flags = [i.split("=")[0] for i in items if i.startswith("-")]
    if flags:
        raise UserError(f"`{action}` has no option {', '.join(flags)} (see `llamafactory-ext {action} --help`)")
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (example: cutoff_len=8192)")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v != "" else None
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: the value is not YAML ({' '.join(str(e).split())})") from None
    return out


@dataclass(frozen=True)
class Run:
    project: project_mod.Project
    family: families.Family
    data: str
    name: str
    recipe: Path
    args: dict = field(repr=False)  # the final training arguments (before the resume decision)
    recorded: dict | None = field(default=None, repr=False)  # the last training's sft_args.yaml, if any
    dataset: str | None = None  # the dataset that replaced the recipe's (your own data)

    # ---- folders
    @property
    def dir(self) -> Path:
        return self.project.runs / self.name

    @property
    def adapter(self) -> Path:
        return self.project.path(str(self.trained_args.get("output_dir") or self.dir / "adapter"))

    @property
    def merged(self) -> Path:
        return self.dir / "merged"

    @property
    def predict_root(self) -> Path:
        return self.dir / "predict"

    def predict_dir(self, temp: float, base: bool = False, root: Path | None = None) -> Path:
        """Where predict writes (and judge reads) one temperature's reviews: predict/temp_<T>/."""
        return (root or self.predict_root) / units.temp_dir(temp, base)

    def judge_dir(self, temp: float) -> Path:
        return self.dir / f"judge_{units.temp_dir(temp)}"

    @property
    def trained(self) -> runs.Trained | None:
        return runs.trained(self.dir)

    # ---- what was (or will be) trained
    @property
    def trained_args(self) -> dict:
        """What the last `run sft` of this run used, else what it would use."""
        return self.recorded if self.recorded is not None else self.args

    @property
    def template(self) -> str:
        return str(self.trained_args.get("template") or self.family.template)

    @property
    def base_model(self) -> str:
        """model_name_or_path as the arguments give it (a hub id, or a path relative to the project)."""
        return str(self.trained_args["model_name_or_path"])

    @property
    def own_model(self) -> bool:
        """The family's own, locally built model (no hub access at all)."""
        return self.family.local and self.base_model == self.family.model

    @property
    def dataset_dir(self) -> Path:
        return self.project.path(str(self.trained_args.get("dataset_dir", ".")))

    @property
    def train_datasets(self) -> list[str]:
        return checks.names(self.trained_args)

    @functools.cached_property
    def info(self) -> dict:
        return load_info(self.dataset_dir)

    @functools.cached_property
    def manifest(self) -> manifest.Manifest | None:
        """The manifest of the (first) training dataset, None when it has none (registered by hand, or unbuilt)."""
        names = self.train_datasets
        return manifest.read(dataset_file(names[0], self.info, self.dataset_dir)) if names else None

    @property
    def test_dataset(self) -> str | None:
        names = self.train_datasets
        return recipes.test_dataset(names[0], self.info, self.dataset_dir) if names else None

    # ---- budgets and sampling defaults (families.py)
    @property
    def cutoff(self) -> int:
        return int(self.args.get("cutoff_len", 2048))

    @property
    def paper_budget(self) -> int:
        return self.family.paper_budget

    @property
    def temperature(self) -> float:
        return self.family.temperature

    @property
    def top_p(self) -> float:
        return self.family.top_p

    @property
    def max_new_tokens(self) -> int:
        return self.family.max_new_tokens

    @property
    def predict_batch(self) -> int:
        return self.family.predict_batch

    def describe(self) -> str:
        return (f"{self.project.rel(self.recipe)}" + (f" with dataset {self.dataset}" if self.dataset else "")
                + f" -> {self.project.rel(self.dir)}")


def resolve(model: str = families.DEFAULT, data: str = "sample", run: str | None = None, *,
            model_path: str | None = None, template: str | None = None, rope: str | None = None,
            cutoff=None, overrides: dict | None = None, project: project_mod.Project | None = None) -> Run:
    """The Run of MODEL x DATA (see the module docstring); a UserError listing the valid values otherwise."""
    proj = project or project_mod.get()
    fam = families.get(model)
    choice = recipes.resolve(proj, model, data)
    name = runs.run_name(model, data, run)
    args = load_yaml(choice.recipe, "recipe")
    if choice.dataset:
        args["dataset"] = choice.dataset
    args["output_dir"] = proj.rel(proj.runs / name / "adapter")
    if model_path:
        # a folder the user names relative to where they are; LLaMA-Factory runs in the project root
        args["model_name_or_path"] = proj.rel(model_path) if Path(model_path).exists() else model_path
    if template:
        args["template"] = template
    if rope:
        if rope not in ROPE_TYPES:
            raise UserError(f"unknown ROPE={rope!r}; valid values: {', '.join(ROPE_TYPES)}")
        args["rope_scaling"] = rope
    if cutoff:
        args["cutoff_len"] = units.count(cutoff, "CUTOFF")
    args.update(overrides or {})
    saved = proj.runs / name / ARGS_FILE
    recorded = None
    if saved.is_file():
        recorded = load_yaml(saved)
        if model_path:
            recorded["model_name_or_path"] = args["model_name_or_path"]
        if template:
            recorded["template"] = template
    return Run(proj, fam, data, name, choice.recipe, args, recorded, choice.dataset)


def ensure_inputs(run: Run, args: dict, *, dry_run: bool) -> tuple[list[str], set[str]]:
    """Build what this machine builds itself, when missing: the family's local model (tiny, SmolLM2) and the
    shipped sample data. Returns (notes, datasets a dry run would build)."""
    from llamafactory_ext import models

    fam, proj = run.family, run.project
    notes, pending = [], set()
    if fam.local and str(args.get("model_name_or_path")) == fam.model:
        if dry_run:
            if not (families.model_dir(fam, proj) / "config.json").is_file():
                notes.append(f"would build the {fam.name} model into {fam.model} first")
        else:
            models.ensure(fam, proj)
    sample = fam.datasets()[0]
    if sample in checks.names(args) and str(args.get("dataset_dir", ".")) in (".", ""):
        path = dataset_file(sample, load_info(proj.root), proj.root)
        if path is None or not path.is_file():
            if dry_run:
                notes.append(f"would build the sample data ({sample}) first: `make data MODEL={fam.name}`")
                pending.add(sample)
            else:
                from llamafactory_ext.data.prepare import prepare

                prepare(fam.name, project=proj)
    return notes, pending


def add_run_arguments(p, *, family_flag: str = "--model") -> None:
    """The flags that name a run (what `make` passes as MODEL=, DATA=, RUN=, MODEL_PATH=, TEMPLATE=)."""
    p.add_argument(family_flag, dest="family", default=families.DEFAULT,
                   help=f"model family (MODEL=): {' | '.join(families.names())} (default {families.DEFAULT})")
    p.add_argument("--data", default="sample",
                   help="DATA=: a shipped recipe's DATA (sample, 5k, 15k, ...) or your dataset NAME from `make data`")
    p.add_argument("--run", default=None, help="RUN=: run folder name under runs/ (default: <model>_<data>)")
    p.add_argument("--model-path", default=None, help="MODEL_PATH=: local path or hub id replacing the recipe's model")
    p.add_argument("--template", default=None, help="TEMPLATE=: LLaMA-Factory template replacing the family's")


def from_args(ns, **kw) -> Run:
    """The Run named by add_run_arguments' flags (plus any resolve() keyword)."""
    return resolve(ns.family, ns.data, ns.run, model_path=ns.model_path, template=ns.template, **kw)
