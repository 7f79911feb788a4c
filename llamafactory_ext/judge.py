"""Position-safe pairwise judge: which of two reviews of the same paper is better, per an LLM.

A and B are JSONL files with `paper_id` and `review` (B may also be GPT-4o's structured reviews,
rendered on the fly in the four-criteria layout); papers are JSONL with `paper_id` and `text` (or
`input`, as in data/sample/paper_review.jsonl). Pairs are matched on paper_id; ids missing on one
side are reported. Any OpenAI-compatible chat endpoint works; the key comes from OPENAI_API_KEY or
the variable named by --api-key-env and is never printed or written (a local server needs none).

Every pair is judged twice, with the reviews' positions swapped. The judge ends its answer with
`Verdict: A`, `Verdict: B` or `Verdict: tie` (A = the review shown first). A side wins the pair
only if both orders pick it; otherwise the pair is a tie. An answer whose last non-empty line is
not such a verdict makes the pair `invalid`: counted and reported, never guessed.

Output in --out: summary.json (n; win/tie/loss/invalid rates of A against B over all pairs, counts,
95% Wilson intervals), verdicts.jsonl (per paper: both raw answers, both verdicts, the outcome),
winrate.png, and cache.jsonl: every answered call, keyed by a hash of the model, the messages and
the generation settings, so re-running the same command after a crash asks only what is missing.

    llamafactory-ext judge --a runs/tiny_sample/predict/temp_0.35/reviews.jsonl \\
        --papers data/sample/paper_review.jsonl --base-url http://127.0.0.1:8000/v1 --model gpt-4o \\
        --out runs/tiny_sample/judge_vs_gpt4o
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlparse

from llamafactory_ext import UserError
from llamafactory_ext.fileio import atomic_write, atomic_write_text, read_jsonl

DEFAULT_B = Path(__file__).resolve().parent.parent / "data" / "sample" / "gpt4o_reviews.jsonl"
OUTCOMES = ("win", "tie", "loss", "invalid")
RETRY_STATUS = {408, 409, 429}  # plus every 5xx

SYSTEM_PROMPT = (
    "You are an experienced area chair of a top machine learning conference. You compare two peer "
    "reviews of the same paper and decide which one is more useful to the authors and to the program "
    "committee."
)
USER_TEMPLATE = """Below are a paper and two reviews of it, Review A and Review B.

Decide which review is better: more accurate about what the paper actually does, more specific and \
grounded in its content, more insightful about its significance, strengths and weaknesses, and more \
actionable in its suggestions. Do not prefer a review because it is longer, because of its position, \
or because of its formatting. If they are equally good, answer tie.

<paper>
{paper}
</paper>

<review_a>
{first}
</review_a>

<review_b>
{second}
</review_b>

Explain your reasoning briefly, then end with a final line that is exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""


# ----------------------------------------------------------------------------- pure logic
def build_messages(paper: str, first: str, second: str, max_paper_chars: int | None) -> list[dict]:
    """The chat messages for one call; `first` is shown as Review A."""
    if max_paper_chars and len(paper) > max_paper_chars:
        paper = paper[:max_paper_chars].rstrip() + "\n[... the rest of the paper is truncated ...]"
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(paper=paper, first=first, second=second)}]


_VERDICT_RE = re.compile(
    r"(?:final\s+)?verdict\s*[:：=\-–]?\s*[*_`\"'\[(]*\s*(?:review\s+)?(a|b|tie)\s*[*_`\"'\])]*",
    re.IGNORECASE,
)


def parse_verdict(answer: str | None) -> str | None:
    """'A', 'B' or 'tie' from the LAST non-empty line of an answer; None if that line is no verdict.

    Tolerated: Markdown emphasis/heading/quote marks around the line or the letter, a trailing
    period or '!', any case, "Final verdict", "Review A". Not tolerated (None): a verdict that is
    not on the last line, "A or B", anything else after the letter.
    """
    if not isinstance(answer, str):
        return None
    lines = [ln.strip() for ln in answer.strip().split("\n") if ln.strip()]
    if not lines:
        return None
    line = re.sub(r"^[\s>*_`#\-]+", "", lines[-1])
    line = re.sub(r"[\s*_`.!]+$", "", line)
    m = _VERDICT_RE.fullmatch(line)
    if not m:
        return None
    v = m.group(1).lower()
    return "tie" if v == "tie" else v.upper()


def combine(verdict_ab: str | None, verdict_ba: str | None) -> str:
    """Outcome for side A from the verdict with A shown first and the one with B shown first."""
    if verdict_ab is None or verdict_ba is None:
        return "invalid"
    pick_ab = verdict_ab  # A first: "A" means side A
    pick_ba = {"A": "B", "B": "A", "tie": "tie"}[verdict_ba]  # B first: "A" means side B
    if pick_ab == pick_ba == "A":
        return "win"
    if pick_ab == pick_ba == "B":
        return "loss"
    return "tie"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def summarize(outcomes: list[str]) -> dict:
    n = len(outcomes)
    counts = {o: outcomes.count(o) for o in OUTCOMES}
    out: dict = {"n": n}
    out.update({o: counts[o] / n if n else 0.0 for o in OUTCOMES})
    out["counts"] = counts
    out["ci95"] = {o: list(wilson(counts[o], n)) for o in OUTCOMES}
    return out


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
        pid = row.get("paper_id")
        if not isinstance(pid, str) or not pid:
            raise UserError(f"{path}:{i}: field 'paper_id' must be a non-empty string")
        if pid in out:
            raise UserError(f"{path}:{i}: duplicate paper_id {pid!r} (first at line {lines[pid]})")
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
        out[pid], lines[pid] = text, i
    return out


def load_pairs(a_path: Path, b_path: Path, papers_path: Path) -> tuple[list[tuple[str, str, str, str]], dict]:
    """[(paper_id, paper, review_a, review_b)] in A's order, and the ids missing somewhere."""
    from llamafactory_ext.baseline import render_gpt4o

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


# ----------------------------------------------------------------------------- calling
class Cache:
    """Append-only JSONL of answered calls; each line is flushed to disk as soon as it is written."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, str] = {}
        self.skipped = 0
        if path.exists():
            raw = path.read_bytes()
            for line in raw.decode("utf-8", errors="replace").split("\n"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.answers[rec["key"]] = rec["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped += 1  # a line cut short by a crash: that call is asked again
            if raw and not raw.endswith(b"\n"):
                with path.open("ab") as f:
                    f.write(b"\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def put(self, key: str, answer: str) -> None:
        line = json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n"
        with self._lock:
            self.answers[key] = answer
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _retry_after(err) -> float | None:
    resp = getattr(err, "response", None)
    try:
        value = resp.headers.get("retry-after") if resp is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def ask(client, model: str, messages: list[dict], params: dict, max_retries: int, backoff: float,
        sleep=time.sleep, stop: threading.Event | None = None) -> str:
    """One chat completion, retried with exponential backoff + jitter on 429/5xx/timeouts/connection errors.

    `stop` (set when another call failed for good) ends the retries early.
    """
    import openai

    for attempt in range(max_retries + 1):
        try:
            resp = client.chat.completions.create(model=model, messages=messages, **params)
            if not resp.choices:
                return ""
            return resp.choices[0].message.content or ""
        except openai.APIStatusError as e:
            if e.status_code not in RETRY_STATUS and e.status_code < 500:
                hint = {401: " (check the key: OPENAI_API_KEY or --api-key-env)",
                        403: " (check the key's permissions)",
                        404: " (check --base-url, which usually ends in /v1, and --model)",
                        400: " (a too long prompt? lower --max-paper-chars)"}.get(e.status_code, "")
                raise UserError(f"the judge endpoint refused the request: HTTP {e.status_code}: "
                                f"{str(e)[:300]}{hint}") from None
            err = e
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            err = e
        if stop is not None and stop.is_set():
            raise RuntimeError("stopped: another judge call failed")
        if attempt == max_retries:
            kind = f"HTTP {err.status_code}" if isinstance(err, openai.APIStatusError) else type(err).__name__
            raise RuntimeError(f"gave up after {max_retries + 1} attempts, last error: {kind}: {str(err)[:200]}")
        delay = min(backoff * 2 ** attempt, 60.0) * random.uniform(0.5, 1.5)
        ra = _retry_after(err)
        sleep(min(max(delay, ra), 120.0) if ra is not None else delay)
    raise AssertionError("unreachable")


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


# ----------------------------------------------------------------------------- the run
def judge(a: Path, b: Path, papers: Path, base_url: str, model: str, out: Path, *, api_key: str,
          concurrency: int = 4, max_retries: int = 5, timeout: float = 120.0, limit: int | None = None,
          max_paper_chars: int | None = 60000, temperature: float = 0.0, max_tokens: int = 1024,
          backoff: float = 1.0, a_name: str = "A", b_name: str = "B") -> dict:
    """Judge every matched pair twice; write summary.json, verdicts.jsonl, winrate.png; return the summary."""
    import openai
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

    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out / "cache.jsonl")
    todo = {}
    for _pid, _order, key, msgs in calls:
        if key not in cache.answers:
            todo.setdefault(key, msgs)
    n_cached = len({c[2] for c in calls}) - len(todo)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)

    stop = threading.Event()  # set by the first call that fails for good: nothing new is started

    def work(key: str, msgs: list[dict]) -> None:
        if stop.is_set():
            return
        try:
            cache.put(key, ask(client, model, msgs, params, max_retries, backoff, stop=stop))
        except BaseException:
            stop.set()
            raise

    bar = tqdm(total=len(todo) + n_cached, initial=n_cached, desc="judge calls", unit="call", file=sys.stderr,
               disable=None)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    interrupted = False
    try:
        futures = {pool.submit(work, k, m) for k, m in todo.items()}
        pending = futures
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=1.0)
            bar.update(len(done))
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                wait(pending)  # calls in flight finish (and are cached) before we report
                first = [f.exception() for f in failed if "stopped:" not in str(f.exception())]
                exc = first[0] if first else failed[0].exception()
                n_done = sum(1 for k in todo if k in cache.answers)
                msg = str(exc) if isinstance(exc, UserError) else f"a judge call failed: {exc}"
                raise UserError(f"{msg}. {n_cached + n_done} of {n_cached + len(todo)} answers are saved in "
                                f"{cache.path}; re-run the same command to ask only the rest")
    except KeyboardInterrupt:
        interrupted = True  # do not wait for calls in flight; what is answered is already cached
        raise
    finally:
        # After a failed call, let the calls in flight finish so their answers are cached too.
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        bar.close()
        cache.close()

    answers = cache.answers
    by_pair = {(pid, order): answers[key] for pid, order, key, _ in calls}
    verdicts, outcomes = [], []
    for pid, *_ in pairs:
        ans_ab, ans_ba = by_pair[(pid, "ab")], by_pair[(pid, "ba")]
        v_ab, v_ba = parse_verdict(ans_ab), parse_verdict(ans_ba)
        outcome = combine(v_ab, v_ba)
        outcomes.append(outcome)
        verdicts.append({"paper_id": pid, "answer_a_first": ans_ab, "verdict_a_first": v_ab,
                         "answer_b_first": ans_ba, "verdict_b_first": v_ba, "outcome": outcome})

    summary = summarize(outcomes)
    valid = [v for v in verdicts if v["outcome"] != "invalid"]
    summary.update({
        "a": str(a), "b": str(b), "papers": str(papers), "a_name": a_name, "b_name": b_name,
        "model": model, "base_url": base_url, "temperature": temperature, "max_tokens": max_tokens,
        "max_paper_chars": max_paper_chars,
        # How often the review shown first was picked, over the valid answers: a position-bias gauge.
        "first_position_pick_rate": (sum((v["verdict_a_first"] == "A") + (v["verdict_b_first"] == "A")
                                         for v in valid) / (2 * len(valid))) if valid else None,
        "missing": missing,
        "calls": {"total": len(calls), "asked_now": len(todo), "from_cache": n_cached},
    })
    with atomic_write(out / "verdicts.jsonl", "w", encoding="utf-8") as f:
        for v in verdicts:
            f.write(json.dumps(v, ensure_ascii=False) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot(summary, out / "winrate.png")
    return summary


def format_table(s: dict) -> str:
    rows = [f"{s['a_name']} vs {s['b_name']}   judge: {s['model']}   pairs: {s['n']}",
            f"{'outcome':<8} {'count':>6} {'rate':>7}   95% CI (Wilson)"]
    for o in OUTCOMES:
        lo, hi = s["ci95"][o]
        rows.append(f"{o:<8} {s['counts'][o]:>6} {100 * s[o]:>6.1f}%   [{100 * lo:5.1f}%, {100 * hi:5.1f}%]")
    if s.get("first_position_pick_rate") is not None:
        rows.append(f"first-shown review picked in {100 * s['first_position_pick_rate']:.1f}% of valid answers")
    return "\n".join(rows)


def plot(s: dict, path: Path) -> None:
    """Bar chart of the four outcome rates with their Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [100 * s[o] for o in OUTCOMES]
    lo = [max(0.0, 100 * (s[o] - s["ci95"][o][0])) for o in OUTCOMES]  # max: float noise at 0 / n
    hi = [max(0.0, 100 * (s["ci95"][o][1] - s[o])) for o in OUTCOMES]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.bar([f"{o}\n({s['counts'][o]})" for o in OUTCOMES], rates, yerr=[lo, hi], capsize=5,
           color=["#2a9d8f", "#adb5bd", "#e76f51", "#6c757d"])
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of pairs (95% Wilson CI)")
    ax.set_title(f"{s['a_name']} vs {s['b_name']} (n={s['n']}, judge {s['model']})", fontsize=9)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def _side_name(path: Path) -> str:
    return path.parent.name if path.stem in ("reviews", "generated_predictions") else path.stem


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a", required=True, metavar="A.jsonl", help="reviews to evaluate (paper_id, review)")
    p.add_argument("--b", default=str(DEFAULT_B), metavar="B.jsonl",
                   help="reviews to compare against (default: the GPT-4o slice, data/sample/gpt4o_reviews.jsonl)")
    p.add_argument("--papers", required=True, metavar="PAPERS.jsonl", help="paper_id + text (or input)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="judge model name")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (also holds the cache)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the key (default OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="parallel requests (default 4)")
    p.add_argument("--max-retries", type=int, default=5, help="retries per call on 429/5xx/timeouts (default 5)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each retry")
    p.add_argument("--limit", type=int, help="judge only the first N pairs")
    p.add_argument("--max-paper-chars", type=int, default=60000,
                   help="cut the paper shown to the judge to N characters (default 60000; 0 = no cut)")
    p.add_argument("--temperature", type=float, default=0.0, help="judge sampling temperature (default 0)")
    p.add_argument("--max-tokens", type=int, default=1024, help="judge answer length cap (default 1024)")
    p.add_argument("--a-name", help="label of side A (default: its folder or file name)")
    p.add_argument("--b-name", help="label of side B (default: its folder or file name)")


def run(args: argparse.Namespace) -> int:
    a, b = Path(args.a), Path(args.b)
    summary = judge(
        a, b, Path(args.papers), args.base_url, args.model, Path(args.out),
        api_key=_api_key(args.api_key_env, args.base_url), concurrency=args.concurrency,
        max_retries=args.max_retries, timeout=args.timeout, limit=args.limit,
        max_paper_chars=args.max_paper_chars or None, temperature=args.temperature, max_tokens=args.max_tokens,
        backoff=args.backoff, a_name=args.a_name or _side_name(a), b_name=args.b_name or _side_name(b),
    )
    print(format_table(summary))
    print(f"wrote {Path(args.out) / 'summary.json'}, verdicts.jsonl, winrate.png", file=sys.stderr)
    return 0
