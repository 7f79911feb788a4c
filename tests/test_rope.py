"""RoPE scaling through LLaMA-Factory's own loader: linear and dynamic NTK, with the model's rope_theta kept.

Stock LLaMA-Factory 0.9.5 + transformers 5.6 cannot load a model with `rope_scaling` once
cutoff_len > max_position_embeddings (see llamafactory_ext/patches.py). These tests build tiny
Mistral/Gemma models with max_position_embeddings=64 < cutoff_len and rope_theta=1e6, then check the
instantiated rotary embedding against the analytic frequencies, show the stock failure, and train.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_env

from llamafactory_ext import patches
from llamafactory_ext.models import tiny

ORIG = 64          # tiny max_position_embeddings
CUTOFF = 160       # > ORIG: ceil(160 / 64) = 3 = the factor LLaMA-Factory picks
FACTOR = 3.0
THETA = 1e6        # Mistral-7B-Instruct-v0.2's rope_theta
HEAD_DIM = 16      # tiny models: 64 hidden / 4 heads


@pytest.fixture(scope="module")
def short_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rope_models")
    return {a: tiny.build(a, root / a, max_position_embeddings=ORIG, rope_theta=THETA) for a in tiny.ARCHS}


def analytic_inv_freq(base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))


def dynamic_base(seq_len: int) -> float:
    """Dynamic NTK: the base grows once the sequence is longer than the ORIGINAL context."""
    if seq_len <= ORIG:
        return THETA
    return THETA * ((FACTOR * seq_len / ORIG) - (FACTOR - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))


def load_with_lf(model_path: Path, rope: str):
    """LLaMA-Factory's loader (get_train_args -> load_tokenizer -> load_model), as `train` does it."""
    import llamafactory.model.model_utils.rope  # noqa: F401
    from llamafactory.train.test_utils import load_train_model

    # patched by the .pth import hook at interpreter start, not by this test
    assert patches.is_applied(), "llamafactory_ext_autopatch.pth did not patch LLaMA-Factory"
    return load_train_model(
        model_name_or_path=str(model_path), stage="sft", do_train=True, finetuning_type="lora",
        lora_target="all", dataset="unused", template="mistral", cutoff_len=CUTOFF, rope_scaling=rope,
        output_dir="unused", overwrite_output_dir=True, report_to="none",
    )


def rotary(model):
    return next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_linear_scaling_keeps_theta_and_divides_by_factor(short_models, arch):
    model = load_with_lf(short_models[arch], "linear")
    cfg = model.config
    assert isinstance(cfg.max_position_embeddings, int) and cfg.max_position_embeddings == ORIG * FACTOR
    assert cfg.rope_parameters["rope_theta"] == THETA
    assert cfg.rope_parameters["rope_type"] == "linear" and cfg.rope_parameters["factor"] == FACTOR
    inv = rotary(model).inv_freq.double()
    torch.testing.assert_close(inv, analytic_inv_freq(THETA) / FACTOR, rtol=1e-6, atol=0)
    # and NOT the default-base frequencies a dropped rope_theta would give
    assert not torch.allclose(inv, analytic_inv_freq(10000.0) / FACTOR)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_dynamic_ntk_grows_base_beyond_original_length(short_models, arch):
    model = load_with_lf(short_models[arch], "dynamic")
    cfg = model.config
    assert cfg.rope_parameters == {"rope_type": "dynamic", "factor": FACTOR, "rope_theta": THETA}
    assert cfg.max_position_embeddings == ORIG  # where dynamic NTK starts scaling
    emb = rotary(model)
    x = torch.zeros(1, 1, HEAD_DIM)
    # within the original length: the unscaled frequencies with the model's theta
    torch.testing.assert_close(emb.inv_freq.double(), analytic_inv_freq(THETA), rtol=1e-6, atol=0)
    for seq_len in (ORIG + 1, 100, CUTOFF):
        emb(x, torch.arange(seq_len)[None])
        torch.testing.assert_close(emb.inv_freq.double(), analytic_inv_freq(dynamic_base(seq_len)),
                                   rtol=1e-5, atol=0)
    assert dynamic_base(CUTOFF) > THETA * 3  # the base really grew
    emb(x, torch.arange(ORIG // 2)[None])  # back to a short sequence: original frequencies again
    torch.testing.assert_close(emb.inv_freq.double(), analytic_inv_freq(THETA), rtol=1e-6, atol=0)


def test_stock_llamafactory_fails_without_the_fix(short_models):
    """The bug the fix removes: with the import hook disabled, stock 0.9.5 cannot load the model."""
    code = (
        "from llamafactory.train.test_utils import load_train_model\n"
        f"load_train_model(model_name_or_path={str(short_models['mistral'])!r}, stage='sft', do_train=True,"
        " finetuning_type='lora', dataset='unused', template='mistral', cutoff_len=160, rope_scaling='linear',"
        " output_dir='unused', overwrite_output_dir=True, report_to='none')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(LLAMAFACTORY_EXT_NO_PATCH="1"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "max_position_embeddings" in p.stderr and "expected int, got float" in p.stderr


def _train(tmp: Path, model: Path, template: str, rope: str, torchrun: bool) -> subprocess.CompletedProcess:
    rows = [json.loads(line) for line in (ROOT / "data/sample/paper_review.jsonl").open()][:4]
    with (tmp / "train.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps({"instruction": "Review.", "input": r["input"][:2000], "output": r["output"][:400]})
                    + "\n")
    (tmp / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "train.jsonl", "columns": {
        "prompt": "instruction", "query": "input", "response": "output"}}}))
    cfg = tmp / "train.yaml"
    cfg.write_text("\n".join([
        f"model_name_or_path: {model}", "stage: sft", "do_train: true", "finetuning_type: lora",
        "lora_target: all", f"template: {template}", "dataset: t", f"dataset_dir: {tmp}",
        f"cutoff_len: {CUTOFF}", f"rope_scaling: {rope}", f"output_dir: {tmp / 'out'}",
        "overwrite_output_dir: true", "max_steps: 3", "per_device_train_batch_size: 2", "logging_steps: 1",
        "report_to: none", "save_strategy: 'no'", "quantization_bit: 4",
    ]) + "\n")
    extra = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "1"} if torchrun else {}
    return subprocess.run(["llamafactory-cli", "train", str(cfg)], cwd=tmp, env=cli_env(**extra),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "rope", "torchrun"), [
    ("mistral", "linear", False),   # plain `llamafactory-cli train`
    ("gemma", "dynamic", True),     # a torchrun child process
])
def test_training_with_rope_scaling_on_every_entry_path(short_models, tmp_path, arch, rope, torchrun):
    p = _train(tmp_path, short_models[arch], arch, rope, torchrun)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "fix from llamafactory_ext.patches" in log  # logged by the fixed configure_rope in the child
    if torchrun:
        assert "Initializing 1 distributed tasks" in log
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 3 and len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(("no_patch", "expected"), [("1", "STUCK"), ("0", "RESET")])
def test_dynamic_ntk_reset_after_a_long_batch(no_patch, expected):
    """transformers 5.6 alone never resets dynamic-NTK frequencies after one long batch; with the fix it does."""
    code = (
        "import torch\n"
        "from transformers import MistralConfig\n"
        "from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding\n"
        "c = MistralConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=64,\n"
        "                  rope_parameters={'rope_type': 'dynamic', 'factor': 3.0, 'rope_theta': 1e6})\n"
        "e = MistralRotaryEmbedding(c); x = torch.zeros(1, 1, 16); f0 = e.inv_freq.clone()\n"
        "e(x, torch.arange(160)[None]); assert not torch.equal(e.inv_freq, f0)\n"
        "e(x, torch.arange(32)[None])\n"
        "print('RESET' if torch.equal(e.inv_freq, f0) else 'STUCK')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=cli_env(LLAMAFACTORY_EXT_NO_PATCH=no_patch),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == expected


# ----------------------------------------------------------------------------- the plugin's guard and hook
def test_guard_pins_are_the_pyproject_pins():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = dict(d.split("==") for d in deps if "==" in d)
    assert {k: pinned[k] for k in patches.PINS} == patches.PINS


def test_preflight_passes_in_this_venv_and_names_each_failure(monkeypatch, tmp_path):
    assert patches.preflight() is None  # .pth installed, no opt-out, pinned versions, known function texts
    monkeypatch.setenv("LLAMAFACTORY_EXT_NO_PATCH", "1")
    assert "LLAMAFACTORY_EXT_NO_PATCH=1 turns the fixes off" in patches.preflight()
    monkeypatch.delenv("LLAMAFACTORY_EXT_NO_PATCH")
    monkeypatch.setattr(patches, "PTH_NAME", "not_installed.pth")
    assert "not_installed.pth is missing" in patches.preflight()
    monkeypatch.undo()
    monkeypatch.setitem(patches.FINGERPRINTS, patches.ROPE_MODULE, ("configure_rope", "0" * 64))
    reason = patches.preflight()
    assert "llamafactory.model.model_utils.rope.configure_rope is not the code the fix was written for" in reason
    monkeypatch.undo()
    monkeypatch.setitem(patches.FINGERPRINTS, patches.TUNER_MODULE, ("_training_function", "0" * 64))
    assert patches.preflight() is None  # only the peak-memory recorder would be off: the RoPE fix is active
    monkeypatch.undo()
    monkeypatch.setitem(patches.PINS, "transformers", "5.7.0")
    patches.versions_reason.cache_clear()
    try:
        assert patches.preflight() == "transformers 5.6.0 is installed, the fixes were written for 5.7.0"
    finally:
        monkeypatch.undo()
        patches.versions_reason.cache_clear()
    assert patches.preflight() is None


def test_fingerprint_is_the_text_of_one_function(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import x\n\n\ndef f(a,\n      b):\n    return a\n\n\ndef g():\n    pass\n")
    first = patches.fingerprint(src, "f")
    src.write_text("import x\n\n\ndef f(a,\n      b):\n    return a\n\n\ndef g():\n    return 1\n")
    assert patches.fingerprint(src, "f") == first  # another function changed: same fingerprint
    src.write_text("import x\n\n\ndef f(a,\n      b):\n    return b\n\n\ndef g():\n    return 1\n")
    assert patches.fingerprint(src, "f") != first
    assert patches.fingerprint(src, "h") is None and patches.fingerprint(tmp_path / "none.py", "f") is None


GUARD_PROBE = """
import sys
from llamafactory_ext import patches
{setup}
import transformers.modeling_rope_utils as hf
import llamafactory.model.model_utils.rope as rope
import llamafactory.train.tuner as tuner
print("hf", getattr(hf.dynamic_rope_update, "_llamafactory_ext_fixed", False))
print("rope", rope.configure_rope is patches.fixed_configure_rope)
print("tuner", getattr(tuner._training_function, "_llamafactory_ext_fixed", False))
"""


@pytest.mark.parametrize(("setup", "expected", "message"), [
    ("", {"hf": "True", "rope": "True", "tuner": "True"}, None),
    ("patches.PINS['llamafactory'] = '0.9.6'", {"hf": "False", "rope": "False", "tuner": "False"},
     "llamafactory_ext: fixes NOT applied (stock LLaMA-Factory/transformers code runs): llamafactory 0.9.5 is "
     "installed, the fixes were written for 0.9.6"),
    ("patches.FINGERPRINTS[patches.ROPE_MODULE] = ('configure_rope', '0' * 64)",
     {"hf": "True", "rope": "False", "tuner": "True"},
     "llamafactory_ext: fixes NOT applied (stock LLaMA-Factory/transformers code runs): "
     "llamafactory.model.model_utils.rope.configure_rope is not the code the fix was written for"),
])
def test_a_version_or_code_mismatch_prints_one_line_and_patches_nothing(setup, expected, message):
    """The real import hook in a fresh interpreter: only code whose release and text we know gets replaced."""
    p = subprocess.run([sys.executable, "-c", GUARD_PROBE.format(setup=setup)], env=cli_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert dict(line.split() for line in p.stdout.splitlines()) == expected
    ours = [line for line in p.stderr.splitlines() if line.startswith("llamafactory_ext:")]
    if message is None:
        assert ours == []
    else:
        assert len(ours) == 1 and ours[0].startswith(message), p.stderr[-2000:]


def test_python_dash_m_runs_a_hooked_module():
    """runpy asks the loader for get_code: the hook's loader delegates it to the module's own loader."""
    p = subprocess.run([sys.executable, "-m", patches.ROPE_MODULE], env=cli_env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "AttributeError" not in p.stderr, p.stderr[-3000:]
    import importlib.util

    spec = importlib.util.find_spec("transformers.modeling_rope_utils")  # through the hook's finder
    assert isinstance(spec.loader, patches._PatchingLoader)
    assert "def dynamic_rope_update" in spec.loader.get_source(spec.name)
