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

5. Not a bug, measurements and a check: `_training_function` (every LLaMA-Factory training entry) gets
   the callbacks of train/callbacks.py: the peak-memory and speed recorders (`<output_dir>/peak_memory.json`,
   `speed.json`; `llamafactory-ext plan --calibrate runs/*/` compares them with the planner) and, in a
   distributed run started by `run sft`, the check that every rank trains rank 0's data and arguments.

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


# ----------------------------------------------------------------------------- the recorders (train/callbacks.py)
def _with_peak_memory(original):
    if getattr(original, "_llamafactory_ext_fixed", False):
        return original

    @functools.wraps(original)
    def _training_function(config):
        if os.environ.get("LLAMAFACTORY_EXT_CHECK_VALUES") == "1":  # train/parsecheck.py IN_PROCESS
            from llamafactory_ext.train import parsecheck

            parsecheck.refuse_bad_values(config.get("args"))
        callbacks = config.get("callbacks")
        if isinstance(callbacks, list):
            from llamafactory_ext.train import callbacks as ours

            callbacks.extend(ours.for_training(config))
        return original(config)

    _training_function._llamafactory_ext_fixed = True
    return _training_function


# ----------------------------------------------------------------------------- LlamaBoard (the WebUI)
# What serve/llamaboard.py replaces in llamafactory.webui 0.9.5 (module, function -> sha256 of its source there),
# and interface.create_ui, which serve/webui.py mirrors with one more tab. The same guard as above: pinned
# versions and matching sources, else the WebUI refuses to start (it would wire the wrong code).
WEBUI_FINGERPRINTS = {
    ("common", "get_save_dir"): "c226c56a48ccf3b3c8f32b2631d7832df0cf17e842f906748164b88850c4c8e3",
    ("common", "load_args"): "13b083b17704fa4b19f11045f51c59dc46150867ad3a6776b357b88c02dd107d",
    ("common", "save_cmd"): "56bf1f41da306a23aef911bfdd4432159cc71956642cd3cb4598c1369a022dc2",
    ("common", "_clean_cmd"): "97f0ab7c69b5f318b0b96d3ce2a5db6656540c21a020362571889b4662a72405",
    ("control", "get_model_info"): "d575b726aa588f5d204f836f41b3b8397480b27a5d2e1f1fc65f4ff21691e803",
    ("control", "list_checkpoints"): "769c0d392fe91861cece7afd7134d531c4c5bf78047af36cde437456b9404f2b",
    ("control", "list_config_paths"): "31a3597f9738760cad9f48f362bdb6c2785c68114b4239bdce9f1f553a1f84b4",
    ("control", "list_datasets"): "950d1a19a3a9a65e88416bc863ad9034cc960ff5c76b772d39eee109b5ab974c",
    ("control", "list_output_dirs"): "8e0f218eaa5bfd25155e4bf9fe1105cdeea5a7981ac599f4da232af204a66482",
    ("runner", "Runner._parse_eval_args"): "0c2ab267d60a3d1eb6cb819faa4f9dbbbdadb1c06eb3cbe0de72054e223ed1ed",
    ("interface", "create_ui"): "d994b188d9acfa5183014da560f0f168764c0429bcce95c74e1d26f0bb81a572",
}
WEBUI = "llamafactory.webui"


def webui_guard() -> str | None:
    """None when every LlamaBoard function the WebUI replaces or mirrors is the pinned release's; else why not."""
    reason = versions_reason()
    if reason:
        return reason
    for (mod, func), digest in WEBUI_FINGERPRINTS.items():
        path = module_file(f"{WEBUI}.{mod}")
        if fingerprint(path, func) != digest:
            return f"{WEBUI}.{mod}.{func} is not the code the WebUI wiring was written for (fingerprint mismatch in {path})"
    return None


def replace(site, name: str, new, *, defined_in) -> None:
    """Set `site.name = new`, where `site.name` is the function `defined_in.name` (its own module, or a module
    that imported it by name) and that function is fingerprinted above. Anything else is a RuntimeError: a
    replacement lands only on the code it was written for (call webui_guard() first for a one-line reason)."""
    *owner, attr = name.split(".")

    def resolve(module):
        obj = module
        for part in owner:  # Class.method: the class
            obj = getattr(obj, part, None)
        return obj, getattr(obj, attr, None)

    _, original = resolve(defined_in)
    holder, here = resolve(site)
    key = (defined_in.__name__.removeprefix(WEBUI + "."), name)
    if key not in WEBUI_FINGERPRINTS or original is None or here is not original:
        raise RuntimeError(f"{site.__name__}.{name} is not the fingerprinted {defined_in.__name__}.{name}")
    setattr(holder, attr, new)


# ----------------------------------------------------------------------------- guard
def fingerprint(path: str | Path, name: str) -> str | None:
    """sha256 of the text of `def name` in a source file: a top-level function, or `Class.method` (up to the next
    statement at that level), or None when the file or the function is missing. Reads text only: nothing is
    imported."""
    import hashlib

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    indent, start, end = "", 0, len(lines)
    *outer, func = name.split(".")
    for cls in outer:  # narrow to the class body
        top = next((i for i in range(start, end) if lines[i].startswith(f"{indent}class {cls}")
                    and lines[i][len(indent) + 6 + len(cls):][:1] in ("(", ":")), None)
        if top is None:
            return None
        start, indent = top + 1, indent + "    "
    begin = next((i for i in range(start, end) if lines[i].startswith(f"{indent}def {func}(")), None)
    if begin is None:
        return None
    stop = begin + 1
    deeper = indent + " "
    while stop < end and (not lines[stop].strip() or lines[stop].startswith(deeper)
                          or lines[stop].startswith(indent + ")")):
        stop += 1
    text = "\n".join(lines[begin:stop]).rstrip()
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
        _patch(module)  # before the modules that copy these names (llamafactory/model/patcher.py, modeling_<model>.py) import them


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
    return rope is not None and _is_patched(rope) and (hf is None or _is_patched(hf))


def install_import_hook() -> None:
    """What the .pth does at start-up, for a Python without it (a GPU box running the project from PYTHONPATH, as
    gpu-check's children may), plus patching the hooked modules that are already imported (model classes defined
    before keep stock code). The .pth's opt-out (_autopatch.ENV) is honoured."""
    from llamafactory_ext import _autopatch

    if _autopatch.enabled():
        _autopatch.install()
        apply()
