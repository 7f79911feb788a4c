"""Shared fixtures. Every test runs offline: a hidden hub access fails loudly.

The expensive things happen once per session and are shared (under pytest-xdist, once per worker: the test
files that share one run on one worker, GROUPS below):
  - `tiny_models`: the tiny Mistral and Gemma models (built once, cached in build/tiny, a lock for workers);
  - `smollm2_workspace`: SmolLM2 trained and merged exactly as `make demo` does it (demo, WebUI Review tab);
  - `walkthrough_ws`: the README walkthrough run as written: tiny trained on your own data, merged, predicted
    tuned and base, judged (the walkthrough's tests and the tiny pipeline's).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Set before anything imports huggingface_hub / transformers / datasets.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_DISABLED"] = "true"
os.environ["DISABLE_VERSION_CHECK"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DO_NOT_TRACK"] = "1"
# `make` inside a test never installs: the venv's stamp counts as up to date (nothing installs inside a test)
os.environ["MAKEFLAGS"] = " ".join(filter(None, (os.environ.get("MAKEFLAGS", ""), "--old-file=.venv/.installed")))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the two cores: torch uses one thread in each test process and in everything it starts
    # (the launcher's idle-core count would see the other worker's gap and take both: 2.5-6x slower when it returns)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
VENV_BIN = Path(sys.executable).parent
# test files sharing an expensive session fixture -> one work unit of pytest-xdist (one worker runs them all)
GROUPS = {"tests/test_demo.py": "smollm2_workspace", "tests/test_webui.py": "smollm2_workspace",
          "tests/test_walkthrough.py": "walkthrough_ws", "tests/test_pipeline.py": "walkthrough_ws"}


# the longest units first (measured, seconds of one core: the SmolLM2 group ~450, the walkthrough group ~230,
# multinode ~150, test_launch ~140, training ~120, rope ~100, shards ~90, gpucheck ~50), so that the short files
# fill the gaps at the end instead of one worker finishing a long file alone
FIRST = ("smollm2_workspace", "walkthrough_ws", "tests/test_multinode.py", "tests/test_launch.py",
         "tests/test_training.py", "tests/test_rope.py", "tests/test_shards.py", "tests/test_gpucheck.py",
         "tests/test_smollm2.py", "tests/test_interrupts.py", "tests/test_recipes.py", "tests/test_slurm.py",
         "tests/test_plan.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        file = item.nodeid.split("::")[0]
        unit = GROUPS.get(file, file)
        return FIRST.index(unit) if unit in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the order inside a file is kept


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling: a test file is one unit (its module fixtures, e.g. test_launch's built
    workspace, are built once, not once per worker), and GROUPS' files share one unit (xdist's `--dist loadgroup`
    cannot rename test ids under pytest 9); the units go out in FIRST's order."""
    from xdist.scheduler import LoadScopeScheduling

    # xdist re-sorts the units by their number of tests unless told not to: test_shards (1 test, ~90 s) and
    # test_gpucheck (~50 s) then started last, and one worker ran them alone at the end (~70 s of the wall time)
    config.option.loadscopereorder = False

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::")[0]
            return GROUPS.get(file, file)

    return Groups(config, log)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: offline, the venv's bin first on PATH (torchrun, llamafactory-cli)."""
    from llamafactory_ext.train.launcher import LAUNCH_ENV

    # an exported-but-empty NNODES & co. crashes LLaMA-Factory's launcher (int(""))
    env = {k: v for k, v in os.environ.items() if v != "" or k not in LAUNCH_ENV}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """The tiny Mistral and Gemma models (built once, cached in build/tiny)."""
    from llamafactory_ext.models import tiny

    return {arch: tiny.build(arch, ROOT / "build" / "tiny" / arch) for arch in tiny.ARCHS}


def project(ws: Path) -> Path:
    """A folder laid out like the project (recipes, DeepSpeed configs, built models, the sample), with its own
    dataset_info.json and runs/: tests never touch the user's."""
    import shutil

    for d in ("sft_recipes", "deepspeed", "build", "data/sample"):
        (ws / d).parent.mkdir(parents=True, exist_ok=True)
        (ws / d).symlink_to(ROOT / d)
    shutil.copy(ROOT / "dataset_info.json", ws / "dataset_info.json")
    return ws


def ext(ws: Path, *args: str, env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    """`llamafactory-ext ARGS` in `ws`."""
    return subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *args], cwd=ws, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def ext_ok(ws: Path, *args: str, timeout: int = 1200) -> str:
    """`llamafactory-ext ARGS` in `ws`; its output, or a failure showing the end of it."""
    p = ext(ws, *args, timeout=timeout)
    assert p.returncode == 0, f"llamafactory-ext {' '.join(args)} failed:\n{(p.stdout + p.stderr)[-4000:]}"
    return p.stdout + p.stderr


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI wheel's GGUF (cached in build/smollm2)."""
    from llamafactory_ext.models import smollm2

    return smollm2.ensure(ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2_workspace(smollm2_model, tmp_path_factory) -> Path:
    """A project folder where SmolLM2 was trained on the sample exactly as `make demo` trains it:
    `make data MODEL=smollm2` -> `make sft MODEL=smollm2` (the shipped recipe) -> `make merge MODEL=smollm2`.
    runs/smollm2_sample/ holds sft_args.yaml, adapter/ and merged/."""
    ws = project(tmp_path_factory.mktemp("smollm2"))
    ext_ok(ws, "data", "--model", "smollm2")
    ext_ok(ws, "run", "sft", "--model", "smollm2", "--data", "sample")
    ext_ok(ws, "run", "merge", "--model", "smollm2", "--data", "sample")
    return ws


def walkthrough_script() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S)
    assert m, "README.md has no walkthrough block between <!-- walkthrough:start/end --> markers"
    return m.group(1)


@pytest.fixture(scope="session")
def walkthrough_ws(tiny_models, tmp_path_factory) -> Path:
    """The README's own-data walkthrough, run exactly as written (the bash block between the walkthrough
    markers), in a folder laid out like the project: your schema through JQ= -> make data -> make sft ->
    make merge -> make predict (tuned and BASE=1) -> make judge against a real `llamafactory-cli api` server."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 (the walkthrough's judge server) is in use on this machine")
    ws = project(tmp_path_factory.mktemp("walkthrough"))
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (ws / name).symlink_to(ROOT / name)
    # its own session: a timeout or a failure also stops what it started in the background (the judge server)
    p = subprocess.Popen(["bash", "-euo", "pipefail", "-c", walkthrough_script()], cwd=ws, env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=1500)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    (ws / "walkthrough.log").write_text(out)
    assert p.returncode == 0, out[-5000:]
    return ws


@pytest.fixture(scope="session")
def sample_jsonl() -> Path:
    """The committed sample: 36 real ICLR 2022 papers with four-criteria reviews."""
    return ROOT / "data" / "sample" / "paper_review.jsonl"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave things a person may want to look at (screenshots, plots)."""
    d = ROOT / "test-artifacts"
    d.mkdir(exist_ok=True)
    return d
