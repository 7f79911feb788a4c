"""Loaded at interpreter start-up by `llamafactory_ext_autopatch.pth` in the venv's site-packages.

Installs a tiny import hook: when LLaMA-Factory's modules that we fix are imported (by
`llamafactory-cli`, a torchrun child, the WebUI's training subprocess, or our own code), the fixes
in `llamafactory_ext.patches` are applied right after the module executes. Costs nothing until
then. Set LLAMAFACTORY_EXT_NO_PATCH=1 to run stock LLaMA-Factory (used by the tests to show the
bug the fix removes).
"""

import os

if os.environ.get("LLAMAFACTORY_EXT_NO_PATCH", "0") in ("", "0", "false"):
    try:
        from llamafactory_ext import patches

        patches.install_import_hook()
    except Exception as e:  # never break an unrelated Python start-up
        import sys

        print(f"llamafactory_ext: could not install patches: {e}", file=sys.stderr)
