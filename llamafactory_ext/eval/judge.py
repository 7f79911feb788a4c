"""Position-safe pairwise judge over an OpenAI-compatible chat API: transport, cache and the run.

The protocol (prompt, the both-orders rule, verdict parsing, statistics) is `llamafactory_ext.eval.judging`,
pure and tested on its own. This module reads the inputs, asks the judge, keeps the answers and writes
the results.

A and B are JSONL files with `paper_id` and `review` (B may also be GPT-4o's structured reviews,
rendered on the fly in the four-criteria layout); papers are JSONL with `paper_id` and `text` (or
`input`, as in data/sample/paper_review.jsonl). Pairs are matched on paper_id; ids missing on one
side are reported. Any OpenAI-compatible chat endpoint works; the key comes from OPENAI_API_KEY or
the variable named by --api-key-env and is never printed or written (a local server needs none).

Transport: the openai client's own retries (--max-retries; backoff 0.5 s doubling up to 8 s, with
jitter; a server's Retry-After / retry-after-ms up to 120 s is obeyed) on timeouts, connection errors,
HTTP 408/409/429 and 5xx. An HTTP 200 whose body is not a chat completion (not JSON, or no `choices`
list) is retried the same way; if it persists the run stops, naming the endpoint and showing the start
of the body. Other 4xx stop the run at once with a hint.

Output in --out: summary.json (n; win/tie/loss/invalid rates of A against B with 95% Wilson
intervals; the headline win rate over valid pairs, (win + tie/2) / valid, with its interval; an exact
sign test on the decisive pairs), verdicts.jsonl (per paper: both raw answers, both verdicts, the
outcome), winrate.png, and two append-only answer files keyed by a hash of the endpoint, the model,
the messages and the generation settings:
  cache.jsonl    answers that carry a verdict; every re-run reuses them (after a crash it asks only
                 what is missing);
  invalid.jsonl  answers without one (no choices, empty content, no verdict line), with the reason.
                 They never enter the cache: a re-run reports them again without asking (same request,
                 same judge), `--retry-invalid` asks them again.

    llamafactory-ext judge --a runs/tiny_sample/predict/temp_0.35/reviews.jsonl \\
        --papers data/sample/paper_review.jsonl --base-url http://127.0.0.1:8000/v1 --model gpt-4o \\
        --out runs/tiny_sample/judge_vs_gpt4o
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlparse

from llamafactory_ext import UserError
from llamafactory_ext.eval.judging import (
    OUTCOMES,
    build_messages,
    combine,
    parse_verdict,
    summarize,
    why_invalid,
)
from llamafactory_ext.fileio import atomic_write, atomic_write_text, read_jsonl, unique_paper_id

RETRYABLE = {408, 409, 429}  # plus every 5xx: what the openai client retries
MALFORMED = "x-llamafactory-ext-malformed-200"  # header of the stand-in for a 200 that is no chat completion


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------- inputs
def _read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    rows = read_jsonl(path, what)
    if not rows:
        raise UserError(f"{what} {path}: the file is empty")
    return rows


def _by_id(path: Path, what: str, fields: tuple[str, ...], render=None) -> dict[str, str]:
    """paper_id -> text of the first of `fields` present; duplicates and non-strings are errors."""
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    for i, row in _read_jsonl(path, what):
        pid = unique_paper_id(path, i, row, lines)
        field = next((f for f in fields if f in row), None)
        if field is None and render is not None and "summary" in row:
            try:
                text = render(row)
            except (KeyError, TypeError) as e:
                raise UserError(f"{path}:{i}: structured review lacks/garbles field {e}") from None
        elif field is None:
            raise UserError(f"{path}:{i}: no {' or '.join(repr(f) for f in fields)} field")
        else:
            text = row[field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{i}: field {field!r} must be a string")
        out[pid] = text
    return out


def load_pairs(a_path: Path, b_path: Path, papers_path: Path) -> tuple[list[tuple[str, str, str, str]], dict]:
    """[(paper_id, paper, review_a, review_b)] in A's order, and the ids missing somewhere."""
    from llamafactory_ext.eval.baseline import render_gpt4o

    a = _by_id(a_path, "--a", ("review",))
    b = _by_id(b_path, "--b", ("review",), render=render_gpt4o)
    papers = _by_id(papers_path, "--papers", ("text", "input"))
    missing = {
        "in_a_not_b": [p for p in a if p not in b],
        "in_b_not_a": [p for p in b if p not in a],
        "no_paper_text": [p for p in a if p in b and p not in papers],
    }
    pairs = [(p, papers[p], a[p], b[p]) for p in a if p in b and p in papers]
    return pairs, missing


# ----------------------------------------------------------------------------- transport
def _malformed(body: bytes) -> str | None:
    """None if an HTTP 200 body is a chat completion (a JSON object with a `choices` list), else why not."""
    try:
        data = json.loads(body)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return "a body that is not JSON"
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return "JSON that is not a chat completion (no 'choices' list)"
    return None


def _start(body: bytes, n: int = 200) -> str:
    text = body.decode("utf-8", errors="replace")
    return repr(text[:n]) + (" ..." if len(text) > n else "")


def make_client(base_url: str, api_key: str, timeout: float, max_retries: int):
    """An openai client whose retries also cover an HTTP 200 that is not a chat completion.

    The openai client parses a 200 after its retry loop, so a malformed one would end the call at once
    (a bare JSONDecodeError, or a str where a completion was expected). Its HTTP client hands such a
    response on as a 502 with `x-should-retry: true` (and the server's Retry-After, if any) whose error
    message names the endpoint and shows the start of the body: retried like any server error.
    """
    import httpx2  # openai's own HTTP library (openai is pinned, so is this)
    import openai

    class CheckedHttpClient(openai.DefaultHttpxClient):
        def send(self, request, **kwargs):
            response = super().send(request, **kwargs)
            if response.status_code != 200:
                return response
            body = response.read()
            problem = _malformed(body)
            if problem is None:
                return response
            response.close()
            headers = {k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "retry-after-ms")}
            headers.update({"x-should-retry": "true", MALFORMED: "1"})
            message = f"{request.url} answered HTTP 200 with {problem}: {_start(body)}"
            return httpx2.Response(502, headers=headers, request=request, json={"error": {"message": message}})

    return openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                         http_client=CheckedHttpClient(timeout=timeout))


def ask(client, model: str, messages: list[dict], params: dict) -> tuple[str, str | None]:
    """One chat completion (the client retries): (answer, None), or (answer, why it has no verdict)."""
    import openai

    try:
        resp = client.chat.completions.create(model=model, messages=messages, **params)
    except openai.APIError as e:
        raise _failure(e) from None
    if not resp.choices:
        return "", "the response had no choices"
    content = getattr(getattr(resp.choices[0], "message", None), "content", None)
    text = content if isinstance(content, str) else ""
    if not text.strip():
        return text, f"empty content (finish_reason {getattr(resp.choices[0], 'finish_reason', None)!r})"
    return text, why_invalid(text)


def _failure(err) -> Exception:
    """The openai client's final error as a message that names the endpoint and the number of attempts."""
    import openai

    url = err.request.url
    try:  # the openai client numbers each attempt in this header; this is the last one
        attempts = 1 + int(err.request.headers.get("x-stainless-retry-count", "0"))
    except ValueError:
        attempts = 1
    tried = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}"
    if isinstance(err, openai.APIStatusError):
        if err.response.headers.get(MALFORMED):
            return RuntimeError(f"{tried}: {err.response.json()['error']['message']}")
        code = err.status_code
        if code in RETRYABLE or code >= 500:
            hint = " (rate limited: lower --concurrency or try later)" if code == 429 else ""
            return RuntimeError(f"{tried}, last error: HTTP {code} from {url}: {str(err)[:300]}{hint}")
        hint = {401: " (check the key: OPENAI_API_KEY or --api-key-env)",
                403: " (check the key's permissions)",
                404: " (check --base-url, which usually ends in /v1, and --model)",
                400: " (a too long prompt? lower --max-paper-chars)"}.get(code, "")
        return UserError(f"the judge endpoint {url} refused the request: HTTP {code}: {str(err)[:300]}{hint}")
    if isinstance(err, openai.APITimeoutError):
        return RuntimeError(f"{tried}: {url} did not answer within --timeout")
    cause = err.__cause__ or err
    return RuntimeError(f"{tried}: cannot reach {url}: {type(cause).__name__}: {str(cause)[:200]}")


def _api_key(env_var: str | None, base_url: str) -> str:
    var = env_var or "OPENAI_API_KEY"
    key = os.environ.get(var)
    if key:
        return key
    if env_var:
        raise UserError(f"--api-key-env {env_var}: that environment variable is not set")
    if urlparse(base_url).hostname in ("127.0.0.1", "localhost", "::1"):
        return "no-key-needed-for-a-local-server"
    raise UserError("no API key: set OPENAI_API_KEY (or name another variable with --api-key-env)")


# ----------------------------------------------------------------------------- cache
class Cache:
    """cache.jsonl (answers with a verdict) and invalid.jsonl (answers without one, with the reason).

    Both are append-only; each line is flushed and fsynced as it is written. A line cut short by a
    crash is skipped (that call is asked again). A cache.jsonl line without a verdict (written by an
    older version, which cached empty answers) counts as an invalid answer, not as a cached one.
    """

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.valid: dict[str, str] = {}
        self.invalid: dict[str, tuple[str, str]] = {}  # key -> (answer, reason)
        self.skipped = 0
        for rec in self._load(folder / "invalid.jsonl"):
            self.invalid[rec["key"]] = (rec["answer"], str(rec.get("reason") or why_invalid(rec["answer"])))
        for rec in self._load(folder / "cache.jsonl"):
            reason = why_invalid(rec["answer"])
            if reason is None:
                self.valid[rec["key"]] = rec["answer"]
                self.invalid.pop(rec["key"], None)
            elif rec["key"] not in self.valid:
                self.invalid.setdefault(rec["key"], (rec["answer"], reason))
        self._files = {name: (folder / name).open("a", encoding="utf-8") for name in ("cache.jsonl", "invalid.jsonl")}
        self._lock = threading.Lock()

    def _load(self, path: Path) -> list[dict]:
        if not path.exists():
            return []
        raw = path.read_bytes()
        out = []
        for line in raw.decode("utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if isinstance(rec["key"], str) and isinstance(rec["answer"], str):
                    out.append(rec)
                    continue
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
            self.skipped += 1
        if raw and not raw.endswith(b"\n"):
            with path.open("ab") as f:
                f.write(b"\n")
        return out

    def put(self, key: str, answer: str, reason: str | None) -> None:
        rec = {"key": key, "answer": answer} if reason is None else {"key": key, "answer": answer, "reason": reason}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        f = self._files["cache.jsonl" if reason is None else "invalid.jsonl"]
        with self._lock:
            if reason is None:
                self.valid[key] = answer
                self.invalid.pop(key, None)
            else:
                self.invalid[key] = (answer, reason)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def get(self, key: str) -> tuple[str, str | None]:
        return (self.valid[key], None) if key in self.valid else self.invalid[key]

    def close(self) -> None:
        for f in self._files.values():
            f.close()


# ----------------------------------------------------------------------------- the run
def judge(a: Path, b: Path, papers: Path, base_url: str, model: str, out: Path, *, api_key: str,
          concurrency: int = 4, max_retries: int = 5, timeout: float = 120.0, limit: int | None = None,
          max_paper_chars: int | None = 60000, temperature: float = 0.0, max_tokens: int = 1024,
          retry_invalid: bool = False, a_name: str = "A", b_name: str = "B") -> dict:
    """Judge every matched pair twice; write summary.json, verdicts.jsonl, winrate.png; return the summary."""
    from tqdm import tqdm

    if concurrency < 1 or max_retries < 0 or (limit is not None and limit < 1):
        raise UserError("--concurrency and --limit must be >= 1 and --max-retries >= 0")
    pairs, missing = load_pairs(a, b, papers)
    for what, ids in missing.items():
        if ids:
            print(f"warning: {len(ids)} paper_id(s) {what.replace('_', ' ')}: {', '.join(ids[:5])}"
                  f"{' ...' if len(ids) > 5 else ''}", file=sys.stderr)
    if not pairs:
        raise UserError(f"no paper_id is in all of --a {a}, --b {b} and --papers {papers}; nothing to judge")
    if limit:
        pairs = pairs[:limit]

    params = {"temperature": temperature, "max_tokens": max_tokens}
    # the endpoint is part of the cache key: the same model name on another server is another judge
    key_params = {**params, "base_url": base_url.rstrip("/")}
    calls = []  # (paper_id, order, key, messages)
    for pid, paper, ra, rb in pairs:
        for order, first, second in (("ab", ra, rb), ("ba", rb, ra)):
            msgs = build_messages(paper, first, second, max_paper_chars)
            calls.append((pid, order, cache_key(model, msgs, key_params), msgs))

    cache = Cache(out)
    todo: dict[str, list[dict]] = {}
    n_cached = n_reused = 0
    for key, msgs in {c[2]: c[3] for c in calls}.items():
        if key in cache.valid:
            n_cached += 1
        elif key in cache.invalid and not retry_invalid:
            n_reused += 1
        else:
            todo[key] = msgs
    client = make_client(base_url, api_key, timeout, max_retries)

    stop = threading.Event()  # set by the first call that fails for good: nothing new is started

    def work(key: str, msgs: list[dict]) -> None:
        if stop.is_set():
            return
        try:
            cache.put(key, *ask(client, model, msgs, params))
        except BaseException:
            stop.set()
            raise

    n_known = n_cached + n_reused
    bar = tqdm(total=len(todo) + n_known, initial=n_known, desc="judge calls", unit="call", file=sys.stderr,
               disable=None)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    interrupted = False
    try:
        pending = {pool.submit(work, k, m) for k, m in todo.items()}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=1.0)
            bar.update(len(done))
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                wait(pending)  # calls in flight finish (and are kept) before we report
                exc = failed[0].exception()
                n_done = sum(1 for k in todo if k in cache.valid or k in cache.invalid)
                msg = str(exc) if isinstance(exc, UserError) else f"a judge call failed: {exc}"
                raise UserError(f"{msg}. {n_known + n_done} of {n_known + len(todo)} answers are saved in "
                                f"{out}; re-run the same command to ask only the rest")
    except KeyboardInterrupt:
        interrupted = True  # do not wait for calls in flight; what is answered is already on disk
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        bar.close()
        cache.close()
        client.close()

    key_of = {(pid, order): key for pid, order, key, _ in calls}
    verdicts = []
    for pid, *_ in pairs:
        rec: dict = {"paper_id": pid}
        for order, side in (("ab", "a_first"), ("ba", "b_first")):
            answer, reason = cache.get(key_of[(pid, order)])
            rec.update({f"answer_{side}": answer, f"verdict_{side}": parse_verdict(answer) if reason is None else None,
                        f"invalid_reason_{side}": reason})
        rec["outcome"] = combine(rec["verdict_a_first"], rec["verdict_b_first"])
        verdicts.append(rec)
    summary = summarize([(v["verdict_a_first"], v["verdict_b_first"]) for v in verdicts])
    n_invalid_answers = sum((v["invalid_reason_a_first"] is not None) + (v["invalid_reason_b_first"] is not None)
                            for v in verdicts)
    summary.update({
        "a": str(a), "b": str(b), "papers": str(papers), "a_name": a_name, "b_name": b_name,
        "model": model, "base_url": base_url, "temperature": temperature, "max_tokens": max_tokens,
        "max_paper_chars": max_paper_chars, "missing": missing,
        "calls": {"total": len(calls), "asked_now": len(todo), "from_cache": n_cached,
                  "invalid_reused": n_reused, "invalid_answers": n_invalid_answers},
    })
    with atomic_write(out / "verdicts.jsonl", "w", encoding="utf-8") as f:
        for v in verdicts:
            f.write(json.dumps(v, ensure_ascii=False) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot(summary, out / "winrate.png")
    return summary


# ----------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def headline(s: dict) -> list[str]:
    """The win rate over valid pairs with its interval, and the sign test: two lines."""
    w, t = s["win_rate"], s["sign_test"]
    if w["value"] is None:
        rate = "win rate over valid pairs: n/a (no valid pair)"
    else:
        lo, hi = w["ci95"]
        rate = (f"win rate {s['a_name']} over {s['b_name']} (win + tie/2, {w['valid']} valid pairs): "
                f"{_pct(w['value'])}  95% CI [{_pct(lo)}, {_pct(hi)}]")
    sign = (f"sign test, {t['decisive']} decisive pairs ({t['wins']} won, {t['losses']} lost): "
            f"p = {t['p_value']:.3g} (exact, two-sided)")
    return [rate, sign]


def format_table(s: dict) -> str:
    rows = [f"{s['a_name']} vs {s['b_name']}   judge: {s['model']}   pairs: {s['n']}", *headline(s),
            f"{'outcome':<8} {'count':>6} {'rate':>7}   95% CI (Wilson)"]
    for o in OUTCOMES:
        lo, hi = s["ci95"][o]
        rows.append(f"{o:<8} {s['counts'][o]:>6} {100 * s[o]:>6.1f}%   [{100 * lo:5.1f}%, {100 * hi:5.1f}%]")
    if s.get("first_position_pick_rate") is not None:
        rows.append(f"first-shown review picked in {_pct(s['first_position_pick_rate'])} of valid answers")
    return "\n".join(rows)


def figure(s: dict):
    """Left: the four outcome rates with Wilson intervals. Right: the headline win rate and the sign test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(7.5, 3.8), dpi=120, gridspec_kw={"width_ratios": [4, 1.6]})
    rates = [100 * s[o] for o in OUTCOMES]
    lo = [max(0.0, 100 * (s[o] - s["ci95"][o][0])) for o in OUTCOMES]  # max: float noise at 0 / n
    hi = [max(0.0, 100 * (s["ci95"][o][1] - s[o])) for o in OUTCOMES]
    ax.bar([f"{o}\n({s['counts'][o]})" for o in OUTCOMES], rates, yerr=[lo, hi], capsize=5,
           color=["#2a9d8f", "#adb5bd", "#e76f51", "#6c757d"])
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of pairs (95% Wilson CI)")
    ax.set_title(f"{s['a_name']} vs {s['b_name']} (n={s['n']}, judge {s['model']})", fontsize=9)

    w, t = s["win_rate"], s["sign_test"]
    hx.axhline(50, color="#6c757d", linestyle="--", linewidth=1)
    hx.set_ylim(0, 100)
    hx.set_xlim(-0.8, 0.8)
    if w["value"] is not None:
        v, (wlo, whi) = 100 * w["value"], w["ci95"]
        hx.bar([0], [v], yerr=[[max(0.0, v - 100 * wlo)], [max(0.0, 100 * whi - v)]], capsize=5, color="#264653")
        label = f"win rate {v:.1f}%\n[{100 * wlo:.1f}, {100 * whi:.1f}]"
    else:
        label = "win rate: n/a"
    hx.set_xticks([0], [f"{label}\n(valid pairs: {w['valid']})"])
    hx.set_title(f"(win + tie/2) / valid\nsign test p = {t['p_value']:.3g}", fontsize=9)
    fig.tight_layout()
    return fig


def plot(s: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(s)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _side_name(path: Path) -> str:
    return path.parent.name if path.stem in ("reviews", "generated_predictions") else path.stem


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", default=None, metavar="A.jsonl",
                   help="reviews to evaluate (paper_id, review); default: the run's predict/temp_<T>/reviews.jsonl")
    p.add_argument("--b", default=None, metavar="B.jsonl",
                   help="reviews to compare against (default: the GPT-4o slice, data/sample/gpt4o_reviews.jsonl)")
    p.add_argument("--papers", default=None, metavar="PAPERS.jsonl",
                   help="paper_id + text (or input); default: the run's predict/papers.jsonl")
    p.add_argument("--base-url", default=None, help="JUDGE_URL=: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="JUDGE_MODEL=: the judge model's name")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (also holds the answer cache); default: the run's judge_temp_<T>/")
    p.add_argument("--family", default=None,
                   help="MODEL=: judge the run of this family x --data (what make judge passes); without --a and "
                        "--family: the run of the default family (tiny) x --data")
    p.add_argument("--data", default="sample", help="DATA= of that run (default sample)")
    p.add_argument("--run", default=None, help="RUN=: its folder name under runs/")
    p.add_argument("--temp", default=None, help="TEMP=: which temperature's reviews (default: the family's, 0.35)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the key (default OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    p.add_argument("--max-retries", type=int, default=5,
                   help="retries per call on timeouts, connection errors, 408/409/429/5xx and malformed 200s "
                        "(the openai client's backoff, Retry-After obeyed; default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--retry-invalid", action="store_true",
                   help="ask again the calls whose previous answer had no verdict (listed in OUT/invalid.jsonl)")
    p.add_argument("--limit", type=int, help="judge only the first N pairs")
    p.add_argument("--max-paper-chars", type=int, default=60000,
                   help="cut the paper shown to the judge to N characters (default 60000; 0 = no cut)")
    p.add_argument("--temperature", type=float, default=0.0, help="judge sampling temperature (default 0)")
    p.add_argument("--max-tokens", type=int, default=1024, help="judge answer length cap (default 1024)")
    p.add_argument("--a-name", help="label of side A (default: its folder or file name)")
    p.add_argument("--b-name", help="label of side B (default: its folder or file name)")


def sides(args: argparse.Namespace) -> tuple[Path, Path, Path, Path]:
    """(A reviews, B reviews, papers, output folder): the flags, else the run of --family x --data
    (train/resolve.py) at --temp: predict/temp_<T>/reviews.jsonl, predict/papers.jsonl, judge_temp_<T>/."""
    from llamafactory_ext import project, units

    b = Path(args.b) if args.b else project.get().sample_gpt4o
    if args.family is None and args.a:
        missing = [f for f, v in (("--papers", args.papers), ("--out", args.out)) if not v]
        if missing:
            raise UserError(f"with --a, give {' and '.join(missing)} too (or --family/--data to judge a run's "
                            f"predictions)")
        return Path(args.a), b, Path(args.papers), Path(args.out)
    from llamafactory_ext import families
    from llamafactory_ext.train import resolve

    r = resolve.resolve(args.family or families.DEFAULT, args.data, args.run)
    t = units.temperature(args.temp if args.temp is not None else r.temperature)
    a = Path(args.a) if args.a else r.predict_dir(t) / "reviews.jsonl"
    if not a.is_file():
        raise UserError(f"{r.project.rel(a)} does not exist: predict first (`make predict MODEL={r.family.name} "
                        f"DATA={args.data} TEMP={t:g}`)")
    papers = Path(args.papers) if args.papers else r.predict_root / "papers.jsonl"
    return a, b, papers, Path(args.out) if args.out else r.judge_dir(t)


def run(args: argparse.Namespace) -> int:
    missing = [f"{flag} ({var}=)" for flag, var, v in (("--base-url", "JUDGE_URL", args.base_url),
                                                        ("--model", "JUDGE_MODEL", args.model)) if not v]
    if missing:
        raise UserError(f"the judge needs {' and '.join(missing)}: an OpenAI-compatible endpoint and its model, "
                        f"e.g. make judge JUDGE_URL=https://api.openai.com/v1 JUDGE_MODEL=gpt-4o")
    a, b, papers, out = sides(args)
    args.out = out
    summary = judge(
        a, b, papers, args.base_url, args.model, out,
        api_key=_api_key(args.api_key_env, args.base_url), concurrency=args.concurrency,
        max_retries=args.max_retries, timeout=args.timeout, limit=args.limit,
        max_paper_chars=args.max_paper_chars or None, temperature=args.temperature, max_tokens=args.max_tokens,
        retry_invalid=args.retry_invalid, a_name=args.a_name or _side_name(a), b_name=args.b_name or _side_name(b),
    )
    print(format_table(summary))
    n_bad = summary["calls"]["invalid_answers"]
    if n_bad:
        kept = "kept from the last run; " if summary["calls"]["invalid_reused"] else ""
        print(f"{n_bad} answer(s) had no verdict ({kept}reasons in {Path(args.out) / 'invalid.jsonl'}); "
              f"--retry-invalid asks them again", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'summary.json'}, verdicts.jsonl, winrate.png", file=sys.stderr)
    return 0
