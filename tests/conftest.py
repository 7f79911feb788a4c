"""Shared fixtures. Every test runs offline: a hidden hub access fails loudly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Set before anything imports huggingface_hub / transformers / datasets.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_DISABLED"] = "true"
os.environ["DISABLE_VERSION_CHECK"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DO_NOT_TRACK"] = "1"

VENV_BIN = Path(sys.executable).parent


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: offline, the venv's bin first on PATH (torchrun, llamafactory-cli)."""
    from llamafactory_ext.launch import LAUNCH_ENV

    # an exported-but-empty NNODES & co. crashes LLaMA-Factory's launcher (int(""))
    env = {k: v for k, v in os.environ.items() if v != "" or k not in LAUNCH_ENV}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny Mistral and Gemma models (built once, cached in build/tiny)."""
    from llamafactory_ext import tiny

    return {arch: tiny.build(arch, ROOT / "build" / "tiny" / arch) for arch in tiny.ARCHS}


@pytest.fixture(scope="session")
def sample_jsonl() -> Path:
    """The committed sample: 36 real ICLR 2022 papers with four-criteria reviews."""
    return ROOT / "data" / "sample" / "paper_review.jsonl"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave things a person may want to look at (screenshots, plots)."""
    d = ROOT / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d
