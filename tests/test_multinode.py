"""More than one machine, on this one: two "nodes" on 127.0.0.1 (NNODES=2, one process each, gloo) through
LLaMA-Factory's own torchrun launcher with the recipe's DeepSpeed ZeRO-2 and 4-bit QLoRA, against one node with
two processes; a node given other data, a RANK instead of a NODE_RANK, a node killed mid-run. Sharded predict
(SHARDS=/SHARD=) with SmolLM2 lives in test_shards.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env
from test_training import state, workspace

pytestmark = pytest.mark.slow

# every node: the tiny model, DeepSpeed ZeRO-2 (the recipes' config) over 4-bit NF4 QLoRA, RoPE scaling (cutoff
# beyond the model's 256 positions: only the RoPE fix makes it load, in every rank), 4 optimizer steps
COMMON = ["deepspeed=deepspeed/ds_z2_config.json", "max_steps=4", "save_steps=4", "logging_steps=1",
          "per_device_train_batch_size=1", "gradient_accumulation_steps=2", "cutoff_len=600", "report_to=none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft(ws: Path, *args: str, env: dict | None = None, tag: str = "sft") -> subprocess.Popen:
    log = open(ws / f"{tag}.log", "w")  # noqa: SIM115 - closed when the process is reaped (wait below)
    return subprocess.Popen([sys.executable, "-m", "llamafactory_ext.cli", "run", "sft", "--model", "tiny", "--data",
                             "sample", *args], cwd=ws, env=cli_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait(p: subprocess.Popen, timeout: int = 900) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p)
        p.wait()
        raise


def kill_tree(p: subprocess.Popen) -> None:
    import psutil

    procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def nodes(ws: Path, ws1: Path | None = None, *extra: str, run: str = "two") -> tuple[subprocess.Popen, ...]:
    """Node 0 in `ws`, node 1 in `ws1` (default the same folder: a shared filesystem)."""
    port = str(free_port())
    dist = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port, "--run", run]
    p1 = sft(ws1 or ws, *dist, "--node-rank", "1", *extra, tag=f"{run}_node1")
    p0 = sft(ws, *dist, "--node-rank", "0", *extra, tag=f"{run}_node0")
    return p0, p1


@pytest.fixture(scope="module")
def short_model(tiny_models) -> Path:
    from llamafactory_ext.models import tiny

    return tiny.build("mistral", tiny_models["mistral"].parent / "mistral_short_ctx", max_position_embeddings=256,
                      rope_theta=1e6)


@pytest.fixture(scope="module")
def one_and_two(short_model, tmp_path_factory) -> dict:
    """The same 4 steps, global batch 2 x 2: one node with two processes, and two nodes with one each."""
    ws = workspace(tmp_path_factory.mktemp("nodes"))
    args = [*COMMON, "--rope", "linear", f"model_name_or_path={short_model}"]
    one = sft(ws, *args, "--nproc", "2", "--run", "one", tag="one")
    assert wait(one) == 0, (ws / "one.log").read_text()[-4000:]
    p0, p1 = nodes(ws, None, *args)
    rc0, rc1 = wait(p0), wait(p1)
    assert rc0 == rc1 == 0, (ws / "two_node0.log").read_text()[-3000:] + (ws / "two_node1.log").read_text()[-3000:]
    return {"ws": ws, "one": (ws / "one.log").read_text(), "node0": (ws / "two_node0.log").read_text(),
            "node1": (ws / "two_node1.log").read_text()}


def test_one_node_two_processes_runs_deepspeed_zero2_over_qlora_with_the_rope_fix(one_and_two):
    ws, log = one_and_two["ws"], one_and_two["one"]
    assert "Initializing 2 distributed tasks" in log and "world size: 2" in log  # LLaMA-Factory's torchrun path
    assert "Quantizing model to 4 bit with bitsandbytes" in log
    st = state(ws, run="one")  # written at the very end: the seed's "Tensor is not JSON serializable" would fail
    assert st["global_step"] == 4 and all(isinstance(h.get("grad_norm", 0.0), float) for h in st["log_history"])
    # a DeepSpeed engine wrote the checkpoint: ZeRO-2 optimizer partitions, one per rank
    ck = ws / "runs/one/adapter/checkpoint-4/global_step4"
    assert len(list(ck.glob("*zero_pp_rank_*optim_states.pt"))) == 2, sorted(os.listdir(ck))


def test_two_nodes_train_what_one_node_with_two_processes_trains(one_and_two):
    """Same data, same global batch, same seed: the adapters agree (float tolerance), and so do the losses."""
    import torch
    from safetensors.torch import load_file

    ws = one_and_two["ws"]
    assert "Multi-node training enabled: num nodes: 2" in one_and_two["node0"]
    assert "node 0 of 2, 1 process(es) per node, world size 2" in one_and_two["node0"]
    assert "training data hash" in one_and_two["node1"]
    a = load_file(ws / "runs/one/adapter/adapter_model.safetensors")
    b = load_file(ws / "runs/two/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    la = [h["loss"] for h in state(ws, run="one")["log_history"] if "loss" in h]
    lb = [h["loss"] for h in state(ws, run="two")["log_history"] if "loss" in h]
    assert la == pytest.approx(lb, rel=1e-4)
    assert not (ws / "runs/two/sft_args.node1.yaml").read_text() == ""  # node 1 wrote only its own file
    assert json.loads((ws / "runs/two/run.json").read_text())["datasets"].keys() == {"sample_train"}


def test_a_node_with_other_data_is_refused_naming_both_hashes(tiny_models, tmp_path):
    ws0, ws1 = workspace(tmp_path / "n0"), workspace(tmp_path / "n1", n_train=7)  # one paper fewer on node 1
    p0, p1 = nodes(ws0, ws1, "max_steps=1", "report_to=none", run="other")
    t0 = time.monotonic()
    rc0, rc1 = wait(p0), wait(p1)
    log0, log1 = (ws0 / "other_node0.log").read_text(), (ws1 / "other_node1.log").read_text()
    assert rc0 != 0 and rc1 != 0, log0[-2000:]
    for log in (log0, log1):
        assert "the nodes of this run disagree, nothing was trained" in log, log[-3000:]
        assert "training data of node 1 (rank 1) is" in log and "node 0's is" in log
    assert not (ws0 / "runs/other/adapter/adapter_model.safetensors").exists()
    assert time.monotonic() - t0 < 600


def test_rank_instead_of_node_rank_and_other_mistakes_are_refused_before_anything_starts(tiny_models, tmp_path):
    ws = workspace(tmp_path)
    cases = [
        ({"RANK": "1"}, ["--nnodes", "2", "--master-addr", "127.0.0.1"],
         "RANK=1 is set but NODE_RANK is not: LLaMA-Factory's launcher reads only NODE_RANK"),
        ({}, ["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "NODE_RANK=2 with NNODES=2: node ranks go from 0 to 1"),
        ({}, ["--nnodes", "2", "--node-rank", "1"], "NNODES=2 needs MASTER_ADDR=<the address of node 0>"),
        ({}, ["--nnodes", "2", "--node-rank", "one", "--master-addr", "h"], "NODE_RANK='one': expected 0, 1"),
    ]
    for env, argv, message in cases:
        p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "run", "sft", "--model", "tiny", "--data",
                            "sample", "--dry-run", *argv], cwd=ws, env=cli_env(**env), capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 2 and message in p.stderr, (argv, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
    # a dry run of a correct node says how it will start, the rendezvous port the same on every node (through make
    # and the Slurm script: test_slurm.py); the seed's endless ddp_timeout is kept, and said to stall on a hung node
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "run", "sft", "--model", "tiny", "--data", "sample",
                        "--dry-run", "--nnodes", "2", "--node-rank", "1", "--master-addr", "host0",
                        "ddp_timeout=180000000"], cwd=ws, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FORCE_TORCHRUN=1 NPROC_PER_NODE=1 NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 MASTER_PORT=29500" in p.stdout
    assert "ddp_timeout: 180000000" in p.stdout and "node 1 of 2" in p.stdout
    assert ("ddp_timeout 180,000,000 s (the recipe's): a node that hangs without exiting keeps the others waiting that "
            "long") in p.stdout and "key=value ddp_timeout=1800 bounds it" in p.stdout, p.stdout
    assert not (ws / "runs/tiny_sample").exists()  # node 1 and a dry run write nothing


def test_killing_one_node_ends_the_other_with_a_clear_error(tiny_models, tmp_path):
    ws = workspace(tmp_path)
    p0, p1 = nodes(ws, None, "max_steps=400", "save_steps=1000", "logging_steps=1", "report_to=none", run="killed")
    log = ws / "runs/killed/adapter/trainer_log.jsonl"
    deadline = time.monotonic() + 600
    while not (log.is_file() and log.read_text().strip()) and time.monotonic() < deadline and p0.poll() is None:
        time.sleep(0.2)
    assert log.is_file(), (ws / "killed_node0.log").read_text()[-3000:]
    kill_tree(p1)  # node 1, all of it: the launcher, llamafactory-cli, torchrun and its worker (its own session)
    p1.wait()
    t_kill = time.monotonic()
    rc0 = wait(p0, timeout=300)
    took = time.monotonic() - t_kill
    out = (ws / "killed_node0.log").read_text()
    assert rc0 != 0 and took < 120, (rc0, took, out[-3000:])
    assert "error: training stopped on node 0" in out and "RESUME=auto continues" in out, out[-3000:]
    assert "Traceback" not in out.split("error: training stopped")[-1]  # the last word is ours
