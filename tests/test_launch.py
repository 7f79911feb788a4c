"""The launcher's guards, each one a defect a new user hit (issues 11 and 12): prompts cut after all, a run
resumed on other data, IN= ignored, predict on somebody else's test split, generic environment variables,
shell injection through make variables, broken checkpoints, a DeepSpeed dry run that compiles C++.

Everything runs in a project-shaped folder with the sample built by `llamafactory-ext data` (real manifests,
real tokenizers); the resume decisions are checked on real folders, through `sft.decide_resume`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

from llamafactory_ext import UserError, families
from llamafactory_ext.data import checks
from llamafactory_ext.project import Project
from llamafactory_ext.train import launcher, recipes, resolve, runs, sft


def ext(ws: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *args], cwd=ws, capture_output=True,
                          text=True, env=env or cli_env(), timeout=600)


def project(tmp: Path) -> Path:
    for d in ("sft_recipes", "deepspeed", "build", "data/sample"):
        (tmp / d).parent.mkdir(parents=True, exist_ok=True)
        (tmp / d).symlink_to(ROOT / d)
    shutil.copy(ROOT / "dataset_info.json", tmp / "dataset_info.json")
    return tmp


@pytest.fixture(scope="module")
def ws(tiny_models, tmp_path_factory) -> Path:
    """The tiny sample built as `make data` builds it, plus your own data `mine` in a nested schema."""
    ws = project(tmp_path_factory.mktemp("launch"))
    nested = ws / "mine.jsonl"
    with nested.open("w") as f:
        for line in (ROOT / "data/sample/paper_review.jsonl").open():
            r = json.loads(line)
            f.write(json.dumps({"paper": {"id": r["paper_id"], "text": r["input"]}, "reviews": [r["output"]]}) + "\n")
    p = ext(ws, "data")
    assert p.returncode == 0, p.stderr[-3000:]
    p = ext(ws, "data", "--model", "tiny", "--in", "mine.jsonl", "--name", "mine", "--test-size", "6",
            "--jq", "{paper_id: .paper.id, input: .paper.text, output: .reviews[0]}")
    assert p.returncode == 0, p.stderr[-3000:]
    return ws


def sft_run(ws: Path, *overrides: str, **flags) -> resolve.Run:
    """The run `run sft` resolves, in-process, inside `ws`."""
    kw = {"model_path": flags.pop("model_path", None), "template": flags.pop("template", None)}
    return in_ws(ws, resolve.resolve, flags.pop("model", "tiny"), flags.pop("data", "sample"), flags.pop("run", None),
                 overrides=resolve.parse_overrides(list(overrides), "run sft"), **kw)


def sft_args(ws: Path, *overrides: str, **flags) -> tuple[dict, resolve.Run]:
    r = sft_run(ws, *overrides, **flags)
    return dict(r.args), r


def in_ws(ws: Path, fn, *a, **kw):
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        return fn(*a, **kw)
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------------ data manifest (issue 11.3)
def test_every_built_file_has_a_manifest(ws):
    info = json.loads((ws / "dataset_info.json").read_text())
    for name, mode in (("sample_train", "train"), ("sample_test", "inference"), ("mine_train", "train"),
                       ("mine_test", "inference")):
        doc = json.loads((ws / (info[name]["file_name"] + ".manifest.json")).read_text())
        assert doc["mode"] == mode and doc["family"] == "tiny" and doc["template"] == "mistral"
        assert doc["tokenizer"] == "build/tiny/mistral" and len(doc["tokenizer_sha256"]) == 64
        assert doc["read"] == 36 and doc["accepted"] == 36 and doc["rejected"] == 0
        assert doc["records"] + doc["dropped"] == doc["split_records"]
        if mode == "train":
            assert doc["budget"] == 1024 and doc["test_dataset"] == name.replace("_train", "_test")
        else:
            assert doc["paper_tokens"] == 700
    mine = [json.loads(x) for x in (ws / info["mine_test"]["file_name"]).open()]
    assert len(mine) == 6 and all(r["paper_id"] for r in mine)  # the jq filter mapped the nested schema


@pytest.mark.parametrize("override", ["cutoff_len=800", "cutoff_len=256"])
def test_cutoff_below_the_data_budget_is_refused(ws, override):
    """issue 11.1: with cutoff_len=800 LLaMA-Factory cut the [/INST] marker from 30 of 30 sample prompts."""
    p = ext(ws, "run", "sft", "--dry-run", override)
    assert p.returncode == 2, p.stdout + p.stderr
    n = override.split("=")[1]
    assert f"cutoff_len {n} is below the 1024 tokens sample_train was cut to" in p.stderr
    assert f"re-run `make data MODEL=tiny CUTOFF={n}`" in p.stderr and "CUTOFF=1024" in p.stderr


def test_other_template_or_tokenizer_is_refused(ws):
    args, _ = sft_args(ws, "template=gemma")
    proj = Project(ws)
    problems = checks.problems(args, families.get("tiny"), proj)
    assert any("cut for template 'mistral', this run uses 'gemma'" in p for p in problems), problems
    args, _ = sft_args(ws, model_path="build/tiny/gemma")  # same template, another tokenizer
    problems = checks.problems(args, families.get("tiny"), proj)
    assert any("differs from build/tiny/gemma's" in p for p in problems), problems
    args, _ = sft_args(ws)
    assert checks.problems(args, families.get("tiny"), proj) == []


def test_another_template_end_to_end_through_make_data(ws):
    """Any HF model over a family's recipe with TEMPLATE=: the refusal names `make data ... TEMPLATE=`, and after
    that command the same run is accepted (the data is cut with that template; its manifest says so)."""
    p = ext(ws, "run", "sft", "--model", "tiny", "--data", "mine", "--template", "llama2", "--dry-run")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "was cut for template 'mistral', this run uses 'llama2'" in p.stderr
    assert "re-run `make data MODEL=tiny IN=mine.jsonl NAME=mine TEMPLATE=llama2`" in p.stderr, p.stderr
    p = ext(ws, "data", "--model", "tiny", "--in", "mine.jsonl", "--name", "mine_l2", "--test-size", "6",
            "--template", "llama2", "--jq", "{paper_id: .paper.id, input: .paper.text, output: .reviews[0]}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "template llama2" in p.stderr
    info = json.loads((ws / "dataset_info.json").read_text())
    doc = json.loads((ws / (info["mine_l2_train"]["file_name"] + ".manifest.json")).read_text())
    assert doc["template"] == "llama2"
    train = [json.loads(x) for x in (ws / info["mine_l2_train"]["file_name"]).open()]
    assert len(train) == 30
    p = ext(ws, "run", "sft", "--model", "tiny", "--data", "mine_l2", "--template", "llama2", "--dry-run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "template: llama2" in p.stdout
    p = ext(ws, "data", "--model", "tiny", "--name", "x", "--in", "mine.jsonl", "--template", "mistrall")
    assert p.returncode == 2 and "LLaMA-Factory has no template 'mistrall'" in p.stderr, p.stderr


def test_make_data_says_where_the_rejected_lines_went(ws):
    """A new user's bad lines: `make data` names the rejects file and the kinds, not only a count."""
    good = (ROOT / "data/sample/paper_review.jsonl").read_text(encoding="utf-8").split("\n")[:8]
    bad = ['{"input": "x", "input": "y", "output": "r"}', "not json", '{"output": "no input"}']
    (ws / "bad.jsonl").write_text("\n".join(good[:4] + bad + good[4:]) + "\n")
    p = ext(ws, "data", "--model", "tiny", "--in", "bad.jsonl", "--name", "bad", "--test-size", "2",
            "--dataset-info", "bad_info.json")  # registered apart: the other tests list the project's datasets
    assert p.returncode == 0, p.stderr[-3000:]
    assert "convert: read 11, accepted 8, rejected 3" in p.stderr
    assert ("convert: rejected: repeated key 1, invalid JSON 1, missing input 1 -> "
            "data/build/bad/all.jsonl.rejects.jsonl (line, reason)") in p.stderr, p.stderr[-3000:]
    rejects = [json.loads(x) for x in (ws / "data/build/bad/all.jsonl.rejects.jsonl").open()]
    assert [r["line"] for r in rejects] == [5, 6, 7]


# ------------------------------------------------------------------------------ your own data (issue 11.2, 11.4)
def test_own_data_trains_with_the_family_base_recipe(ws):
    before = sorted((ws / "runs").rglob("*"))  # other tests of this module leave runs of their own
    p = ext(ws, "run", "sft", "--model", "tiny", "--data", "mine", "--dry-run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resolved: sft_recipes/tiny_sample.yaml with dataset mine_train -> runs/tiny_mine" in p.stdout
    assert "dataset: mine_train" in p.stdout and "output_dir: runs/tiny_mine/adapter" in p.stdout
    assert sorted((ws / "runs").rglob("*")) == before  # a dry run writes nothing


def test_predict_uses_the_test_split_of_the_training_data(ws):
    p = ext(ws, "run", "predict", "--model", "tiny", "--data", "mine", "--base", "--dry-run")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "eval_dataset: mine_test" in p.stdout and "model_name_or_path: build/tiny/mistral" in p.stdout
    assert "output_dir: runs/tiny_mine/predict/base_temp_0.35" in p.stdout
    p = ext(ws, "run", "predict", "--model", "tiny", "--data", "mine", "--base", "--dry-run", "--dataset", "mine_train")
    assert p.returncode == 2 and "mine_train was built for train, not inference" in p.stderr


def test_unknown_data_lists_what_exists(ws):
    p = ext(ws, "run", "sft", "--model", "tiny", "--data", "mien", "--dry-run")
    assert p.returncode == 2
    # the shipped recipe, then your data built for this family; never another family's (the shipped
    # dataset_info.json registers sample_smollm2 and sample_tiny_gemma), nor `sample` twice
    listed = re.search(r"valid for MODEL=tiny: (.*?) \(your own data", p.stderr).group(1).split(", ")
    assert listed[:2] == ["DATA=sample", "DATA=mine"] and len(set(listed)) == len(listed), p.stderr
    assert not any("smollm2" in d or "gemma" in d for d in listed), p.stderr  # (mine_l2: another test's)
    assert "make data MODEL=tiny IN=file.jsonl NAME=mien" in p.stderr
    p = ext(ws, "run", "sft", "--model", "smollm2", "--data", "mien", "--dry-run")
    assert p.returncode == 2 and "valid for MODEL=smollm2: DATA=sample (your own data" in p.stderr, p.stderr
    p = ext(ws, "run", "sft", "--model", "mistral", "--data", "mien", "--dry-run")
    assert "valid for MODEL=mistral: DATA=15k, DATA=5k (your own data" in p.stderr, p.stderr  # not mine (tiny)


def test_too_few_papers_for_the_test_size(ws):
    p = ext(ws, "data", "--model", "tiny", "--in", "mine.jsonl", "--name", "few", "--test-size", "36",
            "--jq", "{input: .paper.text, output: .reviews[0]}")
    assert p.returncode == 2 and "has only 36 papers" in p.stderr, p.stderr
    assert "with make data: TEST_SIZE= (papers held out" in p.stderr and "not set" not in p.stderr
    # not given: the default (500 papers) is named as the value that was used
    p = ext(ws, "data", "--model", "tiny", "--in", "mine.jsonl", "--name", "few",
            "--jq", "{input: .paper.text, output: .reviews[0]}")
    assert p.returncode == 2 and "--test-size 500 takes 500 papers" in p.stderr, p.stderr
    assert "TEST_SIZE= (papers held out" in p.stderr and "not set, it is 500)" in p.stderr
    p = ext(ws, "data", "--model", "tiny", "--in", "mine.jsonl", "--name", "few", "--test-size", "lots")
    assert p.returncode == 2 and "--test-size 'lots'" in p.stderr and "with make data: TEST_SIZE=" in p.stderr
    assert "Traceback" not in p.stderr


def test_recipes_lists_model_by_data(ws):
    p = ext(ws, "recipes")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(ln.split()[:3] == ["mistral", "15k", "sft_recipes/mistral_15k.yaml"] for ln in lines)
    assert any(ln.split()[:2] == ["tiny", "mine"] and "mine_train" in ln for ln in lines)
    assert not any(ln.split()[:2] == ["gemma", "mine"] for ln in lines)  # built for tiny only


# ------------------------------------------------------------------------------ run identity (issue 11.4)
def fake_started_run(ws: Path, args: dict, r: resolve.Run, steps=(2,)) -> None:
    """What a started run leaves: run.json as the launcher writes it, and checkpoint folders."""
    runs.write_identity(r.dir, runs.identity(args, r.dataset_dir))
    for s in steps:
        ck = r.dir / "adapter" / f"checkpoint-{s}"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": s}))


def test_resume_only_continues_the_same_run(ws, tmp_path):
    args, r = sft_args(ws, run="ident")
    fake_started_run(ws, args, r)
    try:
        same, _ = sft_args(ws, run="ident")
        said = sft.decide_resume(r, same, "auto", dry_run=True)
        assert same["resume_from_checkpoint"].endswith("checkpoint-2"), said
        for change, what in (("dataset=mine_train", "dataset: sample_train -> mine_train"),
                             ("lora_rank=8", "lora_rank: 16 -> 8"), ("cutoff_len=2048", "cutoff_len: 1024 -> 2048")):
            other, _ = sft_args(ws, change, run="ident")
            with pytest.raises(UserError) as e:
                sft.decide_resume(r, other, "auto", dry_run=True)
            assert what in str(e.value) and "RESUME=never" in str(e.value) and "RUN=<name>" in str(e.value)
        # the same name, other content: the data file changed under the run
        data = ws / "data/build/sample/train.jsonl"
        saved = data.read_bytes()
        try:
            data.write_bytes(saved + saved.splitlines(keepends=True)[0])
            with pytest.raises(UserError, match="dataset sample_train: file content changed"):
                sft.decide_resume(r, sft_args(ws, run="ident")[0], "auto", dry_run=True)
        finally:
            data.write_bytes(saved)
    finally:
        shutil.rmtree(r.dir)


def test_the_cli_refuses_a_changed_run_with_exit_2(ws):
    args, r = sft_args(ws)
    fake_started_run(ws, args, r)
    try:
        p = ext(ws, "run", "sft", "--dry-run", "dataset=mine_train")  # issue 11 defect 2, as reported
        assert p.returncode == 2 and "dataset: sample_train -> mine_train" in p.stderr, p.stderr
    finally:
        shutil.rmtree(r.dir)


# ------------------------------------------------------------------------------ checkpoints (issue 12)
def write_safetensors(path: Path, truncate_by: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"lora_A": torch.ones(64, 16)}, str(path))
    if truncate_by:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate_by])


def test_a_truncated_adapter_is_skipped_naming_the_file(ws):
    args, r = sft_args(ws, run="broken")
    fake_started_run(ws, args, r, steps=(2, 4))
    out = r.dir / "adapter"
    write_safetensors(out / "checkpoint-2/adapter_model.safetensors")
    write_safetensors(out / "checkpoint-4/adapter_model.safetensors", truncate_by=100)
    try:
        # 8-byte header length + 72-byte JSON header + 64 x 16 fp32 (4,096 B) = 4,176 B; 100 cut off
        assert runs.checkpoint_problem(out / "checkpoint-4") == (
            "adapter_model.safetensors: truncated (4076 bytes, the header describes 4176)")
        said = sft.decide_resume(r, args, "auto", dry_run=False)
        assert args["resume_from_checkpoint"] == "runs/broken/adapter/checkpoint-2"
        assert any("skipping broken checkpoint checkpoint-4: adapter_model.safetensors: truncated" in s for s in said)
        assert not (out / "checkpoint-4").exists()  # moved aside, not deleted:
        assert [p.name.split(".")[0] for p in (r.dir / "broken").iterdir()] == ["checkpoint-4"]
    finally:
        shutil.rmtree(r.dir)


def test_only_a_half_saved_checkpoint_starts_over(ws):
    """issue 12: a kill during the first save left checkpoint-10 without trainer_state.json; LLaMA-Factory's
    own auto-resume picked it and crashed (FileNotFoundError)."""
    args, r = sft_args(ws, run="half")
    out = r.dir / "adapter"
    (out / "checkpoint-10").mkdir(parents=True)
    write_safetensors(out / "checkpoint-10/adapter_model.safetensors")
    try:
        said = sft.decide_resume(r, args, "auto", dry_run=False)
        assert "resume_from_checkpoint" not in args and not out.exists()
        assert "trainer_state.json is missing" in said[0] and "starting over" in said[-1]
        kept = [p for p in r.dir.iterdir() if p.name.startswith("adapter.")]
        assert len(kept) == 1 and (kept[0] / "checkpoint-10/adapter_model.safetensors").is_file()
    finally:
        shutil.rmtree(r.dir)


def test_resume_from_a_given_broken_checkpoint_names_the_file(ws, tmp_path):
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    (ck / "trainer_state.json").write_text("{}")
    (ck / "optimizer.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    args, r = sft_args(ws, run="given")
    with pytest.raises(UserError, match="optimizer.pt: not a whole torch file"):
        sft.decide_resume(r, args, str(ck), dry_run=True)


# ------------------------------------------------------------------------------ environment (issue 11.5)
def test_generic_environment_variables_change_nothing(ws):
    env = cli_env(TEMP="/tmp", TMP="/tmp", MODEL="mistral", DATA="15k", RESUME="garbage", CUTOFF="1",
                  TOP_P="x", MAX_NEW_TOKENS="y", DRY_RUN="0", ROPE="ntk")
    p = ext(ws, "run", "sft", "--dry-run", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resolved: sft_recipes/tiny_sample.yaml -> runs/tiny_sample" in p.stdout and "cutoff_len: 1024" in p.stdout


def test_sft_refuses_predict_flags(ws):
    p = ext(ws, "run", "sft", "--temp", "0.5", "--dry-run")
    assert p.returncode == 2 and "`run sft` has no option --temp" in p.stderr, p.stderr


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--batch-size", "0", "BATCH=0 (--batch-size): must be at least 1"),
    ("--max-new-tokens", "0", "MAX_NEW_TOKENS=0 (--max-new-tokens): must be at least 1"),
    ("--max-samples", "-1", "MAX_SAMPLES=-1 (--max-samples): must be at least 1"),
    ("--chunk", "0", "--chunk 0: must be at least 1"),
    ("--top-p", "2", "TOP_P=2 (--top-p): the share of probability mass sampled from, 0 < TOP_P <= 1"),
    ("--top-p", "0", "TOP_P=0 (--top-p)"),
])
def test_predict_refuses_counts_below_one_and_top_p_outside_0_1(capsys, flag, value, message):
    """0 used to mean "the default" silently (BATCH=0 ran at the family's 12) and -1 / top_p 2 reached LLaMA-Factory:
    refused before anything resolves or loads."""
    from llamafactory_ext import cli

    assert cli.main(["run", "predict", "--model", "nope", flag, value, "--dry-run"]) == 2  # before MODEL is even read
    assert message in capsys.readouterr().err


PAYLOADS = ["`touch {m}`", "$(touch {m})", "x; touch {m}", "$(shell touch {m})"]


@pytest.mark.parametrize(("target", "var"), [
    ("sft", "MODEL"), ("sft", "DATA"), ("data", "IN"), ("data", "JQ"), ("review", "PAPER"),
    ("judge", "JUDGE_URL"), ("judge", "JUDGE_MODEL"), ("predict", "TEMP"), ("plan", "GPU"), ("sft", "RUN"),
])
def test_make_variables_never_reach_a_shell(tmp_path, target, var):
    """issue 11 defect 6: ``make sft DRY_RUN=1 'MODEL=`touch /tmp/pwned`'`` created the file."""
    extra = {"judge": ["JUDGE_URL=http://127.0.0.1:9/v1", "JUDGE_MODEL=m"], "review": ["PAPER=missing.pdf"],
             "data": ["IN=missing.jsonl"]}.get(target, [])
    for i, payload in enumerate(PAYLOADS):
        marker = tmp_path / f"pwned{i}"
        argv = [a for a in extra if not a.startswith(var + "=")] + [f"{var}={payload.format(m=marker)}"]
        p = subprocess.run(["make", "--no-print-directory", target, "DRY_RUN=1", *argv], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0, p.stdout + p.stderr  # a bad value is an error, not a command
        assert not marker.exists(), f"{target} {var}={payload}: the shell ran it\n{p.stdout}{p.stderr}"


# ------------------------------------------------------------------------------ DeepSpeed (issue 12)
def test_deepspeed_dry_run_builds_nothing_and_a_leftover_lock_file_is_harmless(ws, tmp_path):
    """The pinned torch guards a C++-op build with an OS lock (FileLock: dropped by the kernel when its holder
    dies) and leaves the `lock` file behind after every build. A launcher guard that refused runs when that file
    existed stopped every DeepSpeed run after the first build (and failed CI): an old lock file must not matter."""
    ext_dir = tmp_path / "torch_extensions"
    env = cli_env(TORCH_EXTENSIONS_DIR=str(ext_dir))
    lock = ext_dir / "py311_cu130" / "deepspeed_shm_comm" / "lock"  # what an earlier build left
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    # (without any lock file: every other DeepSpeed dry run, e.g. test_recipes' mistral_15k)
    p = ext(ws, "run", "sft", "--dry-run", "deepspeed=deepspeed/ds_z2_config.json", env=env)
    assert p.returncode == 0 and "lock" not in p.stderr, p.stderr[-3000:]
    assert "FORCE_TORCHRUN=1" in p.stdout
    assert not any(ext_dir.rglob("*.so")), "the dry run compiled a C++ op"
    assert sorted(p.relative_to(ext_dir) for p in ext_dir.rglob("*") if p.is_file()) == [lock.relative_to(ext_dir)]


def test_recipe_registry_resolves_only_training_splits(ws):
    info = json.loads((ws / "dataset_info.json").read_text())
    proj = Project(ws)
    assert recipes.resolve(proj, "tiny", "mine", info).dataset == "mine_train"
    assert recipes.test_dataset("mine_train", info, ws) == "mine_test"
    with pytest.raises(UserError):
        recipes.resolve(proj, "tiny", "mine_test", info)


# ------------------------------------------------------------------------------ predict any file (issue 10.3)
@pytest.mark.slow
def test_predict_papers_from_any_file_with_and_without_reviews(ws):
    rows = [json.loads(x) for x in (ROOT / "data/sample/paper_review.jsonl").open()][:3]
    papers = ws / "new papers.jsonl"
    with papers.open("w") as f:
        f.write(json.dumps({"paper_id": rows[0]["paper_id"], "input": rows[0]["input"], "output": rows[0]["output"]}) + "\n")
        f.write(json.dumps({"input": rows[1]["input"]}) + "\n")  # no review, no id
        f.write(json.dumps({"input": rows[2]["input"], "output": None}) + "\n")
    p = ext(ws, "run", "predict", "--model", "tiny", "--data", "sample", "--base", "--papers", str(papers),
            "--max-new-tokens", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    out = ws / "runs/tiny_sample/predict/new_papers"
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["run"] for r in table] == ["base_temp_0.35"] and table[0]["n"] == "3"
    assert table[0]["bleu-4"] != ""  # one paper has its reference review
    reviews = [json.loads(x) for x in (out / "base_temp_0.35/reviews.jsonl").open()]
    # papers without an id are named after the file and their text (data/prepare.py paper_name)
    import hashlib

    named = [f"new_papers-{hashlib.sha1(rows[i]['input'].encode()).hexdigest()[:10]}" for i in (1, 2)]
    assert [r["paper_id"] for r in reviews] == [rows[0]["paper_id"], *named]
    doc = json.loads((out / "papers.jsonl").read_text().splitlines()[1])
    assert doc["output"] == "" and len(doc["input"]) < len(rows[1]["input"])  # cut to the family's paper budget
    assert json.loads((ws / "dataset_info.json").read_text()).keys() >= {"mine_train"}  # the project's untouched
    assert "papers" not in json.loads((ws / "dataset_info.json").read_text())


# ------------------------------------------------------------------------------ CPU threads
def test_container_cpu_quota_in_whole_cores(tmp_path):
    def v2(text: str) -> Path:
        d = tmp_path / f"v2_{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "cpu.max").write_text(text)
        return d

    assert launcher.cgroup_cpus(v2("150000 100000\n")) == 2  # 1.5 cores -> 2 threads' worth
    assert launcher.cgroup_cpus(v2("100000 100000\n")) == 1
    assert launcher.cgroup_cpus(v2("max 100000\n")) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu/cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert launcher.cgroup_cpus(v1) == 4
    (v1 / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    assert launcher.cgroup_cpus(v1) is None
    assert launcher.cgroup_cpus(tmp_path / "none") is None

    threads, why = launcher.cpu_threads(0.1, cgroup_root=v2("100000 100000\n"))
    assert threads == 1 and "1 usable core (container quota 1)" in why, why


def test_cpu_threads_follow_the_affinity_mask_and_the_load():
    """One thread per usable idle core: a process pinned to one core gets 1; with every core busy, 1."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from llamafactory_ext.train import launcher; print(*launcher.cpu_threads(0.1), sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    threads, why = out.stdout.strip().split("|")
    assert threads == "1" and "of 1 cores busy; 1 usable core" in why, why

    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        threads, why = launcher.cpu_threads(0.5, cgroup_root="/nonexistent")
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    assert threads == 1 and f"{cores} usable core" in why, why
