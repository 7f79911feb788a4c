"""judge: verdict parsing, the position-swap rule, retries, the crash-safe cache, and real servers.

Two real HTTP servers on 127.0.0.1: a stdlib one speaking the OpenAI chat-completions JSON with
crafted answers (and crafted 429/500 failures), and `llamafactory-cli api` serving the tiny model.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env

from llamafactory_ext import UserError, cli
from llamafactory_ext.judge import combine, judge, parse_verdict, wilson

VENV_BIN = Path(sys.executable).parent
SECRET = "sk-test-secret-0123456789"


# ----------------------------------------------------------------------------- (a) parsing rules
@pytest.mark.parametrize("answer, verdict", [
    ("Review A is more specific.\nVerdict: A", "A"),
    ("reasoning\n\nVerdict: B\n\n", "B"),
    ("Both fine.\nVerdict: tie", "tie"),
    ("Verdict: TIE", "tie"),
    ("x\n**Verdict: A**", "A"),
    ("x\n**Verdict:** B", "B"),
    ("x\nVerdict: A.", "A"),
    ("x\n**Verdict: b**.", "B"),
    ("x\nverdict: a", "A"),
    ("x\n## Verdict: Tie", "tie"),
    ("x\nFinal verdict: A", "A"),
    ("x\nVerdict: Review B", "B"),
    ("x\nVerdict: [A]", "A"),
    ("x\n> Verdict: `B`", "B"),
    ("Verdict:A", "A"),
    # unparseable -> None (the pair becomes invalid, never guessed)
    ("", None),
    ("   \n  ", None),
    (None, None),
    ("I prefer Review A.", None),
    ("Verdict: A\nBecause it is more detailed.", None),  # not on the last line
    ("x\nVerdict: A or B", None),
    ("x\nVerdict: C", None),
    ("x\nVerdict: both", None),
    ("x\nThe verdict is A", None),
    ("x\nVerdict: A B", None),
    ("x\nVerdict:", None),
])
def test_parse_verdict(answer, verdict):
    assert parse_verdict(answer) == verdict


@pytest.mark.parametrize("ab, ba, outcome", [
    ("A", "B", "win"),       # A picked in both orders
    ("B", "A", "loss"),      # B picked in both orders
    ("A", "A", "tie"),       # always the first position: position bias, no preference
    ("B", "B", "tie"),       # always the second position
    ("tie", "tie", "tie"),
    ("A", "tie", "tie"),
    ("tie", "A", "tie"),
    (None, "B", "invalid"),
    ("A", None, "invalid"),
    (None, None, "invalid"),
])
def test_combine(ab, ba, outcome):
    assert combine(ab, ba) == outcome


def test_wilson_known_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(4, 4) == pytest.approx((0.5101, 1.0), abs=1e-4)


# ----------------------------------------------------------------------------- (b) crafted server
class FakeJudge:
    """An OpenAI-style /v1/chat/completions server answering from a policy(paper_id, first_side)."""

    def __init__(self, policy, fail_first=()):
        self.policy = policy
        self.fail_first = list(fail_first)
        self.requests = 0  # every POST, failures included
        self.answered = 0  # 200 answers
        self.auth: set[str] = set()
        self.prompts: list[str] = []  # every answered prompt (concurrent calls: any order)
        self.block_after: int | None = None
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, obj):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == "/v1/chat/completions"
                with server.lock:
                    server.requests += 1
                    server.auth.add(self.headers.get("Authorization", ""))
                    fail = server.fail_first.pop(0) if server.fail_first else None
                    block = server.block_after is not None and server.answered >= server.block_after
                if fail:
                    return self._send(fail, {"error": {"message": f"crafted {fail}", "type": "x", "code": None}})
                if block:
                    server.release.wait(300)
                    return self._send(503, {"error": {"message": "blocked", "type": "x", "code": None}})
                prompt = req["messages"][-1]["content"]
                first = prompt.split("<review_a>\n", 1)[1]
                pid = re.search(r"REVIEW-A::(\S+)", prompt)
                answer = server.policy(pid.group(1) if pid else None, "A" if first.startswith("REVIEW-A") else "B")
                with server.lock:
                    server.answered += 1
                    server.prompts.append(prompt)
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": req["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def _prefers(side):  # a consistent judge: picks `side` whichever position it is in
    return lambda first: "Reasoning.\nVerdict: " + ("A" if first == side else "B")


SCENARIO = {  # paper -> answer given the side shown first
    "p0": _prefers("A"),
    "p1": lambda first: "**Verdict: A**." if first == "A" else "It is better.\nverdict: b",  # prefers A, decorated
    "p2": _prefers("B"),
    "p3": lambda first: "Verdict: A",  # position bias: always the first one
    "p4": lambda first: "Verdict: A",
    "p5": lambda first: "Equally good.\nVerdict: tie",
    "p6": lambda first: "Verdict: A" if first == "A" else "I think the first one is better.",  # unparseable
    "p7": lambda first: "Verdict: A" if first == "A" else "Verdict: tie",  # prefers A in one order only
}
EXPECTED_COUNTS = {"win": 2, "tie": 4, "loss": 1, "invalid": 1}
EXPECTED_OUTCOMES = {"p0": "win", "p1": "win", "p2": "loss", "p3": "tie", "p4": "tie", "p5": "tie",
                     "p6": "invalid", "p7": "tie"}


def _scenario_policy(pid, first):
    return SCENARIO[pid](first)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def files(tmp_path):
    ids = list(SCENARIO)
    return {
        "a": _jsonl(tmp_path / "a.jsonl", [{"paper_id": p, "review": f"REVIEW-A::{p}"} for p in ids + ["p8"]]),
        "b": _jsonl(tmp_path / "b.jsonl", [{"paper_id": p, "review": f"REVIEW-B::{p}"} for p in ids + ["p9"]]),
        "papers": _jsonl(tmp_path / "papers.jsonl", [{"paper_id": p, "text": f"PAPER {p}"} for p in ids + ["p8", "p9"]]),
        "out": tmp_path / "out",
    }


@pytest.fixture()
def server():
    s = FakeJudge(_scenario_policy)
    yield s
    s.close()


def _run(files, server, **kw):
    kw.setdefault("backoff", 0.001)
    return judge(files["a"], files["b"], files["papers"], server.url, "judge-model", files["out"],
                 api_key=SECRET, **kw)


def _check_scenario(s, out: Path):
    assert s["n"] == 8
    assert s["counts"] == EXPECTED_COUNTS
    assert (s["win"], s["tie"], s["loss"], s["invalid"]) == (2 / 8, 4 / 8, 1 / 8, 1 / 8)
    assert s["ci95"]["win"] == pytest.approx([0.0715, 0.5907], abs=1e-4)
    assert s["ci95"]["tie"] == pytest.approx([0.2152, 0.7848], abs=1e-4)
    assert s["ci95"]["loss"] == pytest.approx([0.0224, 0.4709], abs=1e-4)
    assert s["missing"] == {"in_a_not_b": ["p8"], "in_b_not_a": ["p9"], "no_paper_text": []}
    on_disk = json.loads((out / "summary.json").read_text())
    assert {k: on_disk[k] for k in ("n", "win", "tie", "loss", "invalid", "counts")} == \
        {k: s[k] for k in ("n", "win", "tie", "loss", "invalid", "counts")}
    verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
    assert {v["paper_id"]: v["outcome"] for v in verdicts} == EXPECTED_OUTCOMES
    p6 = next(v for v in verdicts if v["paper_id"] == "p6")
    assert p6["answer_b_first"] == "I think the first one is better." and p6["verdict_b_first"] is None
    assert p6["verdict_a_first"] == "A"
    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in out.iterdir():  # the key is sent, never written
        assert SECRET not in f.read_text(errors="replace")


def test_scenario_with_retries_then_cache(files, server):
    server.fail_first = [429, 500, 429, 502]
    s = _run(files, server, concurrency=4, max_retries=5)
    _check_scenario(s, files["out"])
    assert server.answered == 16 and server.requests == 16 + 4  # every failure was retried
    assert server.auth == {f"Bearer {SECRET}"}
    assert s["calls"] == {"total": 16, "asked_now": 16, "from_cache": 0}
    assert len((files["out"] / "cache.jsonl").read_text().splitlines()) == 16

    s2 = _run(files, server)  # a second run asks nothing
    assert server.answered == 16 and server.requests == 20
    assert s2["calls"] == {"total": 16, "asked_now": 0, "from_cache": 16}
    _check_scenario(s2, files["out"])


def test_position_bias_alone_gives_all_ties(files):
    s = FakeJudge(lambda pid, first: "Verdict: A")
    try:
        summary = _run(files, s)
    finally:
        s.close()
    assert summary["counts"] == {"win": 0, "tie": 8, "loss": 0, "invalid": 0}
    assert summary["tie"] == 1.0 and summary["first_position_pick_rate"] == 1.0


def test_gives_up_after_max_retries(files, server):
    server.fail_first = [500] * 100
    with pytest.raises(UserError, match=r"gave up after 3 attempts, last error: HTTP 500.*0 of 16 answers"):
        _run(files, server, concurrency=1, max_retries=2)
    assert server.requests == 3 and server.answered == 0
    assert not (files["out"] / "summary.json").exists()


def test_unauthorized_fails_at_once(files, server):
    server.fail_first = [401]
    with pytest.raises(UserError, match=r"HTTP 401.*OPENAI_API_KEY"):
        _run(files, server, concurrency=1)
    assert server.requests == 1


def test_killed_run_resumes_with_only_the_rest(files, server, capsys, monkeypatch):
    """SIGKILL the CLI after 5 answers; the re-run asks exactly the 11 calls that were not answered."""
    server.block_after = 5
    argv = ["judge", "--a", str(files["a"]), "--b", str(files["b"]), "--papers", str(files["papers"]),
            "--base-url", server.url, "--model", "judge-model", "--out", str(files["out"]),
            "--concurrency", "1", "--backoff", "0.001"]
    proc = subprocess.Popen([str(VENV_BIN / "llamafactory-ext"), *argv], env=cli_env(OPENAI_API_KEY=SECRET),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cache = files["out"] / "cache.jsonl"
    deadline = time.monotonic() + 300
    while not (server.requests >= 6 and cache.exists() and len(cache.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the judge never reached the blocked 6th call"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with server.lock:
        server.block_after = None
        server.release.set()
        server.requests = server.answered = 0
    assert len(cache.read_text().splitlines()) == 5
    assert not (files["out"] / "summary.json").exists()

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert cli.main(argv) == 0
    assert server.answered == 11 and server.requests == 11
    printed = capsys.readouterr()
    assert "win" in printed.out and "a vs b" in printed.out and SECRET not in printed.out + printed.err
    _check_scenario(json.loads((files["out"] / "summary.json").read_text()), files["out"])


def test_default_b_is_the_gpt4o_slice_and_raw_reviews_render(tmp_path, sample_jsonl, capsys):
    rows = [json.loads(x) for x in sample_jsonl.read_text(encoding="utf-8").split("\n") if x.strip()][:3]
    a = _jsonl(tmp_path / "mine" / "reviews.jsonl",
               [{"paper_id": r["paper_id"], "review": f"REVIEW-A::{r['paper_id']}"} for r in rows])
    s = FakeJudge(lambda pid, first: "Verdict: A")  # position-biased: always the first shown
    try:
        rc = cli.main(["judge", "--a", str(a), "--papers", str(sample_jsonl), "--base-url", s.url,
                       "--model", "m", "--out", str(tmp_path / "o1"), "--limit", "2", "--max-paper-chars", "500"])
        assert rc == 0
        summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
        assert summary["n"] == 2 and summary["b"].endswith("data/sample/gpt4o_reviews.jsonl")
        assert summary["a_name"] == "mine" and summary["b_name"] == "gpt4o_reviews"
        assert len(summary["missing"]["in_b_not_a"]) == 33  # the other 33 sample papers
        gpt4o = {r["paper_id"]: r["output"] for r in rows}
        assert any(gpt4o[rows[1]["paper_id"]] in p for p in s.prompts)
        assert all("[... the rest of the paper is truncated ...]" in p for p in s.prompts)
        out = capsys.readouterr().out
        assert "mine vs gpt4o_reviews" in out and re.search(r"tie\s+2\s+100\.0%", out)

        # GPT-4o's structured reviews are accepted as B directly, rendered in the four-criteria layout
        rc = cli.main(["judge", "--a", str(a), "--b", str(ROOT / "data/sample/gpt4o_reviews_raw.jsonl"),
                       "--papers", str(sample_jsonl), "--base-url", s.url, "--model", "m",
                       "--out", str(tmp_path / "o2"), "--limit", "1"])
        assert rc == 0 and gpt4o[rows[0]["paper_id"]] in s.prompts[-1]  # one pair: the last two calls
    finally:
        s.close()


@pytest.mark.parametrize("case, message", [
    ("dup", "a.jsonl:2: duplicate paper_id 'p0' (first at line 1)"),
    ("disjoint", "no paper_id is in all of"),
    ("nofield", "papers.jsonl:1: no 'text' or 'input' field"),
    ("nokey", "no API key: set OPENAI_API_KEY"),
])
def test_input_errors(files, capsys, monkeypatch, case, message):
    base = "http://127.0.0.1:9/v1"
    if case == "dup":
        _jsonl(files["a"], [{"paper_id": "p0", "review": "x"}, {"paper_id": "p0", "review": "y"}])
    elif case == "disjoint":
        _jsonl(files["a"], [{"paper_id": "zz", "review": "x"}])
    elif case == "nofield":
        _jsonl(files["papers"], [{"paper_id": "p0", "body": "x"}])
    elif case == "nokey":
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        base = "https://judge.example.com/v1"
    rc = cli.main(["judge", "--a", str(files["a"]), "--b", str(files["b"]), "--papers", str(files["papers"]),
                   "--base-url", base, "--model", "m", "--out", str(files["out"]), "--max-retries", "0"])
    assert rc == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- (c) llamafactory-cli api
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_llamafactory_api_serving_the_tiny_model(tmp_path, tiny_models, sample_jsonl):
    port = _free_port()
    cfg = tmp_path / "api.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_models["mistral"]), "template": "mistral",
                                   "infer_backend": "huggingface"}))
    log = (tmp_path / "api.log").open("w")
    proc = subprocess.Popen([str(VENV_BIN / "llamafactory-cli"), "api", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=cli_env(API_PORT=str(port), API_HOST="127.0.0.1", API_VERBOSE="0"))
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "llamafactory-cli api did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)

        rows = [json.loads(x) for x in sample_jsonl.read_text(encoding="utf-8").split("\n") if x.strip()][:3]
        a = _jsonl(tmp_path / "a.jsonl", [{"paper_id": r["paper_id"], "review": r["output"][:400]} for r in rows])
        out = tmp_path / "judge"
        kw = dict(api_key="unused", concurrency=2, max_paper_chars=300, max_tokens=8, backoff=0.01)
        s = judge(a, ROOT / "data/sample/gpt4o_reviews.jsonl", sample_jsonl, f"http://127.0.0.1:{port}/v1",
                  "tiny", out, **kw)
        assert s["n"] == 3 and sum(s["counts"].values()) == 3
        assert s["calls"] == {"total": 6, "asked_now": 6, "from_cache": 0}
        verdicts = [json.loads(x) for x in (out / "verdicts.jsonl").read_text().splitlines()]
        assert [v["paper_id"] for v in verdicts] == [r["paper_id"] for r in rows]
        for v in verdicts:  # the tiny model's answers are noise: whatever they are, they were parsed by the rules
            assert isinstance(v["answer_a_first"], str) and isinstance(v["answer_b_first"], str)
            assert v["verdict_a_first"] == parse_verdict(v["answer_a_first"])
            assert v["outcome"] == combine(v["verdict_a_first"], v["verdict_b_first"])
        assert len((out / "cache.jsonl").read_text().splitlines()) == 6
        again = judge(a, ROOT / "data/sample/gpt4o_reviews.jsonl", sample_jsonl, f"http://127.0.0.1:{port}/v1",
                      "tiny", out, **kw)
        assert again["calls"]["asked_now"] == 0 and again["counts"] == s["counts"]
    finally:
        import os
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
