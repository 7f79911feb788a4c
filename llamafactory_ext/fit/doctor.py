"""Check the environment before a long run: each check says OK, WARN or FAIL, why, and the fix.

    llamafactory-ext doctor
    llamafactory-ext doctor --recipe sft_recipes/mistral_15k.yaml     # + will it fit, disk for checkpoints
    llamafactory-ext doctor --json

Checks: Python; torch, its CUDA build and the NVIDIA driver (nvidia-smi); the GPUs and their memory
(a recipe: the planner's peak against the smallest GPU); flash-attn importable and built for this
torch; bitsandbytes running a real 4-bit NF4 matmul (on the GPU, or the CPU here); DeepSpeed and its
ops (reported, never built); LLaMA-Factory with our RoPE fix active; installed versions against the
pins in pyproject.toml; free disk for the recipe's checkpoints and merged model. A machine without a
GPU is reported as "CPU only" (a warning: tests and the tiny recipes run, the 7B recipes need a GPU).
Exit status 1 if any check FAILs, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from llamafactory_ext import UserError
from llamafactory_ext.project import CHECKOUT

OK, WARN, FAIL = "OK", "WARN", "FAIL"
DIST = "llamafactory-ext"
REPO_PYPROJECT = CHECKOUT / "pyproject.toml"  # the pins of the checkout this package runs from (editable install)
INSTALL_FIX = "make install (or: pip install -e '.[test]') reinstalls the pinned set"


@dataclass
class Check:
    name: str
    status: str
    message: str
    fix: str = ""


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet():
    """Silence the chatter of imports (DeepSpeed and bitsandbytes print and warn on import)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def nvidia_smi() -> dict | None:
    """Driver version, the CUDA version it supports, and the GPUs, from nvidia-smi; None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        head = subprocess.run([exe], capture_output=True, text=True, timeout=30).stdout
        rows = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e), "driver": None, "cuda": None, "gpus": []}
    info = parse_nvidia_smi(head)
    info["gpus"] = [{"name": n.strip(), "mib": int(m)} for n, m in
                    (r.rsplit(",", 1) for r in rows.strip().splitlines() if "," in r)
                    if m.strip().isdigit()]
    return info


def parse_nvidia_smi(text: str) -> dict:
    """`Driver Version: 550.54.15   CUDA Version: 12.4` from nvidia-smi's banner."""
    drv = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return {"driver": drv.group(1) if drv else None, "cuda": cuda.group(1) if cuda else None}


# ----------------------------------------------------------------------------- checks
def check_python(spec: str | None = None) -> Check:
    from packaging.specifiers import SpecifierSet

    spec = spec or _requires_python()
    v = ".".join(map(str, sys.version_info[:3]))
    if spec and not SpecifierSet(spec).contains(v):
        return Check("python", FAIL, f"Python {v}; this project requires {spec}",
                     "create the venv with a matching interpreter: make install PYTHON=python3.11")
    return Check("python", OK, f"Python {v}" + (f" (requires {spec})" if spec else ""))


def _requires_python() -> str | None:
    if _repo_pyproject() is not None:
        return _repo_pyproject()["project"].get("requires-python")
    try:
        return importlib.metadata.metadata(DIST).get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
        return None


def _repo_pyproject() -> dict | None:
    """Our pyproject.toml when running from the repository (an editable install)."""
    import tomllib

    if REPO_PYPROJECT.is_file():
        data = tomllib.loads(REPO_PYPROJECT.read_text(encoding="utf-8"))
        if data.get("project", {}).get("name") == DIST:
            return data
    return None


def check_torch(smi: dict | None) -> Check:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", FAIL, f"import torch failed: {e}", INSTALL_FIX)
    built = torch.version.cuda
    desc = f"torch {torch.__version__}, built for " + (f"CUDA {built}" if built else "CPU only")
    if smi is None:
        return Check("torch", OK, f"{desc}; no NVIDIA driver (nvidia-smi not found)")
    drv_cuda = smi.get("cuda")
    desc += f"; driver {smi.get('driver')} supports CUDA {drv_cuda}"
    if not built:
        return Check("torch", FAIL, desc + ": a CPU-only torch on a GPU machine",
                     f"install the CUDA build of the pinned version: pip install torch=={torch.__version__.split('+')[0]} "
                     f"--index-url https://download.pytorch.org/whl/cu<XY> with XY <= {drv_cuda}")
    if drv_cuda and _vtuple(built)[:1] > _vtuple(drv_cuda)[:1]:
        return Check("torch", FAIL, desc + f": the driver is too old for CUDA {built}",
                     f"upgrade the NVIDIA driver to one supporting CUDA {built}, or install torch built for "
                     f"CUDA <= {drv_cuda}: pip install torch=={torch.__version__.split('+')[0]} "
                     f"--index-url https://download.pytorch.org/whl/cu{''.join(map(str, _vtuple(drv_cuda)))}")
    if not torch.cuda.is_available():
        return Check("torch", FAIL, desc + ", but torch.cuda.is_available() is False",
                     "check CUDA_VISIBLE_DEVICES and that the driver works (nvidia-smi lists the GPUs)")
    if drv_cuda and _vtuple(built) > _vtuple(drv_cuda):
        return Check("torch", WARN, desc + f": CUDA {built} > {drv_cuda} runs via minor-version compatibility, "
                     "but JIT-compiled kernels (bitsandbytes, triton/Liger) can fail with 'unsupported toolchain'",
                     f"upgrade the driver to one supporting CUDA {built}")
    return Check("torch", OK, desc)


def check_gpus(recipe: dict | None = None, recipe_path: Path | None = None) -> Check:
    import torch

    need = ""
    est = None
    if recipe is not None:
        from llamafactory_ext.fit import memory

        try:
            arch = memory.resolve_arch(str(recipe.get("model_name_or_path", "")),
                                     recipe_path.resolve().parent.parent if recipe_path else None)
            est = memory.estimate(arch, memory.setup_from_recipe(recipe, recipe_path))
            need = f"; the recipe needs ~{est.peak_gib:.1f} GiB per GPU (llamafactory-ext plan)"
        except UserError as e:
            need = f"; no memory plan: {e}"
    if not torch.cuda.is_available():
        return Check("gpu", WARN, "CPU only: no CUDA GPU visible. Tests, the tiny recipes and `make demo` run; "
                     "the 7B recipes need an NVIDIA GPU with bf16 (Ampere or newer)" + need,
                     "run training on a GPU machine (and check CUDA_VISIBLE_DEVICES there)")
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    gpus = ", ".join(f"{p.name} {p.total_memory / 2**30:.1f} GiB (sm_{p.major}{p.minor})" for p in props)
    msg = f"{len(props)} GPU(s): {gpus}" + need
    if recipe is not None and recipe.get("bf16") and min(p.major for p in props) < 8:
        return Check("gpu", FAIL, msg + "; bf16 needs compute capability 8.0+ (Ampere)",
                     "use an A100/A40/L40S/H100 class GPU, or set bf16: false, fp16: true and flash_attn: sdpa")
    if est is not None:
        smallest = min(p.total_memory for p in props) / 2**30
        if est.peak_gib > smallest:
            from llamafactory_ext.fit import memory

            mb = memory.max_batch(est.arch, est.setup, smallest)
            mc = memory.max_cutoff(est.arch, est.setup, smallest, 1)
            return Check("gpu", FAIL, msg + f": more than the {smallest:.1f} GiB available",
                         f"per_device_train_batch_size: {mb} (raising gradient_accumulation_steps to keep the "
                         f"effective batch), or cutoff_len <= {mc} at batch 1, or enable_liger_kernel: true"
                         if mb else f"cutoff_len <= {mc} at batch 1, or enable_liger_kernel: true")
    return Check("gpu", OK, msg)


def check_flash_attn(recipe: dict | None = None) -> Check:
    import torch

    wants = recipe is not None and str(recipe.get("flash_attn")) == "fa2"
    fix = "pip install --no-build-isolation flash-attn (the [gpu] extra), on the GPU machine, after torch"
    if importlib.util.find_spec("flash_attn") is None:
        if not torch.cuda.is_available():
            return Check("flash-attn", OK, "not installed (GPU-only; on CPU LLaMA-Factory uses SDPA)")
        status = WARN if wants else OK
        return Check("flash-attn", status, "not installed: LLaMA-Factory warns 'FlashAttention-2 is not installed.' "
                     "and falls back to SDPA (slower; padded batches > 1 then cost b x s^2 memory)", fix)
    try:
        with _quiet():
            import flash_attn  # noqa: F401
            import flash_attn_2_cuda  # noqa: F401
    except ImportError as e:
        hint = " (built against a different torch)" if "undefined symbol" in str(e) else ""
        return Check("flash-attn", FAIL, f"installed ({_version('flash-attn')}) but does not import{hint}: {e}",
                     "rebuild it for this torch: pip install --no-build-isolation --no-cache-dir "
                     "--force-reinstall flash-attn")
    v = _version("flash-attn") or "?"
    if _vtuple(v) < (2, 6):
        return Check("flash-attn", WARN, f"flash-attn {v} < 2.6 (the [gpu] extra pins >=2.6)",
                     "pip install --no-build-isolation 'flash-attn>=2.6'")
    return Check("flash-attn", OK, f"flash-attn {v} imports its CUDA extension (built for torch {torch.__version__})")


def check_bitsandbytes() -> Check:
    """Quantize a small weight to NF4 (double quant) and run bnb.matmul_4bit forward and backward."""
    fix = "pip install bitsandbytes==0.50.2 (0.50 runs on CPU and CUDA; older builds are CUDA-only)"
    try:
        import torch

        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        with _quiet():
            import bitsandbytes as bnb
            import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001
        return Check("bitsandbytes", FAIL, f"import bitsandbytes failed: {e}", fix)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(128, 64, generator=gen).to(device, torch.bfloat16)
        x = torch.randn(4, 64, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
        with _quiet():
            q, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True, blocksize=64)
            y = bnb.matmul_4bit(x, q.t(), quant_state=state)
            y.float().sum().backward()
        deq = F.dequantize_4bit(q, state)
        ref = x.detach().float() @ deq.float().t()
        kernel_err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        quant_err = ((deq.float() - w.float()).norm() / w.float().norm()).item()
    except Exception as e:  # noqa: BLE001
        return Check("bitsandbytes", FAIL, f"bitsandbytes {bnb.__version__}: 4-bit matmul on {device} failed: "
                     f"{type(e).__name__}: {e}", fix)
    if not (kernel_err < 0.02 and quant_err < 0.15 and x.grad is not None and torch.isfinite(x.grad).all()):
        return Check("bitsandbytes", FAIL, f"bitsandbytes {bnb.__version__}: 4-bit matmul on {device} is wrong "
                     f"(kernel error {kernel_err:.3g}, NF4 error {quant_err:.3g})", fix)
    return Check("bitsandbytes", OK, f"bitsandbytes {bnb.__version__}: NF4 double-quant matmul_4bit forward+backward "
                 f"on {device} (kernel error {kernel_err:.1e}, NF4 error {quant_err:.2f})")


def check_deepspeed(recipe: dict | None = None, recipe_path: Path | None = None) -> Check:
    fix = "pip install deepspeed==0.18.4 (LLaMA-Factory 0.9.5 accepts <=0.18.4)"
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    try:
        with _quiet():
            from deepspeed.accelerator import get_accelerator
            from torch.utils.cpp_extension import is_ninja_available

            import deepspeed
            from deepspeed import git_version_info as info
    except Exception as e:  # noqa: BLE001
        return Check("deepspeed", FAIL, f"import deepspeed failed: {type(e).__name__}: {e}", fix)
    accel = get_accelerator()._name
    built = sorted(k for k, v in info.installed_ops.items() if v)
    jit = sorted(k for k, v in info.compatible_ops.items() if v and k not in built)
    msg = (f"deepspeed {deepspeed.__version__} (accelerator {accel}); prebuilt ops: {', '.join(built) or 'none'}; "
           f"JIT-buildable: {', '.join(jit) or 'none'}; ninja {'found' if is_ninja_available() else 'missing'}")
    if recipe is not None and recipe.get("deepspeed") and isinstance(recipe["deepspeed"], str):
        ds = Path(recipe["deepspeed"])
        if not ds.is_file() and recipe_path is not None and (recipe_path.resolve().parent.parent / ds).is_file():
            ds = recipe_path.resolve().parent.parent / ds
        if not ds.is_file():
            return Check("deepspeed", FAIL, msg + f"; the recipe's deepspeed: {recipe['deepspeed']} does not exist "
                         f"(relative to {Path.cwd()})", "run from the project root, or fix the path in the recipe")
        try:
            cfg = json.loads(ds.read_text())
        except json.JSONDecodeError as e:
            return Check("deepspeed", FAIL, msg + f"; {ds} is not valid JSON: {e}", f"fix {ds}")
        off = (cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device")
        msg += f"; recipe uses ZeRO-{cfg.get('zero_optimization', {}).get('stage', 0)}"
        if off == "cpu" and not is_ninja_available():
            return Check("deepspeed", WARN, msg + " with CPU optimizer offload, which JIT-builds cpu_adam: ninja "
                         "is missing", "pip install ninja (and a C++ compiler)")
    return Check("deepspeed", OK, msg)


def check_llamafactory() -> Check:
    fix = "pip install -e . (installs llamafactory_ext_autopatch.pth into the venv's site-packages)"
    try:
        with _quiet():
            import llamafactory
            import llamafactory.model.model_utils.rope  # noqa: F401
        from llamafactory_ext import patches
    except Exception as e:  # noqa: BLE001
        return Check("llamafactory", FAIL, f"import llamafactory failed: {type(e).__name__}: {e}", INSTALL_FIX)
    v = getattr(llamafactory, "__version__", _version("llamafactory"))
    reason = patches.preflight()  # what training processes started from this venv will get
    if reason:
        return Check("llamafactory", FAIL, f"LLaMA-Factory {v} imports, but our RoPE-scaling fix will not be active "
                     f"in training processes ({reason}): rope_scaling would crash with transformers 5", fix)
    return Check("llamafactory", OK, f"LLaMA-Factory {v}; RoPE-scaling fix active (llamafactory_ext.patches)")


def pinned_requirements() -> list[str]:
    """Our runtime pins: pyproject.toml's dependencies from the repo, else the installed dist's metadata."""
    data = _repo_pyproject()
    if data is not None:
        return list(data["project"]["dependencies"])
    try:
        reqs = importlib.metadata.requires(DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in reqs if "extra ==" not in r]


def check_pins(requirements: list[str] | None = None) -> Check:
    """Installed versions against `requirements` (default: our pins). Missing or mismatched = FAIL."""
    from packaging.requirements import InvalidRequirement, Requirement

    reqs = pinned_requirements() if requirements is None else requirements
    if not reqs:
        return Check("pins", WARN, f"no pin list found ({DIST} is not installed and no pyproject.toml here)",
                     INSTALL_FIX)
    bad, fixes, ok = [], [], 0
    for line in reqs:
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            bad.append(f"unparseable requirement {line!r} ({e})")
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = _version(req.name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            ok += 1
            continue
        bad.append(f"{req.name} missing (pinned {req.specifier})" if have is None
                   else f"{req.name} {have} installed, pinned {req.specifier}")
        fixes.append(f"'{req.name}{req.specifier}'")
    if bad:
        return Check("pins", FAIL, f"{len(bad)} of {len(bad) + ok} pins not met: " + "; ".join(bad),
                     INSTALL_FIX + (f"; or just: pip install {' '.join(fixes)}" if fixes else ""))
    return Check("pins", OK, f"all {ok} pinned versions installed")


def checkpoint_bytes(recipe: dict, recipe_path: Path | None = None) -> dict:
    """Disk a recipe needs: checkpoints x save_total_limit, the final adapter, the merged bf16 model."""
    from llamafactory_ext.fit import memory

    arch = memory.resolve_arch(str(recipe.get("model_name_or_path", "")),
                             recipe_path.resolve().parent.parent if recipe_path else None)
    s = memory.setup_from_recipe(recipe, recipe_path)
    n = memory.param_counts(arch, s)
    p = n["lora"] + n["extra_trainable"]
    opt = memory.optimizer_bytes_per_param(s.optim)
    # adapter (fp32) + optimizer states; DeepSpeed also writes fp32 master weights and bf16 model states
    per_ckpt = p * (4 + opt + ((4 + 2) if s.ds_stage else 0))
    limit = recipe.get("save_total_limit")
    kept = int(limit) if limit else 10
    return {"model": arch.name, "checkpoint": per_ckpt, "kept": kept, "limit_set": bool(limit),
            "adapter": 4 * p, "merged": 2 * n["total"], "total": per_ckpt * kept + 4 * p + 2 * n["total"]}


def check_disk(recipe: dict | None = None, recipe_path: Path | None = None, free_bytes: int | None = None) -> Check:
    out = Path(str((recipe or {}).get("output_dir") or "."))
    probe = out.resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free if free_bytes is None else free_bytes
    gb = 1e9
    if recipe is None:
        if free < 50 * gb:
            return Check("disk", WARN, f"{free / gb:.0f} GB free at {probe}; a 7B run needs ~25-35 GB "
                         "(checkpoints + merged model)", "free space, or pass --recipe for an exact estimate")
        return Check("disk", OK, f"{free / gb:.0f} GB free at {probe}")
    try:
        need = checkpoint_bytes(recipe, recipe_path)
    except UserError as e:
        return Check("disk", WARN, f"{free / gb:.0f} GB free at {probe}; no estimate: {e}")
    msg = (f"{free / gb:.0f} GB free at {probe}; {need['model']} needs ~{need['total'] / gb:.1f} GB: "
           f"{need['kept']} checkpoints x {need['checkpoint'] / gb:.2f} GB (adapter + optimizer states), "
           f"adapter {need['adapter'] / gb:.2f} GB, merged bf16 model {need['merged'] / gb:.1f} GB")
    fix = "free disk space, lower save_total_limit, or point output_dir at a bigger disk"
    if free < need["total"]:
        return Check("disk", FAIL, msg, fix)
    if not need["limit_set"]:
        return Check("disk", WARN, msg + " (save_total_limit unset: every checkpoint is kept; 10 assumed)",
                     "set save_total_limit: 3 in the recipe")
    if free < 1.5 * need["total"]:
        return Check("disk", WARN, msg + " (less than 1.5x headroom)", fix)
    return Check("disk", OK, msg)


# ----------------------------------------------------------------------------- run
def run_checks(recipe_path: str | Path | None = None, recipe: dict | None = None) -> list[Check]:
    """Every check, in order; an unexpected error inside a check becomes its FAIL, never a crash. `recipe`: the
    training arguments of a resolved run (else read from `recipe_path`)."""
    path = Path(recipe_path) if recipe_path is not None else None
    if recipe is None and path is not None:
        from llamafactory_ext.fileio import load_yaml

        recipe = load_yaml(path, "recipe")
    smi = nvidia_smi()
    steps = [
        ("python", check_python), ("torch", lambda: check_torch(smi)),
        ("gpu", lambda: check_gpus(recipe, path)), ("flash-attn", lambda: check_flash_attn(recipe)),
        ("bitsandbytes", check_bitsandbytes), ("deepspeed", lambda: check_deepspeed(recipe, path)),
        ("llamafactory", check_llamafactory), ("pins", check_pins), ("disk", lambda: check_disk(recipe, path)),
    ]
    out = []
    for name, fn in steps:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001
            out.append(Check(name, FAIL, f"the check itself crashed: {type(e).__name__}: {e}",
                             "report this; the other checks still ran"))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="also check this training YAML: GPU memory plan, DeepSpeed config, disk")
    p.add_argument("--model", dest="family", default=None,
                   help="MODEL=: also check the run of this family x --data, as `run sft` resolves it")
    p.add_argument("--data", default="sample", help="DATA= of that run (default sample)")
    p.add_argument("--run", default=None, help="RUN=: its folder name under runs/")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.family and args.recipe:
        raise UserError("give --recipe FILE or --model/--data, not both")
    if args.run and not args.family:
        raise UserError(f"RUN={args.run} needs MODEL= (and DATA=): the run's recipe is the one of MODEL x DATA, "
                        f"e.g. make doctor MODEL=mistral DATA=15k RUN={args.run}")
    if args.family:
        from llamafactory_ext.train import resolve

        r = resolve.resolve(args.family, args.data, args.run)
        checks = run_checks(r.recipe, dict(r.args))
    else:
        checks = run_checks(args.recipe)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
        print(json.dumps({"ok": not failed, "counts": counts, "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        for c in checks:
            print(f"[{c.status:^4}] {c.name:<13} {c.message}")
            if c.fix and c.status != OK:
                print(f"{'':20}fix: {c.fix}")
        n = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
        print(f"\n{n[OK]} OK, {n[WARN]} WARN, {n[FAIL]} FAIL")
    return 1 if failed else 0
