"""Review papers in resumable shards (`make predict PAPERS=... SHARDS=2 SHARD=i`) with the real SmolLM2: two shards
at the same time over 6 papers, one killed mid-way and run again; the merged result holds each paper exactly once,
the same set as one unsharded run, nothing lost (eval/shards.py). Greedy, so the same test shows that batched
predict (2 papers of different lengths, left-padded, as LLaMA-Factory pads for generation) writes the same reviews
as one paper at a time."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli_env, ext, ext_ok, project

from llamafactory_ext.data.prepare import paper_name
from llamafactory_ext.eval.shards import shard_of

pytestmark = pytest.mark.slow

PREDICT = ["run", "predict", "--model", "smollm2", "--data", "sample", "--base", "--max-new-tokens", "12", "--temp", "0"]
BATCHED = [*PREDICT, "--batch-size", "2"]
TEMP_DIR = "base_temp_0"


def papers_file(path) -> dict[str, int]:
    """6 sample papers of 400 to 1,900 characters (~100 tokens to the budget's 256: a batch needs padding), 3 per shard
    of 2, two of them without paper_id (named by their text); id -> shard."""
    rows = [json.loads(x) for x in (ROOT / "data/sample/paper_review.jsonl").open()]
    picked, per = [], {0: 0, 1: 0}
    for i, r in enumerate(rows):
        text = r["input"][:400 + 300 * len(picked)]
        rec = {"input": text, "output": r["output"]} if i % 3 == 1 else \
              {"paper_id": r["paper_id"], "input": text, "output": r["output"]}
        s = shard_of(paper_name(rec, "big"), 2)
        if per[s] < 3:
            per[s] += 1
            picked.append(rec)
        if len(picked) == 6:
            break
    with open(path, "w") as f:
        for rec in picked:
            f.write(json.dumps(rec) + "\n")
    return {paper_name(rec, "big"): shard_of(paper_name(rec, "big"), 2) for rec in picked}


def shard(ws, i: int, tag: str, chunk: int) -> subprocess.Popen:
    log = open(ws / f"{tag}.log", "w")  # noqa: SIM115 - reaped below
    return subprocess.Popen([sys.executable, "-m", "llamafactory_ext.cli", *BATCHED, "--papers", "big.jsonl", "--shards",
                             "2", "--shard", str(i), "--chunk", str(chunk)], cwd=ws, env=cli_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_two_shards_one_killed_then_rerun_merge_into_the_unsharded_set(smollm2_model, tmp_path):
    ws = project(tmp_path / "ws")
    ids = papers_file(ws / "big.jsonl")
    assert sorted(ids.values()) == [0, 0, 0, 1, 1, 1]
    root = ws / "runs/smollm2_sample/predict/big"
    s0, s1 = shard(ws, 0, "s0", chunk=2), shard(ws, 1, "s1", chunk=3)  # shard 0: two chunks, killed after the first
    first = root / f"shards-of-2/0/{TEMP_DIR}/chunks/00001"
    deadline = time.monotonic() + 600
    while not first.is_dir() and s0.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.is_dir(), (ws / "s0.log").read_text()[-3000:]
    os.killpg(s0.pid, signal.SIGKILL)  # mid-way: its second chunk is being reviewed
    s0.wait()
    assert s1.wait(timeout=900) == 0, (ws / "s1.log").read_text()[-3000:]
    assert "the other shards are not finished" in (ws / "s1.log").read_text()
    assert not (root / TEMP_DIR / "reviews.jsonl").exists()  # nothing merged while a shard is missing
    p = ext(ws, "predict-merge", "--model", "smollm2", "--data", "sample")
    assert p.returncode == 2 and "shard 0 of 2: 1 of 3 papers not reviewed yet" in p.stderr, p.stderr[-2000:]

    out = ext_ok(ws, *BATCHED, "--papers", "big.jsonl", "--shards", "2", "--shard", "0", "--chunk", "2")
    assert "2 of 3 papers reviewed before, 1 to go" in out, out[-3000:]  # the finished chunk was kept
    assert "merged 6 papers from 2 shard(s)" in out
    merged = [json.loads(x) for x in (root / TEMP_DIR / "reviews.jsonl").open()]
    assert sorted(r["paper_id"] for r in merged) == sorted(ids)  # each paper exactly once
    rows = list(csv.DictReader((root / "metrics.csv").open()))
    assert [r["run"] for r in rows] == [TEMP_DIR] and rows[0]["n"] == "6"
    assert not list((root / "shards-of-2").rglob("*.tmp"))  # the killed chunk's temp folder is gone

    # the same papers unsharded and one at a time, into another run folder: the same papers, the same reviews
    ext_ok(ws, *PREDICT, "--papers", "big.jsonl", "--batch-size", "1", "--run", "unsharded")
    whole = [json.loads(x) for x in (ws / f"runs/unsharded/predict/big/{TEMP_DIR}/reviews.jsonl").open()]
    assert sorted(r["paper_id"] for r in whole) == sorted(ids)
    one_by_one = {r["paper_id"]: r["review"] for r in whole}
    assert len(set(one_by_one.values())) > 1  # real, paper-dependent text (not one string for every paper)
    assert {r["paper_id"]: r["review"] for r in merged} == one_by_one

    # a wrong SHARD= and SHARDS= without PAPERS= are clear errors
    p = ext(ws, *BATCHED, "--papers", "big.jsonl", "--shards", "2", "--shard", "2")
    assert p.returncode == 2 and "SHARD='2' with SHARDS=2: shards go from 0 to 1" in p.stderr
    p = ext(ws, *PREDICT, "--shards", "2", "--shard", "0")
    assert p.returncode == 2 and "SHARDS= splits a PAPERS= file" in p.stderr
