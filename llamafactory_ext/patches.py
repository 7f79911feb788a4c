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

How the fix reaches every entry path: `llamafactory_ext_autopatch.pth` (installed into the venv's
site-packages with this package) runs `install_import_hook()` at every interpreter start, so
`llamafactory-cli train`, torchrun children and the WebUI's training subprocess all get it.
"""

from __future__ import annotations

import functools
import importlib.machinery
import math
import sys

ROPE_MODULE = "llamafactory.model.model_utils.rope"
PATCHER_MODULE = "llamafactory.model.patcher"
HF_ROPE_MODULE = "transformers.modeling_rope_utils"


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


def _patch_hf_rope(module) -> None:
    module.dynamic_rope_update = _fix_dynamic_rope_update(module.dynamic_rope_update)


def apply() -> bool:
    """Patch the LLaMA-Factory modules already imported. Returns True if the rope module is patched."""
    rope = sys.modules.get(ROPE_MODULE)
    if rope is None:
        return False
    rope.configure_rope = fixed_configure_rope
    patcher = sys.modules.get(PATCHER_MODULE)
    if patcher is not None and hasattr(patcher, "configure_rope"):
        patcher.configure_rope = fixed_configure_rope
    return True


def is_applied() -> bool:
    rope = sys.modules.get(ROPE_MODULE)
    hf = sys.modules.get(HF_ROPE_MODULE)
    return (rope is not None and rope.configure_rope is fixed_configure_rope
            and (hf is None or getattr(hf.dynamic_rope_update, "_llamafactory_ext_fixed", False)))


# Plain classes, not importlib.abc subclasses: importing importlib.abc costs ~17 ms, and this module is
# imported at every interpreter start in the venv. The import system only needs these methods.
class _PatchingLoader:
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        # before the modules that copy these names (patcher.py, modeling_<model>.py) import them
        if module.__name__ == ROPE_MODULE:
            module.configure_rope = fixed_configure_rope
        elif module.__name__ == HF_ROPE_MODULE:
            _patch_hf_rope(module)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname not in (ROPE_MODULE, HF_ROPE_MODULE):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    if HF_ROPE_MODULE in sys.modules:  # too late for model classes already defined; fix what we can
        _patch_hf_rope(sys.modules[HF_ROPE_MODULE])
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    apply()
