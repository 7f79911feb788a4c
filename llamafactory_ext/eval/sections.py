"""The four-criteria review layout: parse a review into its sections, and render sections back.

The reviewer models are trained on reviews laid out as

    [Significance and novelty]
    ...
    [Potential reasons for acceptance]
    - ...
    [Potential reasons for rejection]
    - ...
    [Suggestions for improvement]
    - ...

(`render_review` reproduces that byte for byte). Generated reviews drift from it: Markdown
headers (`## Potential reasons for acceptance`, `**Significance and novelty**`), the wording of
the instruction ("Importance and novelty:"), other case, numbering, the content on the header
line. `parse_sections` accepts those variants. A header is only recognised when it stands on its
own line (possibly followed by `:` and content), so prose that merely mentions "significance" is
never mistaken for one.
"""

from __future__ import annotations

import re

# Canonical key -> header used in the training data.
HEADERS: dict[str, str] = {
    "significance_and_novelty": "Significance and novelty",
    "reasons_for_acceptance": "Potential reasons for acceptance",
    "reasons_for_rejection": "Potential reasons for rejection",
    "suggestions_for_improvement": "Suggestions for improvement",
}
SECTION_KEYS: tuple[str, ...] = tuple(HEADERS)

# Header wordings accepted per section (regex fragments, matched case-insensitively, whole title).
_SIG = r"(?:significance|importance)(?:\s*(?:and|&|/)\s*novelty)?|novelty(?:\s*(?:and|&|/)\s*(?:significance|importance))?"
_ACC = r"(?:potential\s+)?reasons?\s+(?:for|to)\s+accept(?:ance|ing)?"
_REJ = r"(?:potential\s+)?reasons?\s+(?:for|to)\s+reject(?:ion|ing)?"
_SUG = r"suggestions?(?:\s+(?:for|to)\s+(?:improvements?|improve(?:\s+the\s+paper)?))?"
_ALIASES = {
    "significance_and_novelty": _SIG,
    "reasons_for_acceptance": _ACC,
    "reasons_for_rejection": _REJ,
    "suggestions_for_improvement": _SUG,
}

_DECOR = r"[\s\[\]*_`#>]*"  # brackets, bold/italic marks, code ticks, Markdown heading/quote marks
_HEADER_RE = re.compile(
    r"^\s*(?:#{1,6}\s*)?(?:>\s*)?"  # Markdown heading / quote
    r"(?:(?:\d{1,2}|[ivx]{1,4})[.)]\s+|[-*+]\s+(?=[\[*_]))?"  # "1. ", "ii) ", or a bullet before **/[
    + r"(?P<open>" + _DECOR + r")"
    + r"(?P<title>" + "|".join(f"(?P<{k}>{v})" for k, v in _ALIASES.items()) + r")"
    + r"(?P<close>" + _DECOR + r"(?:[:：]" + _DECOR + r")?)"
    + r"(?P<rest>.*)$",
    re.IGNORECASE,
)


def _match_header(line: str) -> tuple[str, str] | None:
    """(section key, content on the header line) if `line` is a section header, else None."""
    m = _HEADER_RE.match(line)
    if not m:
        return None
    rest = m.group("rest").strip()
    close = m.group("close")
    if rest and not re.search(r"[:：\]]", close):
        # Content on the header line needs a real separator ("Title:", "[Title]"), or a closing
        # emphasis followed by a capitalised sentence ("**Title** The paper ..."). Anything else
        # ("Significance of the results is ...", "**Novelty** of this work") is prose.
        if not (re.search(r"[*_]", close) and re.match(r"[A-Z0-9\-\[(]", rest)):
            return None
    if rest and re.fullmatch(r"\s*[*]\s+", m.group("open")):
        return None  # "* Significance: ..." is a bullet point inside a section
    key = next(k for k in SECTION_KEYS if m.group(k) is not None)
    rest = re.sub(r"^[\s*_]+", "", rest)  # "**Significance:** text" leaves "** text"-style residue
    return key, rest


def parse_sections(text: str) -> dict[str, str]:
    """Split a review into the four sections; a missing section is "".

    Returns the four `SECTION_KEYS` plus `has_all_sections` (all four present and non-empty).
    Text before the first header is ignored. A section that appears twice is joined (blank line).
    """
    parts: dict[str, list[str]] = {k: [] for k in SECTION_KEYS}
    current: str | None = None
    for line in (text or "").replace("\r\n", "\n").split("\n"):  # not splitlines(): U+2028 etc. are text
        hit = _match_header(line)
        if hit is not None:
            current, rest = hit
            if parts[current]:
                parts[current].append("")
            if rest:
                parts[current].append(rest)
            continue
        if current is not None:
            parts[current].append(line.rstrip())
    out: dict[str, str | bool] = {k: "\n".join(v).strip("\n").strip() for k, v in parts.items()}
    out["has_all_sections"] = all(out[k] for k in SECTION_KEYS)
    return out  # type: ignore[return-value]


def bullets(items: list[str]) -> str:
    """`- item` lines, the list style of the training reviews."""
    return "\n".join(f"- {x}" for x in items)


def render_review(sections: dict[str, str]) -> str:
    """The training layout: `[Header]\\ncontent` blocks separated by a blank line, no trailing newline."""
    return "\n\n".join(f"[{HEADERS[k]}]\n{sections.get(k, '')}" for k in SECTION_KEYS)


def render_markdown(sections: dict[str, str], title: str | None = None, raw: str | None = None) -> str:
    """A readable Markdown page: `## Header` per section; missing ones are marked, never invented.

    When no section could be found at all and `raw` is given, the raw text is appended so nothing is lost.
    """
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    for k in SECTION_KEYS:
        body = (sections.get(k) or "").strip()
        lines += [f"## {HEADERS[k]}", "", body if body else "_(section missing in the model output)_", ""]
    if raw is not None and not any((sections.get(k) or "").strip() for k in SECTION_KEYS):
        longest = max((len(m) for m in re.findall(r"`+", raw)), default=0)
        fence = "`" * max(3, longest + 1)  # a fence the raw text cannot close
        lines += ["## Raw model output", "", f"{fence}text", raw.rstrip(), fence, ""]
    return "\n".join(lines)
