"""How numbers are written on the command line, and the one rule that names a temperature's folder.

The "k" rule, for every count the project reads (CUTOFF, PAPER_TOKENS, SIZES, niah --lengths, plan --tokens):
  - lengths in tokens: k = 1,024 (context lengths are named that way: `CUTOFF=8k` = 8,192, 12k = 12,288,
    Mistral's 32k = 32,768);
  - records, papers and totals: k = 1,000 (the seed's "5K" and "15K" datasets: `SIZES=5k` = 5,000; a total
    of training tokens, `plan --tokens 85000k`, is not a context length).
`1.5k` is allowed (1,536 tokens); the result must be a positive whole number. Every command that takes such a
value says the number it understood.

A temperature's folder is `temp_<T>` with T in its shortest form (`temp_0.5`, never `temp_0.50`): predict
writes it, judge and the demo read it, all through `temp_dir`.
"""

from __future__ import annotations

import re

from llamafactory_ext import UserError

KILO = {"tokens": 1024, "records": 1000, "papers": 1000}
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*([kK]?)")


def count(value, name: str, *, unit: str = "tokens", example: str | None = None) -> int:
    """`8192`, `8k` (tokens: 8,192; records: 8,000), `1.5k` -> a positive int, else a UserError naming `name`."""
    kilo = KILO[unit]
    text = str(value).strip()
    m = _NUMBER.fullmatch(text)
    n = 0
    if m:
        scale = kilo if m.group(2) else 1
        x = float(m.group(1)) * scale
        n = int(x) if x.is_integer() else 0
    if n < 1:
        eg = example or {"tokens": "8192 or 8k", "records": "5000 or 5k", "papers": "500"}[unit]
        raise UserError(f"{name}={value!r}: not a positive {unit[:-1]} count (e.g. {eg})")
    return n


def counts(text: str, name: str, *, unit: str) -> list[int]:
    """A comma-separated list of counts, sorted and unique ('5k,15k' -> [5000, 15000] records)."""
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise UserError(f"{name} is empty; give {unit} counts like {'5k,15k' if unit != 'tokens' else '4k,8k'}")
    return sorted({count(p, name, unit=unit) for p in items})


def temperatures(text: str) -> list[float]:
    """'0.35 0.5' or '0.35,0.5' -> [0.35, 0.5] (0 = greedy, at most 5)."""
    temps = []
    for item in re.split(r"[ ,]+", str(text).strip()):
        if not item:
            continue
        try:
            t = float(item)
        except ValueError:
            t = -1.0
        if not 0 <= t <= 5:
            raise UserError(f"TEMPS/TEMP: {item!r} is not a temperature (e.g. TEMPS=\"0.35 0.5\")")
        temps.append(t)
    if not temps:
        raise UserError("TEMPS is empty (e.g. TEMPS=\"0.35 0.5\")")
    return temps


def temp_dir(t: float, base: bool = False) -> str:
    """The folder of one temperature's predictions: `temp_0.35`, `base_temp_0.5` (never `temp_0.50`)."""
    return f"{'base_' if base else ''}temp_{float(t):g}"


_TEMP_DIR = re.compile(r"(base_)?temp_(\d+(?:\.\d+)?)")


def parse_temp_dir(name: str) -> tuple[bool, float] | None:
    """`base_temp_0.5` -> (True, 0.5), `temp_0.35` -> (False, 0.35); anything else (`temp_0.35.old`) -> None."""
    m = _TEMP_DIR.fullmatch(name)
    return (bool(m.group(1)), float(m.group(2))) if m else None


def temperature(value) -> float:
    """One temperature as given on the command line (TEMP=0.50 -> 0.5)."""
    temps = temperatures(str(value))
    if len(temps) != 1:
        raise UserError(f"TEMP={value!r}: give one temperature (TEMPS=\"0.35 0.5\" for several)")
    return temps[0]
