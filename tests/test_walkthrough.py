"""The README's own-data walkthrough, run exactly as written (the bash block between the walkthrough markers),
in a folder laid out like the project: your schema through JQ= -> make data -> make sft -> make merge ->
make predict (tuned and BASE=1) -> make judge against a real `llamafactory-cli api` server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess

import pytest
from conftest import ROOT, cli_env, project

from llamafactory_ext import REVIEWER_INSTRUCTION

pytestmark = pytest.mark.slow


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert m, "README.md has no walkthrough block between <!-- walkthrough:start/end --> markers"
    return m.group(1)


@pytest.fixture(scope="module")
def ws(tiny_models, tmp_path_factory):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 (the walkthrough's judge server) is in use on this machine")
    ws = project(tmp_path_factory.mktemp("walkthrough"))
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (ws / name).symlink_to(ROOT / name)
    script = walkthrough()
    # its own session: a timeout or a failure also stops what it started in the background (the judge server)
    p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=ws, env=cli_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=1500)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    (ws / "walkthrough.log").write_text(out)
    assert p.returncode == 0, out[-5000:]
    return ws


def test_your_schema_became_mine_train_and_mine_test(ws):
    info = json.loads((ws / "dataset_info.json").read_text())
    train = [json.loads(x) for x in (ws / info["mine_train"]["file_name"]).open()]
    test = [json.loads(x) for x in (ws / info["mine_test"]["file_name"]).open()]
    assert len(test) == 6 and len(train) == 30 and not {r["paper_id"] for r in train} & {r["paper_id"] for r in test}
    assert all(r["instruction"] == REVIEWER_INSTRUCTION for r in train)


def test_trained_merged_and_predicted_in_its_own_run_folder(ws):
    run = ws / "runs/tiny_mine"
    assert (run / "adapter/adapter_model.safetensors").is_file() and (run / "merged/config.json").is_file()
    assert json.loads((run / "run.json").read_text())["datasets"].keys() == {"mine_train"}
    rows = {r["run"]: r for r in csv.DictReader((run / "predict/metrics.csv").open())}
    assert set(rows) == {"base_temp_0.35", "temp_0.35"} and rows["temp_0.35"]["n"] == "6"
    preds = [json.loads(x) for x in (run / "predict/temp_0.35/generated_predictions.jsonl").open()]
    assert all(p["prompt"].startswith(f"<s>[INST] {REVIEWER_INSTRUCTION}\n") for p in preds)
    assert all(p["prompt"].endswith("[/INST]") for p in preds)  # the paper was cut, never the marker
    assert not (ws / "runs/tiny_sample").exists()  # your data never trains into the sample's run


def test_judged_every_test_paper_against_gpt4o(ws):
    summary = json.loads((ws / "runs/tiny_mine/judge_temp_0.35/summary.json").read_text())
    assert summary["n"] == 6 and sum(summary["counts"].values()) == 6
