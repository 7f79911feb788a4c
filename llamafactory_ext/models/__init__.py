"""Models built on this machine instead of downloaded: tiny random Mistral/Gemma (tiny.py) and SmolLM2-135M-Instruct
from a PyPI wheel (smollm2.py). `ensure` builds a family's model when it is one of them (cached)."""

from __future__ import annotations

from pathlib import Path

from llamafactory_ext import families


def ensure(fam: families.Family | str, project=None) -> Path | str:
    """The family's model, built first when it is a local one (quick when cached). Hub ids are returned as they
    are: LLaMA-Factory downloads them (once) on a machine with a hub."""
    fam = families.get(fam) if isinstance(fam, str) else fam
    out = families.model_dir(fam, project)
    if out is None:
        return fam.model
    if fam.builder[0] == "tiny":
        from llamafactory_ext.models import tiny

        return tiny.build(fam.builder[1], out)
    if fam.builder[0] == "smollm2":
        from llamafactory_ext.models import smollm2

        return smollm2.ensure(out)
    raise AssertionError(f"unknown builder {fam.builder}")
