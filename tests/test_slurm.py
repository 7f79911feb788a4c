"""The Slurm scripts (slurm/*.sbatch), run by bash as sbatch would run them, with stand-ins for what only a cluster
has: `scontrol` (prints the allocation's hosts) and `srun` (runs its command once per node, in parallel, with that
node's SLURM_NODEID). What they launch is the real `make`, with DRY_RUN=1: our launcher resolves every node's
arguments and prints the torchrun line it would run, without training.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, cli_env
from test_training import workspace

SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || exit 9
tr ',' '\\n' <<< "$3"
"""
# one copy of the command per node, all at once, as srun --ntasks-per-node=1 does
SRUN = """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" > "node$i.out" 2>&1 & done
wait
"""


@pytest.fixture
def cluster(tmp_path: Path, tiny_models) -> tuple[Path, dict]:
    ws = workspace(tmp_path / "ws")
    for name in ("Makefile", "pyproject.toml", "slurm", ".venv"):
        (ws / name).symlink_to(ROOT / name)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = cli_env(PATH=f"{stubs}:{os.environ['PATH']}", MAKEFLAGS="--old-file=.venv/.installed")
    env.pop("MAKELEVEL", None)  # as sbatch runs it: not under a make (`make test` would add "Entering directory")
    return ws, env


@pytest.mark.slow
def test_sft_sbatch_gives_each_node_its_rank_and_node_0_as_master(cluster):
    ws, env = cluster
    env.update(SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1", SLURM_SUBMIT_DIR=str(ws))
    hostile = ws / "pwned"
    p = subprocess.run(["bash", "slurm/sft.sbatch", "tiny", "sample", "DRY_RUN=1", f"RUN=x$(touch {hostile})"],
                       cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    outs = [(ws / f"node{i}.out").read_text() for i in (0, 1)]
    assert not hostile.exists()  # a make variable is never pasted into a shell line
    for out in outs:  # the hostile RUN= is refused as a name, on both nodes, before anything runs
        assert "RUN=" in out and "Error 2" in out, out
    p = subprocess.run(["bash", "slurm/sft.sbatch", "tiny", "sample", "DRY_RUN=1"], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    for i in (0, 1):
        out = (ws / f"node{i}.out").read_text()
        assert "dry run: arguments OK" in out, out
        launch = next(line for line in out.splitlines() if line.startswith("# launch:"))
        assert (f"NPROC_PER_NODE=1 NNODES=2 NODE_RANK={i} MASTER_ADDR=gpu-a MASTER_PORT=29500 llamafactory-cli train "
                f"runs/tiny_sample/sft_args{'.node1' if i else ''}.yaml") in launch, launch
        assert f"node {i} of 2, 1 process(es) per node, world size 2, rendezvous gpu-a:29500" in out, out
        assert "ddp_timeout: 1800" in out  # sized from the data (no manifest here: HF's default)
    assert not (ws / "runs").exists()  # a dry run writes nothing, on any node


def test_sbatch_scripts_need_model_and_data(cluster):
    ws, env = cluster
    for script in ("slurm/sft.sbatch", "slurm/predict_array.sbatch"):
        p = subprocess.run(["bash", script, "tiny"], cwd=ws, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "usage" in p.stderr, (script, p.stderr)


def test_predict_array_reviews_the_task_s_shard(cluster):
    ws, env = cluster
    papers = ROOT / "data/sample/paper_review.jsonl"
    seen = 0
    for task in range(3):
        env.update(SLURM_ARRAY_TASK_COUNT="3", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="2",
                   SLURM_ARRAY_TASK_ID=str(task), SLURM_SUBMIT_DIR=str(ws))
        p = subprocess.run(["bash", "slurm/predict_array.sbatch", "tiny", "sample", str(papers), "BASE=1",
                            "DRY_RUN=1"], cwd=ws, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        head = p.stdout.splitlines()[0]
        assert head.startswith(f"shard {task} of 3: ") and f"of the 36 lines of {papers}" in head, p.stdout
        seen += int(head.split(": ")[1].split()[0])
        assert f"runs/tiny_sample/predict/paper_review/shards-of-3/{task}/" in head, head
    assert seen == 36  # the three tasks' shards are the whole file
    assert not (ws / "runs").exists()


def test_predict_array_rerun_of_some_tasks_needs_the_shard_count(cluster):
    """`sbatch --array=1` re-runs task 1 alone: its count (1) is not the 3 shards the papers were split into."""
    ws, env = cluster
    papers = ROOT / "data/sample/paper_review.jsonl"
    argv = ["bash", "slurm/predict_array.sbatch", "tiny", "sample", str(papers), "BASE=1", "DRY_RUN=1"]
    env.update(SLURM_ARRAY_TASK_COUNT="1", SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_MAX="1",
               SLURM_ARRAY_TASK_ID="1", SLURM_SUBMIT_DIR=str(ws))
    p = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "SHARDS=8 sbatch --array=1" in p.stderr and not p.stdout, (p.stdout, p.stderr)
    p = subprocess.run(argv, cwd=ws, env=dict(env, SHARDS="3"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("shard 1 of 3: "), (p.stdout, p.stderr)
    env.pop("SLURM_ARRAY_TASK_ID")
    p = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not an array job" in p.stderr, p.stderr


def test_make_predict_merge_takes_the_predict_variables(cluster):
    """The last array task's SHARD= is on the same line: predict-merge ignores it and says what is missing."""
    ws, env = cluster
    p = subprocess.run(["make", "--no-print-directory", "predict-merge", "PAPERS=data/sample/paper_review.jsonl",
                        "SHARDS=3", "SHARD=1"], cwd=ws, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert ("no sharded predictions of data/sample/paper_review.jsonl in 3 shards in runs/tiny_sample/predict "
            "(there: none); run `make predict PAPERS=... SHARDS=... SHARD=i` first") in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
