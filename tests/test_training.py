"""Real tiny trainings through `llamafactory-ext run sft` -> `llamafactory-cli train`: SIGKILL + resume, a
different batch size on resume, a recipe run by plain `llamafactory-cli train`. (DeepSpeed ZeRO-2 with 4-bit NF4
QLoRA under torchrun, 2 processes and 2 nodes: test_multinode.py.)

Each test works in its own folder laid out like the project (recipes, deepspeed/, dataset_info.json,
data/build/sample/) so nothing touches the user's runs/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

from llamafactory_ext import REVIEWER_INSTRUCTION

pytestmark = pytest.mark.slow


def workspace(tmp: Path, n_train: int = 8, paper_chars: int = 1200) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for d in ("sft_recipes", "deepspeed", "build"):
        (tmp / d).symlink_to(ROOT / d)
    shutil.copy(ROOT / "dataset_info.json", tmp / "dataset_info.json")
    rows = [json.loads(line) for line in (ROOT / "data/sample/paper_review.jsonl").open()][:n_train]
    out = tmp / "data/build/sample/train.jsonl"
    out.parent.mkdir(parents=True)
    with out.open("w") as f:
        for r in rows:
            f.write(json.dumps({"instruction": REVIEWER_INSTRUCTION, "input": r["input"][:paper_chars],
                                "output": r["output"][:500], "paper_id": r["paper_id"]}) + "\n")
    return tmp


def sft(ws: Path, *args: str, env: dict | None = None, wait: bool = True, tag: str = "sft"):
    cmd = [sys.executable, "-m", "llamafactory_ext.cli", "run", "sft", "--model", "tiny", "--data", "sample",
           "report_to=none", *args]
    log = open(ws / f"{tag}.log", "w")  # noqa: SIM115 - closed by the caller via the process
    p = subprocess.Popen(cmd, cwd=ws, env=cli_env(**(env or {})), stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    if wait:
        rc = p.wait(timeout=900)
        log.close()
        return rc, (ws / f"{tag}.log").read_text()
    return p


def state(ws: Path, sub: str = "", run: str = "tiny_sample") -> dict:
    return json.loads((ws / "runs" / run / "adapter" / sub / "trainer_state.json").read_text())


def losses(st: dict) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in st["log_history"] if "loss" in h}


def lrs(st: dict) -> dict[int, float]:
    return {h["step"]: h["learning_rate"] for h in st["log_history"] if "learning_rate" in h}


RESUME_ARGS = ["num_train_epochs=2", "save_steps=4", "logging_steps=1", "lr_scheduler_type=linear",
               "per_device_train_batch_size=2", "gradient_accumulation_steps=1", "save_total_limit=10"]


@pytest.fixture(scope="module")
def uninterrupted_ws(tiny_models, tmp_path_factory) -> Path:
    """8 steps at batch 2 without a stop, a checkpoint every 4 steps (kept): the runs below are compared to it."""
    ws = workspace(tmp_path_factory.mktemp("full"))
    rc, log = sft(ws, *RESUME_ARGS)
    assert rc == 0, log[-4000:]
    return ws


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_ws) -> dict:
    return state(uninterrupted_ws)


def test_sigkill_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    ws = workspace(tmp_path)
    proc = sft(ws, *RESUME_ARGS, wait=False, tag="killed")
    marker = ws / "runs/tiny_sample/adapter/checkpoint-4/trainer_state.json"

    def saved() -> bool:  # written last in a checkpoint; wait until it is whole
        try:
            return json.loads(marker.read_text())["global_step"] == 4
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.time() + 600
    while not saved() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), (ws / "killed.log").read_text()[-3000:]
    assert not (ws / "runs/tiny_sample/adapter/train_results.json").exists(), "killed too late to test resume"
    # also leave a half-written newer checkpoint, as a kill during a save does
    (ws / "runs/tiny_sample/adapter/checkpoint-999").mkdir()

    rc, log = sft(ws, *RESUME_ARGS, "--resume", "auto", tag="resumed")
    assert rc == 0, log[-4000:]
    assert "skipping broken checkpoint checkpoint-999: trainer_state.json is missing" in log
    assert not (ws / "runs/tiny_sample/adapter/checkpoint-999").exists()  # moved aside, kept:
    assert [p.name.split(".")[0] for p in (ws / "runs/tiny_sample/broken").iterdir()] == ["checkpoint-999"]
    assert "Continuing training from checkpoint" in log or "Resuming training from" in log
    st = state(ws)
    assert st["global_step"] == uninterrupted["global_step"] == 8
    # optimizer (Adam moments) and scheduler (linear decay position) restored: the steps after the
    # resume point reproduce the uninterrupted run's losses and learning rates
    first_resumed = min(s for s in losses(st) if s > 4)
    for step in range(first_resumed, 9):
        assert lrs(st)[step] == pytest.approx(lrs(uninterrupted)[step], rel=1e-6)
        assert losses(st)[step] == pytest.approx(losses(uninterrupted)[step], rel=1e-3, abs=1e-3)


def test_resume_with_a_smaller_per_device_batch(uninterrupted_ws, tmp_path):
    """The seed's OOM case: batch 2 -> 1 after a checkpoint (the uninterrupted run's checkpoint-4, copied with its
    run folder). Global step, optimizer and scheduler state carry over; the step count and the data position are
    recomputed in the new batch size."""
    ws = workspace(tmp_path)
    shutil.copytree(uninterrupted_ws / "runs", ws / "runs", symlinks=True)
    for f in (ws / "runs/tiny_sample/adapter").iterdir():  # as if that run had stopped after step 4 (an OOM)
        if f.name != "checkpoint-4":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    assert state(ws, "checkpoint-4")["global_step"] == 4
    args = [a for a in RESUME_ARGS if not a.startswith("per_device_train_batch_size")]
    rc, log = sft(ws, *args, "per_device_train_batch_size=1", "--resume",
                  str(ws / "runs/tiny_sample/adapter/checkpoint-4"), tag="smaller")
    assert rc == 0, log[-4000:]
    st = state(ws)
    assert "Instantaneous batch size per device = 1" in log
    assert "per_device_train_batch_size: 1 (from args) != 2 (from trainer_state.json)" in log  # HF's warning
    assert "Resuming training from checkpoint with epoch 0 and global step 4" in log
    assert "Fast-forwarding the dataloader past 0 epochs and 4 batches" in log  # 4 batches of the NEW size
    # 8 papers / batch 1 = 8 steps per epoch x 2 epochs = 16 steps in all, 4 of them done before
    assert st["global_step"] == st["max_steps"] == 16
    assert min(losses(st)) > 0 and all(math.isfinite(x) for x in losses(st).values())


def test_tiny_recipe_runs_with_plain_llamafactory_cli(tiny_models, tmp_path):
    """The recipes are plain LLaMA-Factory YAML: `llamafactory-cli train sft_recipes/<name>.yaml` from the
    project root runs them unchanged (here with three steps, via LLaMA-Factory's own key=value overrides). The
    plugin's callbacks ride along in any training: peak_memory.json (on CPU the process's max RSS, no GPU figures)
    and speed.json (steady state: the first step left out), at each save and at the end."""
    from llamafactory_ext.fileio import load_yaml

    ws = workspace(tmp_path)
    p = subprocess.run(["llamafactory-cli", "train", "sft_recipes/tiny_sample.yaml", "max_steps=3", "save_steps=3"],
                       cwd=ws, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert state(ws)["global_step"] == 3
    out = ws / "runs/tiny_sample/adapter"
    assert (out / "adapter_model.safetensors").is_file()

    rec = json.loads((out / "peak_memory.json").read_text())
    assert (rec["event"], rec["step"], rec["cuda"], rec["device"]) == ("train_end", 3, False, "cpu")
    assert rec["max_memory_allocated_gib"] is None and rec["max_memory_reserved_gib"] is None
    assert 0.2 < rec["cpu_max_rss_gib"] < 64
    recipe = load_yaml(ROOT / "sft_recipes/tiny_sample.yaml", "recipe")
    assert rec["args"] == {**recipe, "max_steps": 3, "save_steps": 3}  # as LLaMA-Factory was given them
    assert rec["per_device_train_batch_size"] == recipe["per_device_train_batch_size"] and rec["world_size"] == 1
    assert 0 < rec["longest_sequence"] <= recipe["cutoff_len"]
    assert rec["model_config"]["hidden_size"] == 64 and rec["model_config"]["vocab_size"] > 0
    speed = json.loads((out / "speed.json").read_text())
    assert (speed["event"], speed["steps"], speed["steps_measured"], speed["device"]) == ("train_end", 3, 2, "cpu")
    assert speed["step_s"] > 0 and speed["tokens_per_s"] > 0 and speed["params"] > 0
    assert speed["tokens_per_step"] == pytest.approx(speed["tokens_per_s"] * speed["step_s"], rel=0.01)
    assert speed["mfu"] is None  # no card, no peak to divide by
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "plan", "--calibrate", str(out)], cwd=ws,
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "no GPU in that run (CPU max RSS" in p.stdout, p.stderr
