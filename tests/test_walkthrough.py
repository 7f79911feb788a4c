"""The README's own-data walkthrough, run exactly as written (the bash block between the walkthrough markers),
in a folder laid out like the project: your schema through JQ= -> make data -> make sft -> make merge ->
make predict (tuned and BASE=1) -> make judge against a real `llamafactory-cli api` server on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from conftest import cli_env, ext

from llamafactory_ext import REVIEWER_INSTRUCTION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ws(walkthrough_ws):
    """conftest.py runs the README block once; the tiny pipeline's tests (test_pipeline.py) read the same run."""
    return walkthrough_ws


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
    """A real `llamafactory-cli api` answered: the tiny model is a 64-wide random network, so no answer ends in a
    line "Verdict: A|B|tie": every pair is invalid, never guessed, and no answer is cached (test_judge.py covers
    the cache, retries and re-runs against a scripted server)."""
    out = ws / "runs/tiny_mine/judge_temp_0.35"
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 6 and s["counts"] == {"win": 0, "tie": 0, "loss": 0, "invalid": 6}
    assert s["win_rate"]["value"] is None and s["win_rate"]["valid"] == 0
    assert s["calls"] == {"total": 12, "asked_now": 12, "from_cache": 0, "invalid_reused": 0, "invalid_answers": 12}
    verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (ws / "runs/tiny_mine/predict/papers.jsonl").open()]
    assert [v["paper_id"] for v in verdicts] == [r["paper_id"] for r in test]
    for v in verdicts:
        assert v["outcome"] == "invalid" and v["verdict_a_first"] is None and v["verdict_b_first"] is None
        for side in ("a_first", "b_first"):
            assert isinstance(v[f"answer_{side}"], str)
            assert v[f"invalid_reason_{side}"] in ("no 'Verdict: A|B|tie' on the last line",
                                                   "empty content (finish_reason 'length')",
                                                   "empty content (finish_reason 'stop')")
    assert (out / "cache.jsonl").read_text() == "" and len((out / "invalid.jsonl").read_text().splitlines()) == 12


# ----------------------------------------------------------------------------- one run, resolved once (issue 21)
def test_make_plan_and_judge_use_the_resolved_run(walkthrough_ws):
    """`make plan MODEL=tiny DATA=mine` plans what `make sft` trains (it said "recipe sft_recipes/tiny_mine.yaml not
    found"); `make judge TEMP=0.50` reads temp_0.5/, where predict wrote (it read temp_0.50/)."""
    ws = walkthrough_ws
    p = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "plan", "MODEL=tiny", "DATA=mine"],
                       cwd=ws, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Plan for tiny x mine (sft_recipes/tiny_sample.yaml)" in p.stdout
    p = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "judge", "MODEL=tiny", "DATA=mine",
                        "TEMP=0.50", "JUDGE_URL=http://127.0.0.1:9/v1", "JUDGE_MODEL=m"], cwd=ws, env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "runs/tiny_mine/predict/temp_0.5/reviews.jsonl does not exist" in p.stderr, p.stderr
    assert "make predict MODEL=tiny DATA=mine TEMP=0.5" in p.stderr
    for line in (p.stdout + p.stderr).splitlines():
        assert not line.startswith(("llamafactory-ext", ".venv/bin/llamafactory-ext")), "make echoed a recipe line"


def test_review_and_doctor_take_the_run(walkthrough_ws):
    import json

    p = ext(walkthrough_ws, "doctor", "--model", "tiny", "--data", "mine", "--json")
    assert p.returncode in (0, 1), p.stderr[-2000:]
    disk = next(c for c in json.loads(p.stdout)["checks"] if c["name"] == "disk")
    assert "build/tiny/mistral needs ~" in disk["message"], disk  # the run's recipe was checked
    p = ext(walkthrough_ws, "review", "--family", "tiny", "--data", "mine")
    assert p.returncode == 2 and "give the paper to review" in p.stderr
