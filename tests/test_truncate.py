"""`llamafactory-ext truncate`: papers are cut, reviews never, and LLaMA-Factory's own template then fits.

Uses the tiny offline models' real tokenizers (and SmolLM2's real one when it is built) and LLaMA-Factory's
real templates. The output must be byte-identical to the plain algorithm (tests/truncate_reference.py),
which `truncate` reproduces at about a third of the tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import truncate_reference

from llamafactory_ext import REVIEWER_INSTRUCTION, UserError
from llamafactory_ext.cli import main
from llamafactory_ext.data.convert import convert
from llamafactory_ext.data.truncate import (
    Truncator,
    _Tokens,
    load_template,
    load_tokenizer,
    quantiles,
    truncate,
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lf(tiny_models):
    """arch -> (tokenizer, LLaMA-Factory template), loaded once."""
    out = {}
    for arch in ("mistral", "gemma"):
        tok = load_tokenizer(str(tiny_models[arch]))
        out[arch] = (tok, load_template(tok, arch))
    return out


@pytest.fixture(scope="module")
def records(sample_jsonl):
    """Eight real papers with reviews, as alpaca records, plus a short one that already fits."""
    recs = []
    for line in sample_jsonl.read_text(encoding="utf-8").split("\n")[:8]:
        r = json.loads(line)
        recs.append({"instruction": REVIEWER_INSTRUCTION, "input": r["input"], "output": r["output"][:1500],
                     "paper_id": r["paper_id"]})
    recs.append({"instruction": REVIEWER_INSTRUCTION, "input": "A short paper.", "output": "A short review.",
                 "paper_id": "short"})
    return recs


def lf_length(lf_pair, record: dict) -> tuple[int, int]:
    """(prompt, response) token counts as LLaMA-Factory's template encodes the alpaca record."""
    tok, template = lf_pair
    query = record["instruction"] + "\n" + record["input"]
    prompt, response = template.encode_oneturn(tok, [{"role": "user", "content": query},
                                                     {"role": "assistant", "content": record["output"]}])
    return len(prompt), len(response)


@pytest.mark.parametrize("arch,budget", [("mistral", 1024), ("gemma", 700)])
def test_training_mode_fits_lf_template_and_keeps_reviews(tmp_path, lf, records, tiny_models, arch, budget):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    stats = truncate(src, out, tokenizer=str(tiny_models[arch]), template=arch, max_tokens=budget)
    result = read_jsonl(out)
    assert len(result) == len(records) and stats.dropped == 0
    assert stats.cut == len(records) - 1  # every real paper is far longer than the budget; the short one is not
    for before, after in zip(records, result, strict=True):
        assert after["output"] == before["output"]  # the review is never touched
        assert after["instruction"] == before["instruction"] and after["paper_id"] == before["paper_id"]
        assert before["input"].startswith(after["input"])  # the paper is cut at its end only
        prompt, response = lf_length(lf[arch], after)
        assert prompt + response <= budget  # LLaMA-Factory's cutoff_len = budget will cut nothing
        if after["input"] != before["input"]:
            assert prompt + response >= budget - 8  # ... and the paper was not cut much more than needed
    assert result[-1] == records[-1]
    assert max(stats.after) <= budget < min(stats.before[:-1])


def test_lf_processor_does_not_cut_anything(tmp_path, lf, records, tiny_models):
    """LLaMA-Factory's own supervised preprocessing with cutoff_len = budget keeps every token."""
    from llamafactory.data.processor import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    budget = 900
    src = write_jsonl(tmp_path / "in.jsonl", records)
    truncate(src, tmp_path / "out.jsonl", tokenizer=str(tiny_models["mistral"]), template="mistral", max_tokens=budget)
    tok, template = lf["mistral"]
    data_args = DataArguments(template="mistral", cutoff_len=budget)
    proc = SupervisedDatasetProcessor(template=template, tokenizer=tok, processor=None, data_args=data_args)
    for rec in read_jsonl(tmp_path / "out.jsonl"):
        prompt = [{"role": "user", "content": rec["instruction"] + "\n" + rec["input"]}]
        response = [{"role": "assistant", "content": rec["output"]}]
        input_ids, labels = proc._encode_data_example(prompt, response, "", "", [], [], [])
        assert len(input_ids) == sum(lf_length(lf["mistral"], rec)) <= budget
        # the whole review, with its end-of-sequence token, is in the labels
        target = [t for t in labels if t != -100]
        assert tok.decode(target, skip_special_tokens=True).strip() == rec["output"].strip()
        assert target[-1] == tok.eos_token_id


def test_review_too_long_is_dropped_with_reason(tmp_path, records, tiny_models, capsys):
    long_review = dict(records[0], output=records[0]["output"] * 3, paper_id="long-review")
    src = write_jsonl(tmp_path / "in.jsonl", [records[-1], long_review])
    out = tmp_path / "out.jsonl"
    assert main(["truncate", str(src), str(out), "--tokenizer", str(tiny_models["mistral"]),
                 "--max-tokens", "512", "--no-plot"]) == 0
    assert [r["paper_id"] for r in read_jsonl(out)] == ["short"]
    rejects = read_jsonl(tmp_path / "out.jsonl.rejects.jsonl")
    assert rejects[0]["line"] == 2 and rejects[0]["record"]["paper_id"] == "long-review"
    assert "with no paper at all" in rejects[0]["reason"]
    printed = capsys.readouterr().out
    assert "1 records written, 0 with the paper cut, 1 dropped" in printed and "long-review" in printed


def test_all_dropped_is_an_error_and_writes_no_out(tmp_path, records, tiny_models):
    src = write_jsonl(tmp_path / "in.jsonl", [dict(records[0], output=records[0]["output"] * 3)])
    with pytest.raises(UserError, match="no record .* fits --max-tokens 512"):
        truncate(src, tmp_path / "out.jsonl", tokenizer=str(tiny_models["mistral"]), max_tokens=512)
    assert not (tmp_path / "out.jsonl").exists()
    assert (tmp_path / "out.jsonl.rejects.jsonl").exists()


def test_multibyte_text_cut_inside_characters_still_fits(tmp_path, lf, tiny_models):
    """Byte-level BPE splits CJK/emoji characters over several tokens; a cut between them must still
    give valid text that fits (the re-encode-and-shrink loop)."""
    paper = "深度学习论文评审 😀🎉 ünïcödé " * 400
    rec = {"instruction": REVIEWER_INSTRUCTION, "input": paper, "output": "评审 review 😀"}
    src = write_jsonl(tmp_path / "in.jsonl", [rec])
    for budget in (300, 301, 302, 303):
        out = tmp_path / f"out{budget}.jsonl"
        truncate(src, out, tokenizer=str(tiny_models["mistral"]), max_tokens=budget, plot=False)
        (after,) = read_jsonl(out)
        assert paper.startswith(after["input"]) and "\ufffd" not in after["input"]
        assert sum(lf_length(lf["mistral"], after)) <= budget


def test_inference_mode_keeps_first_paper_tokens(tmp_path, lf, records, tiny_models, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "infer.jsonl"
    assert main(["truncate", str(src), str(out), "--tokenizer", str(tiny_models["mistral"]),
                 "--inference", "--paper-tokens", "200"]) == 0
    tok, _ = lf["mistral"]
    for before, after in zip(records, read_jsonl(out), strict=True):
        n = len(tok.encode(after["input"], add_special_tokens=False))
        assert n <= 200
        assert before["input"].startswith(after["input"]) and after["output"] == before["output"]
        if after["input"] != before["input"]:
            assert n >= 195
    captured = capsys.readouterr()
    assert "8 with the paper cut" in captured.out and "prompt tokens" in captured.out
    assert "warning" not in captured.err
    # prompts that still exceed --max-tokens (150 < 200 paper tokens + template; not the short paper) are warned about
    assert main(["truncate", str(src), str(out), "--tokenizer", str(tiny_models["mistral"]), "--no-plot",
                 "--inference", "--paper-tokens", "200", "--max-tokens", "150"]) == 0
    assert "warning: 8 prompts are longer than --max-tokens 150" in capsys.readouterr().err


def test_cli_summary_and_histogram(tmp_path, records, tiny_models, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", records[:3])
    out = tmp_path / "cut.jsonl"
    assert main(["truncate", str(src), str(out), "--tokenizer", str(tiny_models["mistral"]),
                 "--max-tokens", "800"]) == 0
    printed = capsys.readouterr().out
    assert "3 records written, 3 with the paper cut, 0 dropped" in printed
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip().startswith(("before", "after"))}
    assert int(lines["after"][-1]) <= 800 < int(lines["before"][0])  # after max <= budget < before min
    png = tmp_path / "cut.lengths.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_workers_give_identical_output(tmp_path, records, tiny_models):
    src = write_jsonl(tmp_path / "in.jsonl", records[:4] + records[-1:])
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    a = truncate(src, one, tokenizer=str(tiny_models["mistral"]), max_tokens=700, plot=False, workers=1)
    b = truncate(src, two, tokenizer=str(tiny_models["mistral"]), max_tokens=700, plot=False, workers=2)
    assert one.read_bytes() == two.read_bytes()
    assert (a.before, a.after) == (b.before, b.after)


def test_user_errors(tmp_path, tiny_models):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "i", "input": "p", "output": "r"}])
    with pytest.raises(UserError, match="no template 'mistrall'"):
        truncate(src, tmp_path / "o.jsonl", tokenizer=str(tiny_models["mistral"]), template="mistrall")
    with pytest.raises(UserError, match="cannot load a tokenizer"):
        truncate(src, tmp_path / "o.jsonl", tokenizer=str(tmp_path / "no-model"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "i", "input": "p", "output": "r"}\n{"input": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not an alpaca record"):
        truncate(tmp_path / "bad.jsonl", tmp_path / "o.jsonl", tokenizer=str(tiny_models["mistral"]))
    assert not (tmp_path / "o.jsonl").exists()


def test_quantiles_nearest_rank():
    assert quantiles([5, 1, 3, 2, 4]) == {"min": 1, "median": 3, "p90": 5, "max": 5}
    assert quantiles(list(range(1, 101))) == {"min": 1, "median": 50, "p90": 90, "max": 100}
    assert quantiles([7]) == {"min": 7, "median": 7, "p90": 7, "max": 7}


def test_truncator_leaves_fitting_records_alone(lf):
    tok, template = lf["gemma"]
    rec = {"instruction": "Review.", "input": "Short paper.", "output": "Fine."}
    new, before, after, reason = Truncator(tok, template, max_tokens=64).process(rec)
    assert new is rec and before == after and reason is None


# ---- the same output as the plain algorithm, at a fraction of the tokenization --------------------------------
@pytest.fixture(scope="module")
def sample_alpaca(sample_jsonl, tmp_path_factory) -> Path:
    """The committed sample through convert (what `make data` truncates)."""
    out = tmp_path_factory.mktemp("sample") / "alpaca.jsonl"
    convert(sample_jsonl, out)
    return out


@pytest.fixture(scope="module")
def sample_part(sample_alpaca) -> Path:
    """Its first 10 papers, plus a record whose review alone is too long for 1024 tokens."""
    records = read_jsonl(sample_alpaca)[:10]
    records.append(dict(records[0], output=records[0]["output"] * 4, paper_id="long-review"))
    return write_jsonl(sample_alpaca.with_name("part.jsonl"), records)


@pytest.mark.parametrize("arch,kwargs,part", [
    ("mistral", {"max_tokens": 12288}, False), ("mistral", {"max_tokens": 1024}, True),
    ("gemma", {"max_tokens": 4096}, True), ("gemma", {"inference": True, "paper_tokens": 500}, True),
], ids=["mistral-12288-sample", "mistral-1024", "gemma-4096", "gemma-inference-500"])
def test_output_is_byte_identical_to_the_plain_algorithm(tmp_path, lf, tiny_models, sample_alpaca, sample_part,
                                                         arch, kwargs, part):
    src = sample_part if part else sample_alpaca
    out = tmp_path / "out.jsonl"
    stats = truncate(src, out, tokenizer=str(tiny_models[arch]), template=arch, plot=False, **kwargs)
    ref_kwargs = {"max_tokens": 12288, **kwargs}
    want_out, want_rejects = truncate_reference.truncate_file(*lf[arch], src, **ref_kwargs)
    assert out.read_bytes() == want_out
    rejects = tmp_path / "out.jsonl.rejects.jsonl"
    assert (rejects.read_bytes() if rejects.exists() else b"") == want_rejects
    assert stats.cut >= 10 and stats.recounts == 0  # the cuts were counted from windows, none re-encoded whole
    assert stats.dropped == (1 if kwargs.get("max_tokens") == 1024 else 0)


def test_smollm2_tokenizer_matches_the_plain_algorithm(tmp_path, sample_part, smollm2_model):
    """A real 49K-vocabulary tokenizer (GPT-2 style pre-tokenizer, ChatML template with a system prompt)."""
    model = str(smollm2_model)
    tok = load_tokenizer(model)
    template = load_template(tok, "smollm2")
    for kwargs in ({"max_tokens": 4096}, {"max_tokens": 640}, {"inference": True, "paper_tokens": 256}):
        out = tmp_path / "out.jsonl"
        stats = truncate(sample_part, out, tokenizer=model, template="smollm2", plot=False, **kwargs)
        want_out, _ = truncate_reference.truncate_file(tok, template, sample_part, **{"max_tokens": 12288, **kwargs})
        assert out.read_bytes() == want_out, kwargs
        assert stats.cut >= 10 and stats.recounts == 0


def test_paper_the_template_rewrites_takes_the_plain_path(tmp_path, tiny_models):
    """LLaMA-Factory's base Template replaces a literal `{{idx}}` in the user's text (smollm2's template does):
    what it trains on is not the paper as written, so the cut is measured the plain way, still exactly."""
    tok = load_tokenizer(str(tiny_models["mistral"]))
    template = load_template(tok, "smollm2")
    paper = "We index layers by {{idx}} below. " + "The method and its results are described here. " * 300
    rec = {"instruction": REVIEWER_INSTRUCTION, "input": paper, "output": "A fair review."}
    truncator = Truncator(tok, template, max_tokens=700)
    assert not any(paper in text for text in truncator.layout(rec)[2])  # LLaMA-Factory changed the text
    src = write_jsonl(tmp_path / "in.jsonl", [rec])
    truncate(src, tmp_path / "out.jsonl", tokenizer=str(tiny_models["mistral"]), template="smollm2", max_tokens=700,
             plot=False)
    want, _ = truncate_reference.truncate_file(tok, template, src, max_tokens=700)
    assert (tmp_path / "out.jsonl").read_bytes() == want and "{{idx}}" in read_jsonl(tmp_path / "out.jsonl")[0]["input"]


def test_cut_text_is_recounted_whole_when_the_window_does_not_agree(lf):
    """The window count of a cut text is only trusted when the re-encoded window falls in step with the known
    tokens; known tokens of another text never do, and the whole text is encoded instead."""
    tok, template = lf["mistral"]
    truncator = Truncator(tok, template, max_tokens=1024)
    text = "Deep networks generalise when trained with noise; we show why. " * 60
    full = len(tok.encode(text, add_special_tokens=False))
    enc = truncator._encode([text + " and more text after the cut"])[0]
    assert truncator._count_cut(_Tokens.of(enc), full - 5, text) == full and truncator.recounts == 0
    other = truncator._encode(["Completely different words: " + "graph kernels, spectra and cliques. " * 200])[0]
    assert truncator._count_cut(_Tokens.of(other), full - 5, text) == full and truncator.recounts == 1


# ---- outputs are checked before any work -----------------------------------------------------------------------
def test_unwritable_outputs_fail_before_loading_anything(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "i", "input": "p", "output": "r"}])
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    # the tokenizer does not exist: an error about OUT proves OUT was checked before any work
    with pytest.raises(UserError, match=r"OUT .*folder is a folder; give a file path"):
        truncate(src, tmp_path / "folder", tokenizer=str(tmp_path / "no-model"))
    with pytest.raises(UserError, match=r"cannot write OUT .*file/out.jsonl: .*file is a file, not a folder"):
        truncate(src, tmp_path / "file" / "out.jsonl", tokenizer=str(tmp_path / "no-model"))
    assert main(["truncate", str(src), str(tmp_path / "folder"), "--tokenizer", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OUT ") and err.count("\n") == 1
