"""Loaded at interpreter start-up by `llamafactory_ext_autopatch.pth` in the venv's site-packages.

Puts a tiny finder first on `sys.meta_path`. It answers only for the modules we fix (LLaMA-Factory's
RoPE and training entry, transformers' RoPE utilities); only then does it import
`llamafactory_ext.patches`, which checks the pinned versions and the fingerprints of the functions it
replaces and applies the fixes right after the module executes. Nothing else is imported at start-up
(every Python start in the venv pays for this file: keep it to `os` and `sys`). Set
LLAMAFACTORY_EXT_NO_PATCH=1 to run stock LLaMA-Factory (the tests use it to show the bugs the fixes remove).
"""

import os
import sys

ENV = "LLAMAFACTORY_EXT_NO_PATCH"
HOOKED = frozenset((
    "llamafactory.model.model_utils.rope",  # configure_rope: RoPE scaling on transformers 5
    "transformers.modeling_rope_utils",  # dynamic_rope_update: dynamic-NTK reset
    "llamafactory.train.tuner",  # _training_function: the peak-memory recorder
))


def enabled(environ=os.environ) -> bool:
    return environ.get(ENV, "0").strip().lower() in ("", "0", "false", "no")


class Finder:
    """A meta-path finder (a plain class: importing importlib.abc would cost ~17 ms at every start)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in HOOKED:
            return None
        try:
            from llamafactory_ext import patches

            return patches.patched_spec(fullname, path, target)
        except Exception as e:  # never break an import: fall back to the stock module
            print(f"llamafactory_ext: fixes not applied to {fullname}: {e}", file=sys.stderr)
            return None


def install() -> None:
    if not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())


if enabled():
    install()
