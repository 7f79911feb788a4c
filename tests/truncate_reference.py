"""The reference for `truncate`: its algorithm as of commit a673eb5, written plainly on LLaMA-Factory's own
`encode_oneturn` and the tokenizer's own offsets (no shortcuts). `truncate` must write byte for byte what
this writes (tests/test_truncate.py on the sample, tests/bench_data.py on the benchmark file); it tokenizes
each record about 3 times, which is what `truncate` no longer does.

Not collected by pytest (no `test_` prefix).
"""

from __future__ import annotations

from pathlib import Path

import orjson


def lengths(tok, template, record: dict) -> tuple[int, int]:
    """(prompt, prompt + response) tokens as LLaMA-Factory encodes the alpaca record."""
    query = "\n".join(part for part in (record.get("instruction"), record.get("input")) if part)
    prompt, response = template.encode_oneturn(tok, [{"role": "user", "content": query},
                                                     {"role": "assistant", "content": record["output"]}], "", "")
    return len(prompt), len(prompt) + len(response)


def process(tok, template, record: dict, *, max_tokens: int, inference: bool = False, paper_tokens: int = 7168):
    """-> (record or None, before, after, drop reason)."""
    paper = record["input"]
    offsets = tok(paper, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def prefix(k: int) -> str:
        return paper[:offsets[k - 1][1]] if k > 0 else ""

    prompt_len, total = lengths(tok, template, record)
    if inference:
        if len(offsets) <= paper_tokens:
            return record, prompt_len, prompt_len, None
        k = paper_tokens
        while True:
            cut = prefix(k)
            over = len(tok.encode(cut, add_special_tokens=False)) - paper_tokens
            if over <= 0:
                break
            k -= over
        new = {**record, "input": cut}
        return new, prompt_len, lengths(tok, template, new)[0], None
    if total <= max_tokens:
        return record, total, total, None
    k = len(offsets) - (total - max_tokens)
    while k > 0:
        cut = prefix(k)
        if not cut.strip():
            break
        new = {**record, "input": cut}
        after = lengths(tok, template, new)[1]
        if after <= max_tokens:
            return new, total, after, None
        k -= after - max_tokens
    need = lengths(tok, template, {**record, "input": ""})[1]
    return None, total, total, (f"instruction + review + template take {need} tokens with no paper at all, "
                                f"more than --max-tokens {max_tokens} leaves for a paper")


def truncate_file(tok, template, src: Path, **kwargs) -> tuple[bytes, bytes]:
    """(OUT bytes, rejects bytes) for alpaca JSONL `src`."""
    out, rejects = [], []
    with open(src, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.isspace():
                continue
            record = orjson.loads(line)
            new, _, _, reason = process(tok, template, record, **kwargs)
            if reason is None:
                out.append(orjson.dumps(new, option=orjson.OPT_APPEND_NEWLINE))
            else:
                rejects.append(orjson.dumps({"line": lineno, "kind": "too long", "reason": reason, "record": record},
                                            option=orjson.OPT_APPEND_NEWLINE))
    return b"".join(out), b"".join(rejects)
