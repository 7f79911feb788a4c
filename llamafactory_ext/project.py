"""Where the project is: one rule for its root, and every path under it.

A project folder holds `sft_recipes/` (and beside it `dataset_info.json`, `deepspeed/`, `data/`, `runs/`,
`build/`): a checkout of this repository, or a copy of its layout. The root is, in this order,
  1. `$LLAMAFACTORY_EXT_ROOT` when it is set (it must be a project folder);
  2. the current directory, when it is one (`make` always runs there);
  3. the checkout this package was imported from (`pip install -e .`, what `make install` does).
A wheel installed outside a checkout has none of them; the commands that need a project then say so.

Every path the project writes into LLaMA-Factory's YAML (`output_dir: runs/<run>/adapter`, `dataset_dir: .`)
is relative to the root, and LLaMA-Factory runs in the root, so a YAML on disk also runs unchanged with
plain `llamafactory-cli train <yaml>` from there. Nothing else in the package computes a project path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llamafactory_ext import UserError

ENV = "LLAMAFACTORY_EXT_ROOT"
MARKER = "sft_recipes"
CHECKOUT = Path(__file__).resolve().parent.parent  # the folder above the package


def is_project(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_dir()


def find_root() -> Path:
    """The project root by the rule above; a UserError saying what to do when there is none."""
    given = os.environ.get(ENV, "").strip()
    if given:
        if not is_project(given):
            raise UserError(f"{ENV}={given} is not a project folder (no {MARKER}/ in it); point it at a checkout "
                            f"of llamafactory-ext, or unset it")
        return Path(os.path.abspath(given))
    for cand in (Path.cwd(), CHECKOUT):
        if is_project(cand):
            return Path(os.path.abspath(cand))
    raise UserError(f"this command needs the project folder (a checkout with {MARKER}/, dataset_info.json, deepspeed/ "
                    f"and data/sample/): run it there (`cd` into your checkout), or set {ENV}=/path/to/checkout. "
                    f"An installed wheel alone has no recipes")


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def recipes(self) -> Path:
        return self.root / MARKER

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def dataset_info(self) -> Path:
        return self.root / "dataset_info.json"

    @property
    def data_build(self) -> Path:
        """Where `make data` writes the datasets it builds."""
        return self.root / "data" / "build"

    @property
    def build(self) -> Path:
        """Locally built models (tiny, SmolLM2)."""
        return self.root / "build"

    @property
    def sample(self) -> Path:
        """The shipped sample: 36 ICLR 2022 papers with four-criteria reviews."""
        return self.root / "data" / "sample" / "paper_review.jsonl"

    @property
    def sample_gpt4o(self) -> Path:
        """GPT-4o's reviews of the sample papers (the judge's default other side)."""
        return self.root / "data" / "sample" / "gpt4o_reviews.jsonl"

    def path(self, value: str | os.PathLike) -> Path:
        """A path as LLaMA-Factory, running in the root, reads it (absolute ones stay as they are)."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    def rel(self, path: str | os.PathLike) -> str:
        """`path` relative to the root when it is inside it (what the YAML files hold), else absolute."""
        p = Path(os.path.abspath(path))  # lexical: a symlinked folder inside the root stays inside it
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            return str(p)


def get() -> Project:
    """The project of this process (see the module docstring)."""
    return Project(find_root())
