"""The package's shape (issue 21): modules grouped by stage, no import circle but the start-up hook pair, every
command importable from a fresh interpreter; one rule for the project root, one "k" rule, one temperature-folder
rule; the Makefile passes variables on and computes no path or name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, project

from llamafactory_ext import UserError, cli, families, units
from llamafactory_ext import project as project_mod

PKG = ROOT / "llamafactory_ext"
STAGES = {"data", "train", "eval", "serve", "fit", "models"}
TOP = {"__init__", "_autopatch", "cli", "demo", "families", "fileio", "gpus", "patches", "project", "units"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    name = ".".join(rel.parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (top-level and inside functions)."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llamafactory_ext"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[mod].add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in mods)
        graph[mod] = {m for m in graph[mod] if m in mods and m != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_modules_are_grouped_by_stage():
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == TOP, top ^ TOP
    assert {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == STAGES
    for stage in STAGES:
        assert 1 <= len(list((PKG / stage).glob("*.py"))) - 1 <= 10, stage  # a stage is a handful of modules


def test_no_import_circle_but_the_start_up_hook_pair():
    assert cycles(import_graph()) == [{"llamafactory_ext._autopatch", "llamafactory_ext.patches"}]


def test_the_top_level_imports_no_stage_but_at_run_time():
    """The foundation (families, fileio, units, project, gpus) imports no stage module at all; patches only what
    runs in the training process (its callbacks and the arguments' check), inside the wrapper that runs there."""
    graph = import_graph()
    for mod in ("families", "fileio", "units", "project", "gpus", "_autopatch"):
        stages = {m for m in graph[f"llamafactory_ext.{mod}"] if m.split(".")[1:2] and m.split(".")[1] in STAGES}
        assert not stages, (mod, stages)
    assert {m for m in graph["llamafactory_ext.patches"] if m.split(".")[1:2] and m.split(".")[1] in STAGES} == {
        "llamafactory_ext.train.callbacks", "llamafactory_ext.train.parsecheck"}


def test_every_command_and_action_has_help():
    for name, entry in cli.COMMANDS.items():
        argvs = [[name, a, "--help"] for a in entry] if isinstance(entry, dict) else [[name, "--help"]]
        for argv in argvs:
            p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", *argv], capture_output=True, text=True,
                               env=cli_env(), timeout=120, cwd=ROOT)
            assert p.returncode == 0 and "usage:" in p.stdout, (argv, p.stderr[-2000:])


# ----------------------------------------------------------------------------- one rule each
def test_the_project_root_rule(tmp_path, monkeypatch):
    ws = project(tmp_path / "ws")
    monkeypatch.chdir(ws)
    assert project_mod.find_root() == ws  # 2. the current directory, when it is a project
    monkeypatch.chdir(tmp_path)
    assert project_mod.find_root() == project_mod.CHECKOUT  # 3. else the checkout this package runs from
    monkeypatch.setenv(project_mod.ENV, str(ws))
    assert project_mod.find_root() == ws  # 1. the variable wins
    monkeypatch.setenv(project_mod.ENV, str(tmp_path))
    with pytest.raises(UserError, match="is not a project folder"):
        project_mod.find_root()
    p = project_mod.Project(ws)
    assert p.rel(ws / "runs/x/adapter") == "runs/x/adapter" and p.rel("/elsewhere/y") == "/elsewhere/y"
    assert p.rel(ws / "build/tiny/mistral") == "build/tiny/mistral"  # a symlinked folder inside stays inside


def test_a_wheel_outside_a_checkout_says_it_needs_one(tmp_path, monkeypatch):
    monkeypatch.setattr(project_mod, "CHECKOUT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="needs the project folder .* An installed wheel alone has no recipes"):
        project_mod.find_root()


def test_the_k_rule():
    assert units.count("8k", "CUTOFF") == 8192 and units.count("12k", "CUTOFF") == 12288
    assert units.count("1.5k", "CUTOFF") == 1536 and units.count(640, "CUTOFF") == 640
    assert units.count("5k", "SIZES", unit="records") == 5000 and units.counts("15k,5k", "SIZES", unit="records") == [5000, 15000]
    for bad in ("abc", "0", "-1", "1.3", "8m", ""):
        with pytest.raises(UserError, match="not a positive token count"):
            units.count(bad, "CUTOFF")


def test_one_temperature_folder_rule():
    assert units.temp_dir(0.35) == "temp_0.35" and units.temp_dir(units.temperature("0.50")) == "temp_0.5"
    assert units.temp_dir(0.5, base=True) == "base_temp_0.5" and units.temp_dir(0) == "temp_0"
    for t, base in ((0.35, False), (0.5, True), (0, False), (1.25, True)):  # read back as written
        assert units.parse_temp_dir(units.temp_dir(t, base)) == (base, t)
    for stray in ("temp_0.35.old", "temp_", "base_temp_x", "my_temp_0.5", "temp_0.5.tmp"):
        assert units.parse_temp_dir(stray) is None, stray


def test_a_stray_folder_beside_the_predictions_is_not_a_run(tmp_path):
    """extract_all used float() on whatever followed `temp_`: a copy named temp_0.35.old raised ValueError."""
    from llamafactory_ext.eval.predictor import extract_all

    for name in ("temp_0.35", "temp_0.35.old", "base_temp_0.35"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generated_predictions.jsonl").write_text(
            '{"prompt": "p", "predict": "[Significance and novelty]\\nx", "label": "y"}\n')
    rows = extract_all(tmp_path, None, quiet=True)
    assert [r["run"] for r in rows] == ["base_temp_0.35", "temp_0.35"]


def test_the_train_budget_lives_in_the_base_recipe_only():
    for fam in families.FAMILIES.values():
        assert not hasattr(fam, "train_budget")
        assert families.train_budget(fam, ROOT / "sft_recipes") > 0


def test_one_yaml_reader():
    """fileio.load_yaml is the only place that parses YAML (every other module calls it)."""
    users = [p for p in PKG.rglob("*.py") if re.search(r"yaml\.safe_load\(", p.read_text()) and p.name != "fileio.py"]
    assert [p.relative_to(ROOT) for p in users] == [Path("llamafactory_ext/train/resolve.py")]  # key=value values


def test_one_sampling_default():
    for fam in families.FAMILIES.values():
        assert (fam.temperature, fam.top_p) == (families.TEMPERATURE, families.TOP_P)
    sources = "\n".join(p.read_text() for p in PKG.rglob("*.py"))
    assert not re.search(r"top_p\W+0\.7", sources), "a second top_p default"


# ----------------------------------------------------------------------------- the Makefile passes things on
def test_the_makefile_computes_no_path_or_name():
    text = (ROOT / "Makefile").read_text()
    recipes_lines = [ln for ln in text.splitlines() if ln.startswith("\t")]
    for ln in recipes_lines:
        assert "sft_recipes/" not in ln and "runs/" not in ln.replace("rm -rf runs", "") and "temp_" not in ln, ln
        assert not re.search(r"\$\{?LFX_\w+:-", ln), f"a default computed in the Makefile: {ln}"
    assert "tiny tiny_gemma smollm2" not in text  # which families are local is families.py's business


def test_an_installed_wheel_has_no_stray_paths():
    """No module computes a project path from its own file: project.py is the one place."""
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if path.name in ("project.py",):
            continue
        assert "Path(__file__)" not in text, path
        assert not re.search(r'Path\("(runs|sft_recipes|data/sample|data/build|build)', text), path


def test_the_root_variable_points_a_command_at_a_project(tmp_path):
    ws = project(tmp_path / "ws")
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "recipes"], cwd=tmp_path,
                       env=cli_env(LLAMAFACTORY_EXT_ROOT=str(ws)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "sft_recipes/tiny_sample.yaml" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.cli", "recipes"], cwd=tmp_path,
                       env=cli_env(LLAMAFACTORY_EXT_ROOT=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "is not a project folder" in p.stderr
