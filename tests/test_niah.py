"""`llamafactory-ext niah` on the tiny models, on CPU: the harness must be right (answers will be noise).

Checked: every prompt has the requested length in the model's tokens (through LLaMA-Factory's chat
template, as ChatModel counts it), the needle sits at the requested depth of the haystack, and the CLI
writes the CSV and the heatmap PNG.
"""

from __future__ import annotations

import csv

import pytest

from llamafactory_ext import UserError, cli, families
from llamafactory_ext.fit import niah


def tokenizer_and_template(path, family):
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok, get_template_and_fix_tokenizer(tok, DataArguments(template=family))


@pytest.fixture(scope="module")
def chat_model(tiny_models):
    return niah.load_chat_model(str(tiny_models["mistral"]), "mistral", None, None, max_new_tokens=8)


@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_prompt_length_and_needle_depth(tiny_models, family):
    tok, template = tokenizer_and_template(tiny_models[family], family)
    lengths, depths = [64, 128, 256, 512], [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]
    builder = niah.Builder(tok, template, niah.haystack_text(), max(lengths))
    for length in lengths:
        for depth in depths:
            number = 1_000_000 + length * 10 + int(depth * 10)
            p = builder.build(length, depth, number)
            needle = niah.NEEDLE.format(number=number)
            ids = builder.encode(p.content)
            assert abs(len(ids) - length) <= max(2, 0.005 * length), (family, length, depth, len(ids))
            assert p.prompt_tokens == len(ids)
            # the needle once, the question last, both inside the rendered prompt
            assert p.content.count(needle) == 1 and p.content.endswith(niah.QUESTION)
            assert needle in tok.decode(ids)
            # independently: haystack tokens before the needle vs after it
            before = p.content[:p.content.index(needle)].strip()
            after = p.content[p.content.index(needle) + len(needle):-len(niah.QUESTION)].strip()
            n_before = len(tok(before, add_special_tokens=False)["input_ids"]) if before else 0
            n_after = len(tok(after, add_special_tokens=False)["input_ids"]) if after else 0
            context = n_before + n_after
            assert abs(n_before - depth * context) <= 3 + 0.02 * context, (family, length, depth, n_before, context)
            assert p.needle_token == n_before and p.context_tokens == context
            if depth == 0:
                assert n_before == 0
            if depth == 1:
                assert n_after == 0


def test_probe_through_the_real_chat_model(chat_model, tiny_models):
    rows = niah.run_probe(str(tiny_models["mistral"]), [64, 128], [0, 0.5, 1], chat_model=chat_model)
    assert [(r["length"], r["depth"]) for r in rows] == [(L, d) for L in (64, 128) for d in (0, 0.5, 1)]
    for r in rows:
        # prompt_tokens is what ChatModel itself fed the model
        assert abs(r["prompt_tokens"] - r["length"]) <= 2, r
        assert r["correct"] in (0, 1) and 1_000_000 <= r["number"] < 10_000_000
        assert abs(r["actual_depth"] - r["depth"]) <= 3 / max(1, r["context_tokens"]) + 0.02
    assert len({r["number"] for r in rows}) == len(rows)


def test_cli_writes_csv_and_heatmap(tiny_models, tmp_path, capsys):
    out = tmp_path / "niah"
    rc = cli.main(["niah", str(tiny_models["gemma"]), "--lengths", "64,128", "--depths", "0,0.5,1",
                   "--out", str(out), "--max-new-tokens", "4"])
    assert rc == 0
    with (out / "niah.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == niah.FIELDS
    assert {(int(r["length"]), float(r["depth"])) for r in rows} == {(L, d) for L in (64, 128) for d in (0, .5, 1)}
    png = (out / "niah.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    import matplotlib.image

    h, w = matplotlib.image.imread(out / "niah.png").shape[:2]
    assert w > 100 and h > 100
    text = capsys.readouterr().out
    assert "depth" in text and "niah.csv" in text


def test_scoring_is_exact_match_of_the_number():
    assert niah.score("The special magic number is 7463343.", 7463343)
    assert niah.score("7,463,343", 7463343)
    assert not niah.score("74633431", 7463343)
    assert not niah.score("746334", 7463343)


def test_argument_parsing():
    assert niah.parse_lengths("1k,2K,1.5k,64,1k") == [64, 1024, 1536, 2048]
    assert niah.parse_depths("1,0,0.25") == [0, 0.25, 1]
    for bad in ("abc", "8", "1m"):
        with pytest.raises(UserError, match="--lengths"):
            niah.parse_lengths(bad)
    with pytest.raises(UserError, match="between 0 and 1"):
        niah.parse_depths("0,1.5")


def test_template_guess_and_fallback_haystack(tiny_models, tmp_path):
    assert families.guess_template(str(tiny_models["gemma"])) == "gemma"
    assert families.guess_template("mistralai/Mistral-7B-Instruct-v0.2") == "mistral"
    assert families.guess_template("someone/unknown") is None
    filler = niah.fallback_filler(50)
    assert filler.count(".") == 50 and filler == niah.fallback_filler(50)
    with pytest.raises(UserError, match="not found"):
        niah.haystack_text(tmp_path / "missing.jsonl")
