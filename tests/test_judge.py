"""judge: verdict parsing, the position-swap rule, statistics, retries, the crash-safe cache, real servers.

A real HTTP server on 127.0.0.1, a stdlib one speaking the OpenAI chat-completions JSON with crafted answers
and crafted faults (429/5xx with Retry-After, malformed HTTP 200s, no choices, empty content). No mock of the
openai client: its own retries run; the crafted failures carry `retry-after-ms: 1`, so they are retried at once.
`llamafactory-cli api` serving the tiny model is judged by the README walkthrough (test_walkthrough.py).
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cli_env

from llamafactory_ext import UserError, cli
from llamafactory_ext.eval.judge import _by_id, figure, judge
from llamafactory_ext.eval.judging import combine, parse_verdict, sign_test, summarize, wilson

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


@pytest.mark.parametrize("k, n, interval", [  # Newcombe (1998), Stat Med 17:857, Table I, method 3 (Wilson score)
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
])
def test_wilson_textbook_examples(k, n, interval):
    assert wilson(k, n) == pytest.approx(interval, abs=1e-4)


def test_wilson_half_counts():
    # k = 3.5 of n = 7 (e.g. 2 wins + 3 ties), z^2 = 3.841459: p = 0.5, denom = 1 + 3.841459/7 = 1.548780,
    # centre = (0.5 + 3.841459/14) / denom = 0.5, half = 1.959964 * sqrt(0.25/7 + 3.841459/196) / denom
    # = 1.959964 * sqrt(0.0357143 + 0.0195993) / 1.548780 = 1.959964 * 0.2351884 / 1.548780 = 0.2976284
    assert wilson(3.5, 7) == pytest.approx((0.2024, 0.7976), abs=1e-4)


@pytest.mark.parametrize("wins, losses, p", [
    (8, 2, 112 / 1024),      # 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 * (1 + 10 + 45) / 1024 = 0.109375
    (9, 1, 22 / 1024),       # 2 * (1 + 10) / 1024 = 0.021484375
    (0, 6, 2 / 64),          # 2 * 1 / 2^6 = 0.03125
    (10, 0, 2 / 1024),       # 0.001953125
    (15, 5, 43400 / 2**20),  # 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2^20 = 0.0413895
    (5, 5, 1.0),             # 2 * 638 / 1024 > 1: capped
    (2, 1, 1.0),             # 2 * (1 + 3) / 8 = 1
    (0, 0, 1.0),             # no decisive pair: no evidence either way
])
def test_sign_test_exact_binomial(wins, losses, p):
    assert sign_test(wins, losses) == pytest.approx(p, rel=1e-12)


def test_summarize_headline_by_hand():
    # 5 wins, 1 loss, 2 ties, 1 invalid (an unparseable answer), over 9 pairs
    verdicts = [("A", "B")] * 5 + [("B", "A")] + [("tie", "tie"), ("A", "A")] + [(None, "B")]
    s = summarize(verdicts)
    assert s["n"] == 9 and s["counts"] == {"win": 5, "tie": 2, "loss": 1, "invalid": 1}
    # (5 + 2/2) / 8 valid = 0.75; Wilson(6, 8): denom = 1 + 3.841459/8 = 1.480182,
    # centre = (0.75 + 0.240091) / 1.480182 = 0.668899, half = 1.959964 * sqrt(0.1875/8 + 3.841459/256) / 1.480182
    # = 1.959964 * sqrt(0.0234375 + 0.0150057) / 1.480182 = 1.959964 * 0.196070 / 1.480182 = 0.259625
    assert s["win_rate"]["value"] == 0.75 and s["win_rate"]["valid"] == 8
    assert s["win_rate"]["ci95"] == pytest.approx([0.4093, 0.9285], abs=1e-4)
    # sign test 5 vs 1: 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64 = 0.21875
    assert s["sign_test"] == {"wins": 5, "losses": 1, "decisive": 6, "p_value": 0.21875,
                              "test": s["sign_test"]["test"]}
    # position bias gauge over the 8 valid pairs' 16 answers: "A" 5 + 1 + 0 + 2 = 8 times
    assert s["first_position_pick_rate"] == 0.5


@pytest.mark.parametrize(("rows", "message"), [
    ([{"paper_id": "a", "review": "x"}, {"paper_id": "a", "review": "y"}],
     "reviews.jsonl:2: duplicate paper_id 'a' (first at line 1)"),
    ([{"paper_id": "a", "review": "x"}, {"review": "y"}], "reviews.jsonl:2: field 'paper_id' must be a non-empty string"),
    ([{"paper_id": "a", "text": "x"}], "reviews.jsonl:1: no 'review' field"),
    ([{"paper_id": "a", "review": 3}], "reviews.jsonl:1: field 'review' must be a string"),
])
def test_a_side_file_names_the_line_of_a_bad_paper_id_or_review(tmp_path, rows, message):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=re.escape(message)):
        _by_id(path, "reviews", ("review",))


def test_summarize_without_valid_pairs():
    s = summarize([(None, "A"), ("B", None)])
    assert s["counts"]["invalid"] == 2
    assert s["win_rate"] == {"value": None, "ci95": None, "valid": 0, "definition": s["win_rate"]["definition"]}
    assert s["sign_test"]["p_value"] == 1.0 and s["first_position_pick_rate"] is None


# ----------------------------------------------------------------------------- (b) crafted server
NO_CHOICES = object()  # a policy answer: HTTP 200 with "choices": []


class FakeJudge:
    """An OpenAI-style /v1/chat/completions server answering from a policy(paper_id, first_side).

    `fail_first`: crafted responses for the first requests, each a status code (sent with
    `retry-after-ms: 1`), a (status, headers) pair, or ("raw", content_type, body) for an HTTP 200.
    A policy answer of None sends empty content (`"content": null`), NO_CHOICES sends `"choices": []`.
    """

    def __init__(self, policy, fail_first=()):
        self.policy = policy
        self.fail_first = list(fail_first)
        self.requests = 0  # every POST, failures included
        self.times: list[float] = []  # monotonic time of every POST
        self.answered = 0  # 200 answers from the policy
        self.auth: set[str] = set()
        self.prompts: list[str] = []  # every answered prompt (concurrent calls: any order)
        self.block_after: int | None = None
        self.release = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body: bytes, headers=None, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
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
                    server.times.append(time.monotonic())
                    server.auth.add(self.headers.get("Authorization", ""))
                    fail = server.fail_first.pop(0) if server.fail_first else None
                    block = server.block_after is not None and server.answered >= server.block_after
                if isinstance(fail, tuple) and fail[0] == "raw":
                    return self._send(200, fail[2], content_type=fail[1])
                if fail:
                    status, headers = fail if isinstance(fail, tuple) else (fail, {"retry-after-ms": "1"})
                    err = {"error": {"message": f"crafted {status}", "type": "x", "code": None}}
                    return self._send(status, json.dumps(err).encode(), headers)
                if block:
                    server.release.wait(300)
                    return self._send(503, b'{"error": {"message": "blocked"}}')
                prompt = req["messages"][-1]["content"]
                first = prompt.split("<review_a>\n", 1)[1]
                pid = re.search(r"REVIEW-A::(\S+)", prompt)
                answer = server.policy(pid.group(1) if pid else None, "A" if first.startswith("REVIEW-A") else "B")
                with server.lock:
                    server.answered += 1
                    server.prompts.append(prompt)
                choices = [] if answer is NO_CHOICES else [
                    {"index": 0, "finish_reason": "stop" if answer else "length",
                     "message": {"role": "assistant", "content": answer}}]
                self._send(200, json.dumps({
                    "id": "c", "object": "chat.completion", "created": 0, "model": req["model"], "choices": choices,
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode())

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
# The headline, by hand: (2 wins + 4 ties / 2) / 7 valid = 4/7 = 0.571429; Wilson(4, 7) with z^2 = 3.841459:
# denom = 1 + 3.841459/7 = 1.548780, centre = (0.571429 + 3.841459/14) / denom = 0.845819 / 1.548780 = 0.546122,
# half = 1.959964 * sqrt(0.571429 * 0.428571 / 7 + 3.841459/196) / denom = 1.959964 * 0.233634 / 1.548780 = 0.295663
EXPECTED_WIN_RATE = (4 / 7, [0.2505, 0.8418])
EXPECTED_SIGN_P = 1.0  # 2 wins vs 1 loss: 2 * (C(3,0) + C(3,1)) / 2^3 = 2 * 4 / 8 = 1
HEADLINE = "win rate a over b (win + tie/2, 7 valid pairs): 57.1%  95% CI [25.0%, 84.2%]"


def _scenario_policy(pid, first):
    return SCENARIO[pid](first)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


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
    return judge(files["a"], files["b"], files["papers"], server.url, "judge-model", files["out"],
                 api_key=SECRET, a_name="a", b_name="b", **kw)


def _check_scenario(s, out: Path):
    assert s["n"] == 8
    assert s["counts"] == EXPECTED_COUNTS
    assert (s["win"], s["tie"], s["loss"], s["invalid"]) == (2 / 8, 4 / 8, 1 / 8, 1 / 8)
    assert s["ci95"]["win"] == pytest.approx([0.0715, 0.5907], abs=1e-4)
    assert s["ci95"]["tie"] == pytest.approx([0.2152, 0.7848], abs=1e-4)
    assert s["ci95"]["loss"] == pytest.approx([0.0224, 0.4709], abs=1e-4)
    assert s["win_rate"]["value"] == pytest.approx(EXPECTED_WIN_RATE[0], abs=1e-12)
    assert s["win_rate"]["ci95"] == pytest.approx(EXPECTED_WIN_RATE[1], abs=1e-4)
    assert s["win_rate"]["valid"] == 7
    assert (s["sign_test"]["wins"], s["sign_test"]["losses"], s["sign_test"]["p_value"]) == (2, 1, EXPECTED_SIGN_P)
    assert s["missing"] == {"in_a_not_b": ["p8"], "in_b_not_a": ["p9"], "no_paper_text": []}
    on_disk = json.loads((out / "summary.json").read_text())
    keys = ("n", "win", "tie", "loss", "invalid", "counts", "win_rate", "sign_test")
    assert {k: on_disk[k] for k in keys} == {k: s[k] for k in keys}
    verdicts = _lines(out / "verdicts.jsonl")
    assert {v["paper_id"]: v["outcome"] for v in verdicts} == EXPECTED_OUTCOMES
    p6 = next(v for v in verdicts if v["paper_id"] == "p6")
    assert p6["answer_b_first"] == "I think the first one is better." and p6["verdict_b_first"] is None
    assert p6["invalid_reason_b_first"] == "no 'Verdict: A|B|tie' on the last line"
    assert p6["verdict_a_first"] == "A" and p6["invalid_reason_a_first"] is None
    # the unparseable answer is never in the cache, only in invalid.jsonl
    assert "I think the first one is better." in [r["answer"] for r in _lines(out / "invalid.jsonl")]
    cached = _lines(out / "cache.jsonl")
    assert len(cached) == 15 and all("erdict" in r["answer"] for r in cached)
    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for f in out.iterdir():  # the key is sent, never written
        assert SECRET not in f.read_text(errors="replace")


def test_scenario_with_retries_then_cache(files, server):
    server.fail_first = [429, 500, 429, 502, 503]  # 5xx and 429, then success: each retried by the openai client
    s = _run(files, server, concurrency=4, max_retries=5)
    _check_scenario(s, files["out"])
    assert server.answered == 16 and server.requests == 16 + 5  # every failure was retried
    assert server.auth == {f"Bearer {SECRET}"}
    assert s["calls"] == {"total": 16, "asked_now": 16, "from_cache": 0, "invalid_reused": 0, "invalid_answers": 1}

    s2 = _run(files, server)  # a second run asks nothing: 15 cached, the invalid one kept from the last run
    assert server.answered == 16 and server.requests == 21
    assert s2["calls"] == {"total": 16, "asked_now": 0, "from_cache": 15, "invalid_reused": 1, "invalid_answers": 1}
    _check_scenario(s2, files["out"])


def test_headline_is_in_the_plot(files, server):
    s = _run(files, server)
    texts = [t.get_text() for t in figure(s).findobj(lambda o: hasattr(o, "get_text"))]
    assert "win rate 57.1%\n[25.0, 84.2]\n(valid pairs: 7)" in texts  # the bar's label: 4/7 and its interval
    assert any("(win + tie/2) / valid" in t and "sign test p = 1" in t for t in texts)


def test_position_bias_alone_gives_all_ties(files):
    s = FakeJudge(lambda pid, first: "Verdict: A")
    try:
        summary = _run(files, s)
    finally:
        s.close()
    assert summary["counts"] == {"win": 0, "tie": 8, "loss": 0, "invalid": 0}
    assert summary["tie"] == 1.0 and summary["first_position_pick_rate"] == 1.0
    # all ties: (0 + 8/2) / 8 = 0.5; Wilson(4, 8): centre 0.5, half = 1.959964 * sqrt(0.25/8 + 3.841459/256)
    # / (1 + 3.841459/8) = 1.959964 * 0.215038 / 1.480182 = 0.284739; no decisive pair: p = 1
    assert summary["win_rate"]["value"] == 0.5
    assert summary["win_rate"]["ci95"] == pytest.approx([0.2153, 0.7847], abs=1e-4)
    assert summary["sign_test"]["decisive"] == 0 and summary["sign_test"]["p_value"] == 1.0


def test_retry_after_is_obeyed(files, server):
    """A 429 with `Retry-After: 1` (seconds): the retry waits that second (the default first backoff is <= 0.5 s)."""
    server.fail_first = [(429, {"Retry-After": "1"})]
    s = _run(files, server, concurrency=1, limit=1)
    assert s["n"] == 1 and server.requests == 3 and server.answered == 2
    assert server.times[1] - server.times[0] >= 0.95


@pytest.mark.parametrize("content_type, body", [
    ("application/json", b'{"id": "c", "choices": [{"message": {"content": "Verdict'),  # cut off
    ("text/html", b"<html><body>502 Bad Gateway (upstream hiccup)</body></html>"),
    ("application/json", b'{"error": {"message": "overloaded, try again"}}'),  # a 200 that is an error
])
def test_malformed_200_is_retried_like_a_5xx(files, server, content_type, body):
    server.fail_first = [("raw", content_type, body)] * 2
    s = _run(files, server, concurrency=2, max_retries=3)
    _check_scenario(s, files["out"])
    assert server.requests == 16 + 2 and server.answered == 16


def test_malformed_200_that_persists_fails_naming_the_server_and_the_body(files, server, capsys):
    server.fail_first = [("raw", "text/html", b"<html><body>upstream hiccup " + b"x" * 500)] * 100
    argv = ["judge", "--a", str(files["a"]), "--b", str(files["b"]), "--papers", str(files["papers"]),
            "--base-url", server.url, "--model", "m", "--out", str(files["out"]), "--concurrency", "1",
            "--max-retries", "2"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"gave up after 3 attempts: " + re.escape(server.url) + r"/chat/completions answered HTTP 200 "
                     r"with a body that is not JSON: '<html><body>upstream hiccup x+' \.\.\..*0 of 16 answers", err), err
    assert [x for x in err.splitlines() if not x.startswith("warning: 1 paper_id")] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("error: a judge call failed: gave up after 3 attempts")
    assert server.requests == 3 and server.answered == 0
    assert not (files["out"] / "summary.json").exists()


def test_empty_answers_are_never_cached_and_retry_invalid_asks_again(files, capsys, monkeypatch):
    """No choices, empty content, or no verdict: invalid, kept in invalid.jsonl (never in the cache), reported
    again by a plain re-run without asking, asked again with --retry-invalid."""
    broken = {("p0", "B"): NO_CHOICES, ("p1", "A"): None, ("p2", "B"): "   \n"}
    fixed = threading.Event()

    def policy(pid, first):
        if not fixed.is_set() and (pid, first) in broken:
            return broken[(pid, first)]
        return _scenario_policy(pid, first)

    s = FakeJudge(policy)
    argv = ["judge", "--a", str(files["a"]), "--b", str(files["b"]), "--papers", str(files["papers"]),
            "--base-url", s.url, "--model", "m", "--out", str(files["out"]), "--concurrency", "2"]
    out = files["out"]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    try:
        assert cli.main(argv) == 0
        first = json.loads((out / "summary.json").read_text())
        assert first["counts"] == {"win": 0, "tie": 4, "loss": 0, "invalid": 4}  # p0, p1, p2 broken; p6 as ever
        assert s.requests == 16
        cached = _lines(out / "cache.jsonl")
        assert len(cached) == 12 and all(r["answer"].strip() for r in cached)
        reasons = sorted(r["reason"] for r in _lines(out / "invalid.jsonl"))
        assert reasons == ["empty content (finish_reason 'length')", "empty content (finish_reason 'stop')",
                           "no 'Verdict: A|B|tie' on the last line", "the response had no choices"]
        verdicts = {v["paper_id"]: v for v in _lines(out / "verdicts.jsonl")}
        assert verdicts["p0"]["invalid_reason_b_first"] == "the response had no choices"
        assert verdicts["p0"]["answer_b_first"] == "" and verdicts["p0"]["verdict_a_first"] == "A"
        assert "4 answer(s) had no verdict" in capsys.readouterr().err

        fixed.set()  # the server is healthy now; a plain re-run still asks nothing
        assert cli.main(argv) == 0
        assert s.requests == 16
        assert json.loads((out / "summary.json").read_text())["counts"] == first["counts"]
        assert "kept from the last run" in capsys.readouterr().err

        assert cli.main([*argv, "--retry-invalid"]) == 0  # asks exactly the 4 invalid calls
        assert s.requests == 20
        again = json.loads((out / "summary.json").read_text())
        assert again["counts"] == EXPECTED_COUNTS  # only p6's genuinely unparseable answer is left
        assert again["calls"]["asked_now"] == 4 and again["calls"]["from_cache"] == 12
        assert len(_lines(out / "cache.jsonl")) == 15
        _check_scenario(again, out)
    finally:
        s.close()


def test_old_cache_with_empty_answers_is_not_trusted(files, server):
    """A cache.jsonl from before this fix held "" for an answer without choices: it counts as invalid, and
    --retry-invalid asks it again."""
    _run(files, server)  # all 16 answered; p6's unparseable answer in invalid.jsonl
    out = files["out"]
    cached = _lines(out / "cache.jsonl")
    cached[0]["answer"] = ""  # what the old version wrote for `"choices": []`
    _jsonl(out / "cache.jsonl", cached + [{"key": r["key"], "answer": r["answer"]} for r in _lines(out / "invalid.jsonl")])
    (out / "invalid.jsonl").unlink()
    s = _run(files, server)
    assert server.requests == 16 and s["counts"]["invalid"] == 2 and s["calls"]["invalid_reused"] == 2
    s = _run(files, server, retry_invalid=True)
    assert server.requests == 18 and s["calls"]["asked_now"] == 2
    assert s["counts"] == EXPECTED_COUNTS


def test_gives_up_after_max_retries(files, server):
    server.fail_first = [500] * 100
    with pytest.raises(UserError, match=r"gave up after 3 attempts, last error: HTTP 500 from "
                                        + re.escape(server.url) + r"/chat/completions: .*0 of 16 answers"):
        _run(files, server, concurrency=1, max_retries=2)
    assert server.requests == 3 and server.answered == 0
    assert not (files["out"] / "summary.json").exists()


def test_unauthorized_fails_at_once(files, server):
    server.fail_first = [401]
    with pytest.raises(UserError, match=r"HTTP 401.*OPENAI_API_KEY"):
        _run(files, server, concurrency=1)
    assert server.requests == 1


def test_unreachable_server_is_named(files):
    port = _free_port()  # nothing listens there
    with pytest.raises(UserError, match=rf"gave up after 2 attempts: cannot reach http://127.0.0.1:{port}/v1/chat/"):
        judge(files["a"], files["b"], files["papers"], f"http://127.0.0.1:{port}/v1", "m", files["out"],
              api_key=SECRET, concurrency=1, max_retries=1)


def test_killed_run_resumes_with_only_the_rest(files, server, capsys, monkeypatch):
    """SIGKILL the CLI after 5 answers; the re-run asks exactly the 11 calls that were not answered."""
    server.block_after = 5
    argv = ["judge", "--a", str(files["a"]), "--b", str(files["b"]), "--papers", str(files["papers"]),
            "--base-url", server.url, "--model", "judge-model", "--out", str(files["out"]),
            "--concurrency", "1"]
    proc = subprocess.Popen([str(VENV_BIN / "llamafactory-ext"), *argv], env=cli_env(OPENAI_API_KEY=SECRET),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = files["out"]
    deadline = time.monotonic() + 300
    while not (server.requests >= 6 and len(_lines(out / "cache.jsonl")) + len(_lines(out / "invalid.jsonl")) >= 5):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the judge never reached the blocked 6th call"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with server.lock:
        server.block_after = None
        server.release.set()
        server.requests = server.answered = 0
    assert len(_lines(out / "cache.jsonl")) + len(_lines(out / "invalid.jsonl")) == 5
    assert not (out / "summary.json").exists()

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert cli.main(argv) == 0
    assert server.answered == 11 and server.requests == 11
    printed = capsys.readouterr()
    assert "a vs b" in printed.out and SECRET not in printed.out + printed.err
    assert HEADLINE in printed.out
    assert "sign test, 3 decisive pairs (2 won, 1 lost): p = 1 (exact, two-sided)" in printed.out
    _check_scenario(json.loads((out / "summary.json").read_text()), out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
