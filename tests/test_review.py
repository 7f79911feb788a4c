"""review: a real PDF built here, references dropped, the token budget, runs (merged or adapter-only, the
newest by default), the tiny models, clear errors. A reviewer that really writes the four sections is
checked in test_webui.py (Review tab and API) with the SmolLM2 run."""

from __future__ import annotations

import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest

from llamafactory_ext import REVIEWER_INSTRUCTION, UserError, cli
from llamafactory_ext.eval.sections import HEADERS
from llamafactory_ext.serve.papertext import drop_references, read_paper
from llamafactory_ext.serve.review import load_chat_model, resolve_model, review_paper
from llamafactory_ext.train.runs import trained_runs


def _make_pdf(text: str, path: Path) -> Path:
    """A text PDF, 60 wrapped lines per page (Helvetica: non-Latin-1 characters become '?')."""
    import pymupdf

    text = text.encode("latin-1", "replace").decode("latin-1")
    lines = [w for para in text.split("\n") for w in (textwrap.wrap(para, 95) or [""])]
    doc = pymupdf.open()
    for start in range(0, len(lines), 60):
        page = doc.new_page()
        for i, line in enumerate(lines[start:start + 60]):
            page.insert_text((40, 50 + 12 * i), line, fontsize=9)
    doc.save(path)
    return path


def make_adapter_run(base: Path, run: Path, template: str) -> Path:
    """A run folder holding only a LoRA adapter (no merged/) and the sft_args.yaml naming its base, as `run sft`
    leaves it. The LoRA weights are random and non-zero (init_lora_weights=False): the adapter changes what the
    model writes, so a review that ignored it would differ."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(run / "adapter")
    (run / "sft_args.yaml").write_text(yaml.safe_dump({
        "model_name_or_path": str(base), "template": template, "finetuning_type": "lora",
        "output_dir": str(run / "adapter")}))
    return run


@pytest.fixture(scope="module")
def paper(sample_jsonl, tmp_path_factory):
    """A real sample paper shortened to body + REFERENCES + appendix, as a PDF."""
    rows = [json.loads(x) for x in sample_jsonl.read_text(encoding="utf-8").split("\n") if x.strip()]
    t = next(r["input"] for r in rows if "\nREFERENCES\n" in r["input"] and "\nA APPENDIX\n" in r["input"])
    ref, app = t.index("\nREFERENCES\n"), t.index("\nA APPENDIX\n")
    refs = t[ref + 1:ref + 1500].rsplit("\n", 1)[0]
    appendix = t[app + 1:app + 800].rsplit("\n", 1)[0]
    text = t[:2500].rsplit("\n", 1)[0] + "\n\n" + refs + "\n\n" + appendix + "\n"
    d = tmp_path_factory.mktemp("paper")
    ref_line = next(ln for ln in refs.split("\n")[2:] if len(ln) > 40 and ln.isascii())
    app_line = next(ln for ln in appendix.split("\n")[1:] if len(ln) > 30 and ln.isascii())
    return {"pdf": _make_pdf(text, d / "paper.pdf"), "text": text, "ref_line": ref_line[:40],
            "app_line": app_line[:30], "first_line": t.split("\n")[0]}


@pytest.fixture(scope="module")
def mistral(tiny_models):
    return load_chat_model(tiny_models["mistral"], "mistral", temperature=0.35, top_p=0.7, max_new_tokens=12)


def test_pdf_text_and_references_dropped(paper):
    text = read_paper(paper["pdf"])
    assert paper["first_line"][:20] in text
    assert paper["ref_line"] in text and "REFERENCES" in text  # the PDF really holds them
    kept, info = drop_references(text)
    assert paper["ref_line"] not in kept and "REFERENCES" not in kept
    assert info["dropped_chars"] > 1000 and info["kept_appendix"] is True
    assert paper["app_line"] in kept and "A APPENDIX" in kept
    assert paper["first_line"][:20] in kept


@pytest.mark.parametrize("text, dropped, appendix", [
    ("intro\n" * 50 + "7 References\n[1] A. Author. Title.\n", True, False),
    ("intro\n" * 50 + "## Bibliography\nA. Author.\n# Appendix A: Proofs\nproof\n", True, True),
    ("intro\n" * 50 + "REFERENCES\nA. Author.\nAppendix B includes two parts: x\nmore refs\n", True, False),
    ("References\n" + "intro\n" * 50, False, False),  # a heading in the first 20% is not the references
    ("intro\n" * 50 + "as shown in the references below\n", False, False),
])
def test_drop_references_rule(text, dropped, appendix):
    kept, info = drop_references(text)
    assert (info["dropped_chars"] > 0) is dropped and info["kept_appendix"] is appendix
    if dropped:
        assert "Author" not in kept and kept.startswith("intro\n")
    if appendix:
        assert kept.endswith("# Appendix A: Proofs\nproof\n")


def test_review_pdf_with_tiny_mistral(paper, mistral, tiny_models):
    r = review_paper(paper["pdf"], tiny_models["mistral"], chat_model=mistral, max_new_tokens=12, seed=0)
    assert r["template"] == "mistral"
    assert r["query"].startswith(REVIEWER_INSTRUCTION + "\n" + paper["first_line"][:20])  # the training format
    assert paper["ref_line"] not in r["query"] and paper["app_line"] in r["query"]
    assert r["references_dropped_chars"] > 1000
    assert r["paper_tokens"] == r["paper_tokens_total"] > 0  # under the default budget: nothing cut
    assert r["markdown"].startswith("# Review of paper.pdf")
    # The tiny model is random: it writes no section. The page must say so and keep what it wrote, never
    # present the renderer's own headers as a review.
    assert isinstance(r["raw"], str) and r["raw"].strip()
    assert not any(re.search(rf"^\W*{re.escape(h)}", r["raw"], re.I | re.M) for h in HEADERS.values())
    assert r["sections"]["has_all_sections"] is False
    assert r["markdown"].count("_(section missing in the model output)_") == 4
    assert "## Raw model output" in r["markdown"] and r["raw"].rstrip() in r["markdown"]


def test_paper_is_cut_to_the_token_budget(paper, mistral, tiny_models):
    r = review_paper(paper["pdf"], tiny_models["mistral"], chat_model=mistral, max_paper_tokens=50,
                     max_new_tokens=4)
    tok = mistral.engine.tokenizer
    cut = r["query"][len(REVIEWER_INSTRUCTION) + 1:]
    assert r["paper_tokens_total"] > 50 and r["paper_tokens"] <= 50
    assert len(tok.encode(cut, add_special_tokens=False)) == r["paper_tokens"]
    assert drop_references(read_paper(paper["pdf"]))[0].startswith(cut)


def test_cli_gemma_auto_template_and_out(tmp_path, tiny_models, sample_jsonl, capsys):
    row = json.loads(sample_jsonl.read_text(encoding="utf-8").split("\n")[0])
    md = tmp_path / "paper.md"
    md.write_text(row["input"][:3000], encoding="utf-8")
    out = tmp_path / "review.md"
    assert resolve_model(tiny_models["gemma"]).template == "gemma"  # from config.json's model_type
    rc = cli.main(["review", str(md), "--model", str(tiny_models["gemma"]), "--max-new-tokens", "8",
                   "--max-paper-tokens", "200", "--seed", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert printed.out == out.read_text() and printed.out.startswith("# Review of paper.md")
    assert re.search(r"paper: 200 of [\d,]+ tokens used \(cut to the 200-token budget\).*template: gemma",
                     printed.err)


def test_runs_adapter_only_merged_and_the_newest_by_default(tmp_path, tiny_models, paper, capsys, monkeypatch):
    """No --model: the newest run. A run with only adapter/ loads its base from sft_args.yaml plus the adapter; a
    run with merged/ loads that."""
    runs = tmp_path / "runs"
    merged_run = runs / "tiny_merged"
    (merged_run / "merged").mkdir(parents=True)
    for f in tiny_models["mistral"].iterdir():
        os.symlink(f, merged_run / "merged" / f.name)
    (merged_run / "sft_args.yaml").write_text("template: mistral\n")
    adapter_run = make_adapter_run(tiny_models["mistral"], runs / "tiny_adapter", "mistral")
    later = time.time() + 60
    for f in (adapter_run / "adapter").iterdir():
        os.utime(f, (later, later))
    (runs / "not_a_run").mkdir()  # neither merged/ nor adapter/: not offered
    assert [t.dir.name for t in trained_runs(runs)] == ["tiny_adapter", "tiny_merged"]

    (tmp_path / "sft_recipes").mkdir()  # a project folder (project.py): its runs/ are searched
    monkeypatch.chdir(tmp_path)
    common = ["--temperature", "0", "--max-new-tokens", "12"]
    assert cli.main(["review", str(paper["pdf"]), *common]) == 0
    by_default = capsys.readouterr()
    assert f"model: runs/tiny_adapter (LoRA adapter on {tiny_models['mistral']}); template: mistral" in by_default.err
    assert cli.main(["review", str(paper["pdf"]), "--model", "runs/tiny_merged", *common]) == 0
    merged = capsys.readouterr()
    assert "model: runs/tiny_merged (merged); template: mistral" in merged.err
    assert merged.out.startswith("# Review of paper.pdf") and by_default.out.startswith("# Review of paper.pdf")
    assert merged.out != by_default.out  # greedy both times: only the adapter differs
    assert cli.main(["review", str(paper["pdf"]), "--run", "tiny_merged", *common]) == 0  # RUN=: that run, not the newest
    assert "model: runs/tiny_merged (merged)" in capsys.readouterr().err
    assert cli.main(["review", str(paper["pdf"]), "--run", "not_a_run"]) == 2
    assert ("RUN=not_a_run: runs/not_a_run has no trained model (no merged/ or adapter/); trained runs: "
            "tiny_adapter, tiny_merged") in capsys.readouterr().err


def test_no_run_yet_says_what_to_do(tmp_path, paper, monkeypatch, capsys):
    (tmp_path / "sft_recipes").mkdir()  # a project folder (project.py) without runs
    monkeypatch.chdir(tmp_path)
    assert cli.main(["review", str(paper["pdf"])]) == 2
    err = capsys.readouterr().err
    assert "no trained run in runs/" in err and "--model" in err


# ----------------------------------------------------------------------------- errors
def _blank_pdf(path: Path) -> Path:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page()
    doc.save(path)
    return path


def _image_only_pdf(path: Path) -> Path:
    """What a scanner produces: pages that are pictures (of text), no text layer."""
    import pymupdf

    doc = pymupdf.open()
    for _ in range(2):
        page = doc.new_page()
        pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 120, 160), False)
        pix.clear_with(230)
        page.insert_image(page.rect, pixmap=pix)
    doc.save(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("corrupt", "not a readable PDF (corrupt or not a PDF at all)"),
    ("zero", "the PDF file is empty (0 bytes)"),
    ("blank", "the PDF has 1 page(s) but no text at all"),
    ("scanned", "no text layer"),
    ("docx", "unsupported file type '.docx'; give a .pdf, .txt or .md file"),
    ("emptytxt", "the file is empty"),
    ("latin1", "not UTF-8 text"),
    ("nofile", "no such file"),
    ("nomodel", "no such folder"),
    ("adapter", "is a LoRA adapter, but nothing names its base model"),
    ("adapter_base", "names the base model 'build/nowhere/model', which is not a folder here"),
    ("noconfig", "no config.json (model), adapter_config.json (LoRA adapter), merged/ or adapter/ in it"),
    ("llama", "cannot tell the chat template of"),
    ("template", "--template 'nosuch' is not a LLaMA-Factory template"),
    ("top_p", "--top-p 3: the share of probability mass sampled from, 0 < top_p <= 1"),
])
def test_errors(tmp_path, tiny_models, capsys, case, message):
    model, extra = str(tiny_models["mistral"]), []
    paper = tmp_path / "p.txt"
    paper.write_text("some paper text\n")
    if case == "corrupt":
        paper = tmp_path / "p.pdf"
        paper.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    elif case == "zero":
        paper = tmp_path / "p.pdf"
        paper.write_bytes(b"")
    elif case == "blank":
        paper = _blank_pdf(tmp_path / "p.pdf")
    elif case == "scanned":
        paper = _image_only_pdf(tmp_path / "p.pdf")
    elif case == "docx":
        paper = tmp_path / "p.docx"
        paper.write_bytes(b"PK\x03\x04")
    elif case == "emptytxt":
        paper.write_text("  \n")
    elif case == "latin1":
        paper.write_bytes("r\xe9sum\xe9 paper".encode("latin-1"))
    elif case == "nofile":
        paper = tmp_path / "missing.pdf"
    elif case == "nomodel":
        model = str(tmp_path / "no-model")
    elif case == "adapter":
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
        model = str(tmp_path / "adapter")
    elif case == "adapter_base":
        (tmp_path / "run" / "adapter").mkdir(parents=True)
        (tmp_path / "run" / "adapter" / "adapter_config.json").write_text("{}")
        (tmp_path / "run" / "adapter" / "adapter_model.safetensors").write_bytes(b"")  # a finished adapter
        (tmp_path / "run" / "sft_args.yaml").write_text("model_name_or_path: build/nowhere/model\ntemplate: mistral\n")
        model = str(tmp_path / "run")
    elif case == "template":
        extra = ["--template", "nosuch"]
    elif case == "top_p":
        extra = ["--top-p", "3"]
    elif case == "noconfig":
        (tmp_path / "empty").mkdir()
        model = str(tmp_path / "empty")
    elif case == "llama":
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
        model = str(tmp_path / "llama")
    rc = cli.main(["review", str(paper), "--model", model, *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err
    if case == "scanned":
        assert "run OCR first, e.g. `ocrmypdf" in err


def test_scanned_message_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"scan\.pdf: no text layer \(0 characters on 2 page\(s\)"):
        read_paper(_image_only_pdf(tmp_path / "scan.pdf"))


def test_paper_budget_respects_the_model_context():
    from llamafactory_ext.serve.review import TEMPLATE_MARGIN, paper_budget

    assert paper_budget(7168, 32768, 1024, 60) == 7168          # Mistral v0.2: the seed's 7x1024 fits
    assert paper_budget(7168, 8192, 1024, 60) == 8192 - 1024 - 60 - TEMPLATE_MARGIN  # gemma-7b-it: cut further
    assert paper_budget(7168, None, 1024, 60) == 7168
    with pytest.raises(UserError, match="lower --max-new-tokens"):
        paper_budget(7168, 1024, 1024, 60)
