"""`make gpu-check` (fit/gpucheck.py): `--cpu-smoke` runs its whole code path on CPU with a 2-layer model (random-weight
architecture, synthetic fixed-length data, LLaMA-Factory's run_exp in a child per configuration, the planner's
prediction beside it, HF generate), and writes the table and the JSON; without a GPU the real check says so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def test_cpu_smoke_writes_the_table_and_json(tiny_models, tmp_path):
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "gpu-check", "--cpu-smoke", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget", "400"], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    names = [r["name"] for r in report["training"]]
    assert names == ["mistral_15k", "mistral_15k+liger"], report["skipped"]  # a recipe and its first variant
    for r in report["training"]:  # the training process recorded its memory and speed; the planner predicted
        assert r["measured"]["step_s"] and r["planned"]["allocated_gib"] > 0
        assert r["measured"]["allocated_gib"] is None  # a CPU has no GPU allocator figures
    assert report["generate"] and all(g["new_tokens_per_s"] > 0 for g in report["generate"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    md = (tmp_path / "out/gpu_check.md").read_text()
    assert "| configuration |" in md and "HF generate" in md


@pytest.mark.skipif(bool(shutil.which("nvidia-smi")), reason="this machine has nvidia-smi")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "gpu-check", "--out", str(tmp_path)], cwd=ROOT,
                       env=cli_env(PATH="/usr/bin:/bin"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "gpu-check: no NVIDIA GPU here" in p.stderr and not list(tmp_path.iterdir())
