"""tests/gpu_planner_check.py (the planner-vs-GPU check of issue 7) runs end to end: `--cpu-smoke` trains a
2-layer architecture through LLaMA-Factory's run_exp on CPU and writes the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, cli_env


def test_cpu_smoke_writes_the_table_and_json(tiny_models, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_planner_check.py"), "--cpu-smoke", "--model",
                        "gemma", "--out", str(tmp_path), "--work", str(tmp_path / "work")], cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads((tmp_path / "planner_check.json").read_text())
    assert out["smoke"] is True and out["steps"] == 2
    assert [r["length"] for r in out["rows"]] == [64, 128]
    for r in out["rows"]:
        assert r["lengths"] == [r["length"]] * 2  # every training sequence filled to exactly the cutoff
        assert [s["step"] for s in r["per_step"]] == [1, 2]  # the callback saw each optimizer step
        assert set(r["measured"].values()) == {None}  # no CUDA: n/a, never a made-up number
        assert r["planner"]["arch"]["vocab"] == 4096 and r["planner"]["arch"]["tied"] is True  # gemma, 2 layers
        assert 0 < r["planner"]["allocated_gib"] <= r["planner"]["peak_gib"]
        assert r["train_args"]["cutoff_len"] == r["length"] and r["train_args"]["lora_rank"] == 64
    md = (tmp_path / "planner_check.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| length | tokens | measured alloc | planner alloc | ratio |")
    assert rows[1].startswith("| 64 | 64 | n/a |") and rows[2].startswith("| 128 | 128 | n/a |")
    assert md.strip() in p.stdout  # the same table is printed
