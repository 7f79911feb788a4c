"""Every shipped recipe and DeepSpeed config, validated on CPU through the real parsers.

The real recipes name hub models (mistralai/Mistral-7B-Instruct-v0.2, google/gemma-7b-it) and need
GPUs; nothing here loads weights. LLaMA-Factory's own `get_train_args` parses each recipe (unknown
keys are errors), and the seed's hyperparameters are checked exactly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli_env

from llamafactory_ext import families
from llamafactory_ext.train import parsecheck, recipes

RECIPES = sorted((ROOT / "sft_recipes").glob("*.yaml"))
REAL = {"mistral_5k", "mistral_15k", "gemma_5k", "gemma_15k", "gemma_15k_12k_liger"}
SECTIONS = ["### model", "### method", "### dataset", "### output", "### train"]
SEED = {  # the seed's settings, exactly (issue 4)
    "quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "nf4", "double_quantization": True,
    "finetuning_type": "lora", "lora_target": "all", "lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.1,
    "learning_rate": 2.0e-4, "lr_scheduler_type": "constant", "warmup_ratio": 0.03, "max_grad_norm": 0.3,
    "weight_decay": 0.001, "optim": "paged_adamw_32bit", "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 16, "num_train_epochs": 2.0, "bf16": True, "flash_attn": "fa2",
    "disable_gradient_checkpointing": False, "save_steps": 10, "save_total_limit": 3, "logging_steps": 10,
    "plot_loss": True, "ddp_timeout": 180000000, "cutoff_len": 12288, "deepspeed": "deepspeed/ds_z2_config.json",
}
MODEL_IDS = {"mistral": "mistralai/Mistral-7B-Instruct-v0.2", "gemma": "google/gemma-7b-it"}


def load(p: Path) -> dict:
    return yaml.safe_load(p.read_text())


def test_all_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert REAL | {"tiny_sample", "tiny_gemma_sample", "smollm2_sample"} <= names
    # every family's base recipe ships (own data trains with it)
    assert {f.base_recipe for f in families.FAMILIES.values()} <= names


@pytest.fixture(scope="module")
def parsed() -> dict[str, list[str]]:
    """LLaMA-Factory's parser on every recipe, in one child process, from the project root."""
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        results = parsecheck.check_many([load(p) for p in RECIPES])
    finally:
        os.chdir(cwd)
    return {p.stem: r for p, r in zip(RECIPES, results, strict=True)}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_through_llamafactory(parsed, recipe):
    assert parsed[recipe.stem] == []


def test_parser_check_is_not_a_rubber_stamp():
    args = load(ROOT / "sft_recipes/mistral_15k.yaml")
    bad = [dict(args, lora_rnak=64), dict(args, quantization_type="nf5"), dict(args, template=None, stage="ppx"),
           dict(args, cutoff_len="abc", bf16="maybe", per_device_train_batch_size=0, learning_rate=-1, template=""),
           dict(args, template="mistrall")]
    results = parsecheck.check_many(bad)
    assert len(results[0]) == 1 and "LLaMA-Factory rejected" in results[0][0] and "lora_rnak" in results[0][0]
    assert results[1] == ["quantization_type: 'nf5': expected one of ['fp4', 'nf4']"]
    assert results[2] == ["stage: 'ppx': expected one of ['pt', 'sft', 'rm', 'ppo', 'dpo', 'kto']",
                          "template: None: expected a LLaMA-Factory template name (e.g. mistral)"]
    # every bad key and value at once (issue 12)
    assert sorted(results[3]) == [
        "bf16: 'maybe': expected true or false", "cutoff_len: 'abc': expected a whole number",
        "learning_rate: -1: must be greater than 0", "per_device_train_batch_size: 0: must be greater than 0",
        "template: '': expected a LLaMA-Factory template name (e.g. mistral)"]
    assert "mistral" in results[4][0] and "not a LLaMA-Factory template" in results[4][0]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_layout_and_references(recipe):
    text = recipe.read_text()
    args = load(recipe)
    assert text.startswith("# "), "a recipe opens with a header: what, hardware, launch command"
    header = text.split("### model")[0]
    assert "Launch:" in header and "llamafactory-cli train sft_recipes/" + recipe.name in header
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions), "LLaMA-Factory's section order"
    info = json.loads((ROOT / "dataset_info.json").read_text())
    for name in args["dataset"].split(","):
        assert name in info, f"{name} not registered"
        assert set(info[name]["columns"]) == {"prompt", "query", "response"}
    if args.get("deepspeed"):
        assert (ROOT / args["deepspeed"]).is_file()
    (model, data), = [k for k, v in recipes.shipped(ROOT / "sft_recipes").items() if v.name == recipe.name]
    assert args["template"] == families.get(model).template
    assert args["output_dir"] == f"runs/{model}_{data}/adapter" == f"runs/{recipe.stem}/adapter"
    assert args["overwrite_output_dir"] is False, "false keeps auto-resume working"


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipes_have_the_seed_settings_exactly(name):
    args = load(ROOT / f"sft_recipes/{name}.yaml")
    model, data = name.split("_")[:2]
    assert {k: args.get(k) for k in SEED} == SEED
    assert args["model_name_or_path"] == MODEL_IDS[model] == families.get(model).model
    assert args["dataset"] == f"paper_review_{data}_{model}"
    # `make data` cuts to what the recipe trains: the base recipe's cutoff_len, read by families.train_budget
    assert args["cutoff_len"] == families.train_budget(model, ROOT / "sft_recipes")
    text = (ROOT / f"sft_recipes/{name}.yaml").read_text()
    assert re.search(r"Effective batch = per_device_train_batch_size 1 x gradient_accumulation_steps 16 x GPUs",
                     text)
    if model == "gemma":  # 12,288 > gemma's 8,192 positions
        assert args["rope_scaling"] == "linear"


def test_deepspeed_configs_parse_with_deepspeed():
    """HF fills the "auto" fields from TrainingArguments, then DeepSpeed's own config class parses it."""
    code = r"""
import json, sys
from transformers import TrainingArguments
from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
from deepspeed.runtime.config import DeepSpeedConfig
for path in sys.argv[1:]:
    hf = HfTrainerDeepSpeedConfig(path)
    args = TrainingArguments(output_dir="/tmp/x", per_device_train_batch_size=1, gradient_accumulation_steps=16,
                             max_grad_norm=0.3, use_cpu=True, report_to="none")
    hf.trainer_config_process(args)
    ds = DeepSpeedConfig(hf.config)
    off = ds.zero_config.offload_optimizer
    print(json.dumps({"path": path, "stage": int(ds.zero_optimization_stage), "micro": ds.train_micro_batch_size_per_gpu,
                      "accum": ds.gradient_accumulation_steps, "clip": ds.gradient_clipping,
                      "offload": None if off is None else str(off.device)}))
"""
    files = sorted((ROOT / "deepspeed").glob("*.json"))
    assert len(files) >= 2
    p = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True,
                       env=cli_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in map(json.loads, [x for x in p.stdout.splitlines() if x.startswith("{")])}
    z2 = rows["ds_z2_config.json"]
    assert (z2["stage"], z2["micro"], z2["accum"], z2["clip"], z2["offload"]) == (2, 1, 16, 0.3, None)
    off = rows["ds_z2_offload_optimizer_config.json"]
    assert off["stage"] == 2 and off["offload"] and "cpu" in off["offload"]


def _ext(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=cli_env(), timeout=300)


def test_dry_run_prints_final_arguments_without_loading_weights():
    existed = (ROOT / "runs/mistral_15k").exists()
    p = _ext("run", "sft", "--model", "mistral", "--data", "15k", "--rope", "dynamic", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "model_name_or_path: mistralai/Mistral-7B-Instruct-v0.2" in p.stdout
    assert "rope_scaling: dynamic" in p.stdout and "FORCE_TORCHRUN=1" in p.stdout
    assert "arguments OK (no weights loaded)" in p.stdout
    assert (ROOT / "runs/mistral_15k").exists() == existed  # a dry run writes nothing


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "mistrall", "--data", "15k"], "valid values: gemma, mistral, smollm2, tiny, tiny_gemma"),
    (["--model", "mistral", "--data", "15K"], "valid for MODEL=mistral: DATA=15k, DATA=5k"),
    (["--model", "mistral", "--data", "15k", "--rope", "ntk"], "valid values: linear, dynamic"),
])
def test_typos_list_the_valid_values(argv, message):
    p = _ext("run", "sft", *argv, "--dry-run")
    assert p.returncode == 2 and message in p.stderr, p.stderr
