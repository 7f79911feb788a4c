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


def project(ws: Path) -> Path:
    """A folder laid out like the project (recipes, DeepSpeed configs, built models, the sample), with its own
    dataset_info.json and runs/: tests never touch the user's."""
    import shutil

    for d in ("sft_recipes", "deepspeed", "build", "data/sample"):
        (ws / d).parent.mkdir(parents=True, exist_ok=True)
        (ws / d).symlink_to(ROOT / d)
    shutil.copy(ROOT / "dataset_info.json", ws / "dataset_info.json")
    return ws


def ext_ok(ws: Path, *args: str, timeout: int = 1200) -> str:
    """`llamafactory-ext ARGS` in `ws`; its output, or a failure showing the end of it."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *args], cwd=ws, env=cli_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"llamafactory-ext {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI wheel's GGUF (cached in build/smollm2)."""
    from llamafactory_ext import smollm2

    return smollm2.ensure(ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2_workspace(smollm2_model, tmp_path_factory) -> Path:
    """A project folder where SmolLM2 was trained on the sample exactly as `make demo` trains it:
    `make data MODEL=smollm2` -> `make sft MODEL=smollm2` (the shipped recipe) -> `make merge MODEL=smollm2`.
    runs/smollm2_sample/ holds sft_args.yaml, adapter/ and merged/."""
    ws = project(tmp_path_factory.mktemp("smollm2"))
    ext_ok(ws, "data", "--model", "smollm2")
    ext_ok(ws, "run", "sft", "--model", "smollm2", "--data", "sample")
    ext_ok(ws, "run", "merge", "--model", "smollm2", "--data", "sample")
    return ws


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
