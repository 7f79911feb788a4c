"""`llamafactory-ext doctor`: the checks run for real once (the report's shape, a real 4-bit matmul, DeepSpeed's ops);
each check's verdicts are tested on given inputs (versions, pins, nvidia-smi text, free disk, configs)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib

import pytest
from conftest import ROOT, cli_env

from llamafactory_ext.fit import doctor

NAMES = ["python", "torch", "gpu", "flash-attn", "bitsandbytes", "deepspeed", "llamafactory", "pins", "disk"]


@pytest.fixture(scope="module")
def report() -> dict:
    """The real CLI, once: every check runs for real (bitsandbytes, DeepSpeed, LLaMA-Factory imports)."""
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "doctor", "--json",
                        "--recipe", "sft_recipes/mistral_15k.yaml"],
                       cwd=ROOT, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    out = json.loads(p.stdout)
    out["returncode"] = p.returncode
    return out


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_every_check_runs_and_says_what_to_fix(report):
    assert [c["name"] for c in report["checks"]] == NAMES
    assert all(c["status"] in ("OK", "WARN", "FAIL") and c["message"] for c in report["checks"])
    failed = [c["name"] for c in report["checks"] if c["status"] == "FAIL"]
    assert report["ok"] is (not failed) and report["returncode"] == (1 if failed else 0)  # the exit status follows
    assert report["counts"] == {s: sum(c["status"] == s for c in report["checks"]) for s in ("OK", "WARN", "FAIL")}
    assert all(c["fix"] for c in report["checks"] if c["status"] != "OK"), "every WARN/FAIL says how to fix it"


def test_a_check_that_crashes_is_its_own_fail(monkeypatch):
    """run_checks turns an unexpected error inside one check into that check's FAIL; the others still run."""
    for name in ("check_python", "check_bitsandbytes", "check_llamafactory", "check_pins"):
        monkeypatch.setattr(doctor, name, lambda *a, **k: doctor.Check("stub", "OK", "fine"))
    for name in ("check_torch", "check_gpus", "check_flash_attn", "check_deepspeed", "check_disk"):
        monkeypatch.setattr(doctor, name, lambda *a, **k: doctor.Check("stub", "OK", "fine"))
    monkeypatch.setattr(doctor, "nvidia_smi", lambda: None)
    monkeypatch.setattr(doctor, "check_pins", lambda *a, **k: 1 / 0)
    checks = doctor.run_checks()
    assert [c.status for c in checks].count("FAIL") == 1
    crashed = next(c for c in checks if c.status == "FAIL")
    assert crashed.name == "pins" and "the check itself crashed: ZeroDivisionError" in crashed.message
    assert crashed.fix


def test_cpu_only_is_detected(report):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu = by_name(report)["gpu"]
    assert gpu["status"] == "WARN" and gpu["message"].startswith("CPU only")
    assert "needs ~" in gpu["message"] and "GiB per GPU" in gpu["message"]  # the recipe's plan
    assert "nvidia-smi not found" in by_name(report)["torch"]["message"]


def test_bitsandbytes_runs_a_real_4bit_matmul(report):
    bnb = by_name(report)["bitsandbytes"]
    assert bnb["status"] == "OK", bnb
    assert "matmul_4bit forward+backward" in bnb["message"]
    assert bnb["message"].startswith(f"bitsandbytes {importlib.metadata.version('bitsandbytes')}")


def test_deepspeed_ops_and_recipe_config_are_reported(report):
    ds = by_name(report)["deepspeed"]
    assert ds["status"] == "OK" and "prebuilt ops" in ds["message"] and "recipe uses ZeRO-2" in ds["message"]


def test_disk_estimate_for_the_recipe(report):
    disk = by_name(report)["disk"]
    assert disk["status"] in ("OK", "WARN") and "3 checkpoints" in disk["message"]
    assert "merged bf16 model 14.5 GB" in disk["message"]  # 7.24 B params x 2 B


def test_pins_are_the_pyproject_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert doctor.pinned_requirements() == deps
    assert doctor.check_pins().status == "OK"


def test_pins_flag_a_mismatch_and_a_missing_package():
    torch_v = importlib.metadata.version("torch")
    yaml_v = importlib.metadata.version("pyyaml")
    c = doctor.check_pins(["torch==0.0.1", f"pyyaml=={yaml_v}", "surely-not-installed-pkg==1.0",
                           "flash-attn>=2.6; extra == 'gpu'"])  # extras are not runtime pins
    assert c.status == "FAIL"
    assert c.message.startswith("2 of 3 pins not met")
    assert f"torch {torch_v} installed, pinned ==0.0.1" in c.message
    assert "surely-not-installed-pkg missing" in c.message and "pyyaml" not in c.message
    assert "pip install 'torch==0.0.1' 'surely-not-installed-pkg==1.0'" in c.fix


def test_python_version_against_requires_python():
    assert doctor.check_python(">=3.11,<3.12").status == "OK"
    bad = doctor.check_python(">=3.12")
    assert bad.status == "FAIL" and "requires >=3.12" in bad.message and bad.fix


def test_nvidia_smi_banner_parsing():
    banner = ("| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |\n"
              "|-----------------------------------------+------------------------+----------------------+\n")
    assert doctor.parse_nvidia_smi(banner) == {"driver": "550.54.15", "cuda": "12.4"}
    assert doctor.parse_nvidia_smi("") == {"driver": None, "cuda": None}


def test_disk_fails_when_checkpoints_do_not_fit():
    recipe = doctor_recipe()
    need = doctor.checkpoint_bytes(recipe)
    # LoRA r=64 on all 7 projections of Mistral-7B: 167,772,160 parameters (peft's count)
    assert need["adapter"] == 4 * 167_772_160
    c = doctor.check_disk(recipe, free_bytes=int(need["total"] * 0.9))
    assert c.status == "FAIL" and "save_total_limit" in c.fix
    assert doctor.check_disk(recipe, free_bytes=int(need["total"] * 3)).status == "OK"
    unlimited = dict(recipe, save_total_limit=None)
    assert doctor.check_disk(unlimited, free_bytes=10**15).status == "WARN"


def test_missing_deepspeed_config_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = doctor.check_deepspeed({"deepspeed": "deepspeed/nope.json"})
    assert c.status == "FAIL" and "deepspeed/nope.json does not exist" in c.message


def doctor_recipe() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "sft_recipes/mistral_15k.yaml").read_text())


def test_run_without_model_says_what_to_add(capsys):
    from llamafactory_ext import cli

    assert cli.main(["doctor", "--run", "big"]) == 2
    assert "RUN=big needs MODEL= (and DATA=)" in capsys.readouterr().err
