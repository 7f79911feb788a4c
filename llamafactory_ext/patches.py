"""Fixes for stock LLaMA-Factory 0.9.5 on the pinned stack, applied in our layer (no fork).

RoPE scaling (`rope_scaling: linear|dynamic|yarn|llama3`) is broken with transformers 5.x:

1. `configure_rope` sets `config.max_position_embeddings = old * factor`, a float, and transformers
   5 configs are strict dataclasses: loading dies with
   "Field 'max_position_embeddings' expected int, got float".
2. It assigns `config.rope_scaling = {"rope_type", "factor"}`; in transformers 5 `rope_scaling` is
   an alias of `rope_parameters`, so the dict *replaces* the one that held `rope_theta`. The rotary
   init then crashes (`None ** tensor`) or, where a default is filled in, silently uses base 10000
   instead of the model's (1e6 for Mistral-7B-Instruct-v0.2).
3. For `dynamic` it also enlarges `max_position_embeddings`, which transformers' dynamic-NTK code
   uses as the length where scaling starts: the base would only grow beyond old × factor instead
   of beyond the original context length.

4. transformers 5.6's dynamic-NTK forward hook (`modeling_rope_utils.dynamic_rope_update`) stores the
   cached length under the attribute `"None_max_seq_len_cached"` for single-RoPE models, so
   `max_seq_len_cached` never moves and the reset to the original frequencies never fires: after one
   batch longer than the original context, every shorter batch keeps the stretched frequencies.
   `fixed_dynamic_rope_update` moves the value to where the check reads it.

`fixed_configure_rope` below keeps LLaMA-Factory's semantics (factor = ceil(cutoff_len / original
length) for training, 2.0 for inference; the same log lines) and writes a complete, valid
`rope_parameters` dict with the model's own `rope_theta`.

5. Not a bug, a measurement: `_training_function` (every LLaMA-Factory training entry) gets a
   `TrainerCallback` that writes the process's peak GPU memory to `<output_dir>/peak_memory.json` at
   every checkpoint save and at the end of training (torch.cuda.max_memory_allocated/reserved, the
   device, the step, the longest sequence, the run's arguments and model config). On CPU it records the
   process's max RSS, labelled as such, and no GPU figures. `llamafactory-ext plan --calibrate runs/*/`
   compares these with the planner.

How the fixes reach every entry path: `llamafactory_ext_autopatch.pth` (installed into the venv's
site-packages with this package) imports `llamafactory_ext._autopatch` at every interpreter start, which
puts a finder on `sys.meta_path` for just the three modules above, so `llamafactory-cli train`, torchrun
children and the WebUI's training subprocess all get them.

Guard: the fixes replace or wrap code written for one release. Before patching a module, the versions
of llamafactory and transformers must be the pinned ones (PINS, the same as pyproject.toml) and the
source of each function we replace or wrap must hash to FINGERPRINTS (sha256 of the function's text
in the installed file). On any mismatch one line goes to stderr and that module is left stock.
`preflight()` answers, without importing LLaMA-Factory, whether the RoPE fix will be active in a
training process started from this venv (`run sft` refuses `rope_scaling` otherwise).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

ROPE_MODULE = "llamafactory.model.model_utils.rope"
PATCHER_MODULE = "llamafactory.model.patcher"
HF_ROPE_MODULE = "transformers.modeling_rope_utils"
TUNER_MODULE = "llamafactory.train.tuner"
PTH_NAME = "llamafactory_ext_autopatch.pth"  # pyproject.toml installs llamafactory_ext/_autopatch.pth as this
RECORD = "peak_memory.json"

# The releases the fixes were written against (pyproject.toml pins the same; tests/test_rope.py checks).
PINS = {"llamafactory": "0.9.5", "transformers": "5.6.0"}
# module -> (function we replace or wrap, sha256 of its source text in that release; see fingerprint())
FINGERPRINTS = {
    ROPE_MODULE: ("configure_rope", "da8b27fce556f0ac53e3614bcff23247f6030a0b5085d816ed2f34c282e33a8c"),
    HF_ROPE_MODULE: ("dynamic_rope_update", "91ba04e8fd6572f4e0553a403a7e29715df1d3631256c6530c02afd254a2cbde"),
    TUNER_MODULE: ("_training_function", "8856a97e5553f17c00bb502a3b151934407d25044f320464fe005ae2f9d9d9f2"),
}


def fixed_configure_rope(config, model_args) -> None:
    """Drop-in replacement for `llamafactory.model.model_utils.rope.configure_rope`."""
    from llamafactory.extras import logging

    logger = logging.get_logger(ROPE_MODULE)
    if model_args.rope_scaling is None:
        return
    rope_type = getattr(model_args.rope_scaling, "value", model_args.rope_scaling)

    params = getattr(config, "rope_parameters", None)
    if params is None and getattr(config, "rope_scaling", None) is None and not hasattr(config, "rope_theta"):
        if not hasattr(config, "rope_parameters"):
            logger.warning_rank0("Current model does not support RoPE scaling.")
            return
    params = dict(params or {})
    if set(params) and all(isinstance(v, dict) for v in params.values()):
        logger.warning_rank0("Per-layer-type RoPE parameters are not supported by rope_scaling; leaving them as is.")
        return

    if "original_max_position_embeddings" in params:
        old_max_length = int(params["original_max_position_embeddings"])
    elif getattr(config, "max_position_embeddings", None) is not None:
        old_max_length = int(config.max_position_embeddings)
    else:
        logger.warning_rank0("Cannot find the max position embeddings in the config.")
        return

    if model_args.model_max_length is not None:  # training
        if model_args.model_max_length <= old_max_length:
            logger.warning_rank0("Input length is smaller than max length. Disabling rope scaling.")
            return
        if rope_type == "dynamic":
            logger.warning_rank0(
                "Dynamic NTK scaling may not work well with fine-tuning. "
                "See: https://github.com/huggingface/transformers/pull/24653"
            )
        rope_factor = float(math.ceil(model_args.model_max_length / old_max_length))
    else:  # inference
        rope_factor = 2.0

    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        theta = getattr(config, "default_theta", 10000.0)
    new = {"rope_type": rope_type, "factor": rope_factor, "rope_theta": float(theta)}
    if "partial_rotary_factor" in params:
        new["partial_rotary_factor"] = params["partial_rotary_factor"]
    if rope_type in ("yarn", "llama3"):
        new["original_max_position_embeddings"] = old_max_length
    if rope_type == "llama3":
        new["low_freq_factor"] = 1.0
        new["high_freq_factor"] = 4.0

    # dynamic NTK grows the base beyond config.max_position_embeddings: keep the original length there.
    new_max_length = old_max_length if rope_type == "dynamic" else int(old_max_length * rope_factor)
    config.max_position_embeddings = new_max_length
    config.rope_parameters = new
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    if rope_type == "dynamic":
        logger.info_rank0(f"Dynamic NTK: original frequencies up to {old_max_length} tokens, base grows beyond.")
    else:
        logger.info_rank0(f"Enlarge max model length from {old_max_length} to {new_max_length}.")
    logger.info_rank0(
        f"Using {rope_type} scaling strategy and setting scaling factor to {rope_factor} "
        f"(rope_theta {theta:g} kept; fix from llamafactory_ext.patches)."
    )


def _fix_dynamic_rope_update(original):
    if getattr(original, "_llamafactory_ext_fixed", False):
        return original

    def fixed_dynamic_rope_update(rope_forward):
        inner = original(rope_forward)

        @functools.wraps(rope_forward)
        def wrapper(self, x, position_ids, layer_type=None):
            if layer_type is not None:
                return inner(self, x, position_ids, layer_type=layer_type)
            out = inner(self, x, position_ids)
            if "None_max_seq_len_cached" in self.__dict__:  # transformers 5.6: wrong attribute name
                self.max_seq_len_cached = self.__dict__.pop("None_max_seq_len_cached")
            return out

        return wrapper

    fixed_dynamic_rope_update._llamafactory_ext_fixed = True
    return fixed_dynamic_rope_update


# ----------------------------------------------------------------------------- the peak-memory recorder
def _longest_sequence(dataloader) -> int | None:
    """Longest tokenized example of an HF `datasets` training set, from the Arrow column (no Python lists)."""
    try:
        import pyarrow.compute as pc

        column = dataloader.dataset.data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py())
    except Exception:
        return None


MODEL_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
                     "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@functools.cache
def _recorder_class():
    from transformers import TrainerCallback

    class PeakMemoryRecorder(TrainerCallback):
        """Writes <output_dir>/peak_memory.json at every save and at the end of training (rank 0)."""

        def __init__(self, run_args):
            self.run_args = run_args if isinstance(run_args, dict) else list(run_args or [])
            self.longest = None
            self.model_config = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.longest = _longest_sequence(kwargs.get("train_dataloader"))
            try:
                cfg = kwargs["model"].config.to_dict()
                cfg = cfg.get("text_config") or cfg
                self.model_config = {k: cfg[k] for k in MODEL_CONFIG_KEYS if cfg.get(k) is not None}
            except Exception:
                self.model_config = None

        def on_save(self, args, state, control, **kwargs):
            self.write(args, state, "save")

        def on_train_end(self, args, state, control, **kwargs):
            self.write(args, state, "train_end")

        def write(self, args, state, event: str) -> None:
            if not state.is_world_process_zero:
                return
            try:
                import json

                from llamafactory_ext import fileio

                rec = peak_memory_record(args, state.global_step, event)
                ds = getattr(args, "hf_deepspeed_config", None)
                rec.update(longest_sequence=self.longest, model_config=self.model_config,
                           deepspeed_config=getattr(ds, "config", None), args=self.run_args)
                fileio.atomic_write_text(Path(args.output_dir) / RECORD, json.dumps(rec, indent=1, default=str) + "\n")
            except Exception as e:  # a measurement must never stop a training run
                print(f"llamafactory_ext: could not write {RECORD}: {e}", file=sys.stderr)

    return PeakMemoryRecorder


def peak_memory_record(args, step: int, event: str) -> dict:
    """This process's peak memory: GPU figures from PyTorch's allocator on CUDA, else none (host RSS always)."""
    import resource

    import torch

    device = getattr(args, "device", None)
    cuda = bool(torch.cuda.is_available() and getattr(device, "type", None) == "cuda")
    gib = 1024**3
    rec = {"what": "peak memory of this training process, written by llamafactory_ext.patches",
           "event": event, "step": step, "cuda": cuda, "device": "cpu", "world_size": getattr(args, "world_size", 1),
           "per_device_train_batch_size": getattr(args, "per_device_train_batch_size", None),
           "max_memory_allocated_gib": None, "max_memory_reserved_gib": None, "total_memory_gib": None,
           # host RAM of this process (Linux ru_maxrss is in KiB): NOT GPU memory
           "cpu_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib, 3)}
    if cuda:
        rec.update(device=torch.cuda.get_device_name(device),
                   max_memory_allocated_gib=round(torch.cuda.max_memory_allocated(device) / gib, 3),
                   max_memory_reserved_gib=round(torch.cuda.max_memory_reserved(device) / gib, 3),
                   total_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / gib, 3))
    return rec


def _with_peak_memory(original):
    if getattr(original, "_llamafactory_ext_fixed", False):
        return original

    @functools.wraps(original)
    def _training_function(config):
        callbacks = config.get("callbacks")
        if isinstance(callbacks, list):
            callbacks.append(_recorder_class()(config.get("args")))
        return original(config)

    _training_function._llamafactory_ext_fixed = True
    return _training_function


# ----------------------------------------------------------------------------- guard
def fingerprint(path: str | Path, name: str) -> str | None:
    """sha256 of the text of the top-level `def name` in a source file (up to the next top-level statement),
    or None when the file or the function is missing. Reads text only: nothing is imported."""
    import hashlib

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    start = next((i for i, line in enumerate(lines) if line.startswith(f"def {name}(")), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0].isspace() or lines[end].startswith(")")):
        end += 1
    text = "\n".join(lines[start:end]).rstrip()
    return hashlib.sha256(text.encode()).hexdigest()


def module_file(modname: str) -> Path | None:
    """Where a module's source is installed, found without importing anything of its package."""
    import importlib.util

    top, *rest = modname.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent.joinpath(*rest).with_suffix(".py")


@functools.cache
def versions_reason() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist, pinned in PINS.items():
        try:
            have = version(dist)
        except PackageNotFoundError:
            return f"{dist} is not installed"
        if have != pinned:
            return f"{dist} {have} is installed, the fixes were written for {pinned}"
    return None


def guard(modname: str, path: str | Path | None) -> str | None:
    """None when `modname` may be patched; else why not (one line)."""
    reason = versions_reason()
    if reason:
        return reason
    func, digest = FINGERPRINTS[modname]
    if path is None or fingerprint(path, func) != digest:
        return f"{modname}.{func} is not the code the fix was written for (fingerprint mismatch in {path})"
    return None


_warned = False


def _warn(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"llamafactory_ext: fixes NOT applied (stock LLaMA-Factory/transformers code runs): {reason}",
              file=sys.stderr)


def _patch(module) -> bool:
    """Apply our fix to a freshly executed (or already imported) module, if the guard allows."""
    name = module.__name__
    reason = guard(name, getattr(module, "__file__", None))
    if reason:
        _warn(reason)
        return False
    if name == ROPE_MODULE:
        module.configure_rope = fixed_configure_rope
        patcher = sys.modules.get(PATCHER_MODULE)  # imported after rope normally; fix a late install too
        if patcher is not None and hasattr(patcher, "configure_rope"):
            patcher.configure_rope = fixed_configure_rope
    elif name == HF_ROPE_MODULE:
        module.dynamic_rope_update = _fix_dynamic_rope_update(module.dynamic_rope_update)
    elif name == TUNER_MODULE:
        module._training_function = _with_peak_memory(module._training_function)
    return True


def preflight() -> str | None:
    """None when the RoPE fix will be active in training processes started from this Python environment
    (the .pth is installed, LLAMAFACTORY_EXT_NO_PATCH is not set, versions and fingerprints match);
    else a one-line reason. Imports neither LLaMA-Factory nor transformers."""
    import sysconfig

    from llamafactory_ext import _autopatch

    if not _autopatch.enabled():
        return f"{_autopatch.ENV}={os.environ.get(_autopatch.ENV)} turns the fixes off"
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    try:
        installed = "llamafactory_ext._autopatch" in pth.read_text(encoding="utf-8")
    except OSError:
        installed = False
    if not installed:
        return f"{pth} is missing, so new Python processes do not load the fixes; reinstall: pip install -e ."
    for modname in (ROPE_MODULE, HF_ROPE_MODULE):  # the RoPE fix; the recorder is not needed for it
        reason = guard(modname, module_file(modname))
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------- the import hook
class _PatchingLoader:
    """Wraps a module's own loader: runs it, then patches the module. Everything else (get_code,
    get_source, get_filename, is_package, resource readers: what `python -m` and inspect use) is the
    wrapped loader's."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _patch(module)  # before the modules that copy these names (patcher.py, modeling_<model>.py) import them


def patched_spec(fullname: str, path=None, target=None):
    """The normal spec of a hooked module, with its loader wrapped (called by _autopatch.Finder)."""
    import importlib.machinery

    spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
    if spec is not None and spec.loader is not None:
        spec.loader = _PatchingLoader(spec.loader)
    return spec


def apply() -> bool:
    """Patch the hooked modules already imported. Returns True if the LLaMA-Factory rope module is patched."""
    done = False
    for name in FINGERPRINTS:
        module = sys.modules.get(name)
        if module is not None and not _is_patched(module):
            ok = _patch(module)
            done = done or (ok and name == ROPE_MODULE)
    rope = sys.modules.get(ROPE_MODULE)
    return done or (rope is not None and rope.configure_rope is fixed_configure_rope)


def _is_patched(module) -> bool:
    name = module.__name__
    if name == ROPE_MODULE:
        return module.configure_rope is fixed_configure_rope
    attr = {HF_ROPE_MODULE: "dynamic_rope_update", TUNER_MODULE: "_training_function"}[name]
    return getattr(getattr(module, attr), "_llamafactory_ext_fixed", False)


def is_applied() -> bool:
    """The RoPE fix is active in this process (LLaMA-Factory's rope module, and transformers' if imported)."""
    rope = sys.modules.get(ROPE_MODULE)
    hf = sys.modules.get(HF_ROPE_MODULE)
    return (rope is not None and rope.configure_rope is fixed_configure_rope
            and (hf is None or getattr(hf.dynamic_rope_update, "_llamafactory_ext_fixed", False)))


def install_import_hook() -> None:
    """What the .pth does at start-up, for a Python without it (e.g. a bare GPU box running a script), plus
    patching the hooked modules that are already imported (model classes defined before keep stock code)."""
    from llamafactory_ext import _autopatch

    _autopatch.install()
    apply()
