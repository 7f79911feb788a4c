"""The judging protocol, pure (no I/O, no network): prompt, verdict parsing, the both-orders rule, statistics.

Every pair is judged twice, with the reviews' positions swapped. The judge ends its answer with
`Verdict: A`, `Verdict: B` or `Verdict: tie` (A = the review shown first). A side wins the pair only
if both orders pick it; otherwise the pair is a tie. An answer whose last non-empty line is not such
a verdict makes the pair `invalid`: counted and reported, never guessed.

Headline figure: the win rate of side A over the valid pairs, (win + tie/2) / valid, with a 95% Wilson
interval, and an exact two-sided sign test on the decisive pairs (wins against losses, ties left out).
Transport (HTTP, retries) and the answer cache live in `judge.py`.
"""

from __future__ import annotations

import math
import re

OUTCOMES = ("win", "tie", "loss", "invalid")
Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal: a two-sided 95% interval

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


def why_invalid(answer: str | None) -> str | None:
    """None if the answer carries a verdict, else what is wrong with it (for the record)."""
    if answer is None or not answer.strip():
        return "empty answer"
    if parse_verdict(answer) is None:
        return "no 'Verdict: A|B|tie' on the last line"
    return None


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


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default).

    k may be a half-integer (ties counted as half a win): each pair then scores 0, 1/2 or 1, whose
    variance is at most p(1 - p), so the binomial interval is, if anything, a little too wide.
    """
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial (sign) test of wins vs losses against 1/2: P(as or more lopsided).

    With p = 1/2 the distribution is symmetric, so the two-sided p is twice the smaller tail, capped at 1.
    No decisive pair at all gives 1.0.
    """
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def summarize(verdicts: list[tuple[str | None, str | None]]) -> dict:
    """Statistics of side A over pairs of (verdict with A first, verdict with B first)."""
    outcomes = [combine(ab, ba) for ab, ba in verdicts]
    n = len(outcomes)
    counts = {o: outcomes.count(o) for o in OUTCOMES}
    out: dict = {"n": n}
    out.update({o: counts[o] / n if n else 0.0 for o in OUTCOMES})
    out["counts"] = counts
    out["ci95"] = {o: list(wilson(counts[o], n)) for o in OUTCOMES}

    valid = n - counts["invalid"]
    score = counts["win"] + counts["tie"] / 2
    out["win_rate"] = {
        "value": score / valid if valid else None,
        "ci95": list(wilson(score, valid)) if valid else None,
        "valid": valid,
        "definition": "(win + tie/2) / valid pairs, 95% Wilson interval",
    }
    decisive = counts["win"] + counts["loss"]
    out["sign_test"] = {
        "wins": counts["win"], "losses": counts["loss"], "decisive": decisive,
        "p_value": sign_test(counts["win"], counts["loss"]),
        "test": "exact two-sided binomial test of wins vs losses against 1/2 (ties and invalid left out)",
    }
    # How often the review shown first was picked, over the valid pairs' answers: a position-bias gauge.
    picks = [v for ab, ba in verdicts if ab is not None and ba is not None for v in (ab, ba)]
    out["first_position_pick_rate"] = picks.count("A") / len(picks) if picks else None
    return out
