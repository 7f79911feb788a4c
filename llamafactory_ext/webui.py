"""LLaMA-Factory's WebUI (LlamaBoard), safe by default, wired to this project, with a "Review a paper" tab.

Differences from `llamafactory-cli webui`:
  - binds to 127.0.0.1 (stock binds to 0.0.0.0: an unauthenticated page that can start processes
    and read paths on the machine); another host prints a warning, and --auth / WEBUI_AUTH adds a
    login (gradio's auth; it covers every tab and the API, the review endpoint included);
  - the port is fixed (6006 unless --port / WEBUI_PORT / make webui PORT=): a port in use is an error, never a silent move
    to the next free one; no browser is opened and nothing is shared through gradio.live;
  - the project folder (--dataset-dir, default .: dataset_info.json, sft_recipes/, runs/) is the data folder
    of the Train and Evaluate tabs; only datasets whose files exist are listed, and the Train tab does not
    offer test splits (`*_test`, `*_test_*`); the Evaluate tab lists them first;
  - every recipe `sft_recipes/<name>.yaml` is a config under "Config path" (Load arguments): it fills model
    path, template, quantization, LoRA, cutoff, dataset, batch and schedule, and puts the recipe's keys
    without a widget (optim, warmup_ratio, seed, ...) into "Extra arguments"; without a GPU the compute
    type is fp32 (the recipe's bf16 needs one) and DeepSpeed is off. The compute type defaults to fp32
    on a machine without a GPU for every run;
  - training outputs go to runs/, as the CLI's do: "Output dir" NAME trains into runs/NAME/adapter and
    writes runs/NAME/sft_args.yaml (a recipe loads as NAME = the recipe's name, e.g. runs/tiny_sample, or
    NAME_<time> when that run already exists); the checkpoint lists (Chat, Evaluate, Export) are the runs
    with an adapter; Evaluate writes to runs/NAME/;
  - "Review a paper": upload a PDF/TXT/MD, pick a run (default: the newest with merged/ or adapter/), read
    the review in its four sections and download it; the same code as `llamafactory-ext review`, also a
    gradio API endpoint: `Client(url).predict(handle_file("p.pdf"), "", 0.35, 400, api_name="/review")`
    (run "" = the newest run) returns the Markdown;
  - training started from the page runs this venv's `llamafactory-cli` (its bin/ goes first on
    PATH), so it gets the same fixes as `llamafactory-ext run sft` (the RoPE-scaling fix).
LlamaBoard keeps its side files in the current directory: llamaboard_cache/ and llamaboard_config/.

examples:
  llamafactory-ext webui                                  # http://127.0.0.1:6006
  WEBUI_PORT=7000 llamafactory-ext webui --dataset-dir ~/proj   # or: make webui PORT=7000
  make webui HOST=0.0.0.0 WEBUI_AUTH=alice:s3cret          # reachable from other machines

On a rented GPU box, prefer an SSH tunnel from your laptop and keep the default host:
  ssh -N -L 6006:127.0.0.1:6006 user@box      # then open http://127.0.0.1:6006 locally
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llamafactory_ext import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006
# Modules of llamafactory.webui that copy `DEFAULT_DATA_DIR` at import (`from .common import ...`).
DATA_DIR_MODULES = (
    "llamafactory.webui.common",
    "llamafactory.webui.control",
    "llamafactory.webui.components.train",
    "llamafactory.webui.components.eval",
)
SIDE_FILES = ("llamaboard_cache/", "llamaboard_config/")
LLAMAFACTORY_VERSION = "0.9.5"  # the LlamaBoard internals wired below are this version's
TEST_SPLIT = re.compile(r"(?:^|_)test(?:_|$)")  # sample_test, paper_review_test_mistral
RECIPE_CONFIGS = "sft_recipes"  # "Config path" choices sft_recipes/<name>.yaml are the project's recipes


def add_arguments(p: argparse.ArgumentParser) -> None:
    # WEBUI_HOST/WEBUI_PORT, not the generic HOST/PORT many shells and platforms export (tcsh sets
    # HOST to the machine's name): those must never silently move the UI onto the network.
    p.add_argument("--host", default=os.environ.get("WEBUI_HOST") or DEFAULT_HOST,
                   help="address to listen on (env WEBUI_HOST; make webui HOST=...; default %(default)s, this machine only)")
    p.add_argument("--port", default=os.environ.get("WEBUI_PORT") or str(DEFAULT_PORT),
                   help="port to listen on (env WEBUI_PORT; make webui PORT=...; default %(default)s)")
    p.add_argument("--auth", default=os.environ.get("WEBUI_AUTH") or None, metavar="USER:PASSWORD",
                   help="require this login (env WEBUI_AUTH; prefer the env var: arguments show in `ps`)")
    p.add_argument("--dataset-dir", default=".",
                   help="the project folder: dataset_info.json (the default dataset folder), sft_recipes/ "
                        "(offered as configs) and runs/ (training outputs, runs to review) (default: .)")


def parse_port(value: str) -> int:
    try:
        port = int(str(value).strip())
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise UserError(f"port {value!r} is not a number from 1 to 65535; set PORT=6006 or --port 6006")
    return port


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); the password may itself contain ':'."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("the login must be USER:PASSWORD with both parts non-empty "
                        "(WEBUI_AUTH=alice:s3cret or --auth alice:s3cret)")
    return user, password


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolve it
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) the way uvicorn will (SO_REUSEADDR) and release it; a clear error if taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise UserError(f"cannot use host {host!r} ({e}); set HOST=127.0.0.1 or --host 127.0.0.1") from e
    family, type_, proto, _, addr = infos[0]
    with socket.socket(family, type_, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(
                    f"port {port} is already in use on {host} (another WebUI or program is listening there); "
                    f"stop it, or pick another port: PORT={port + 1} make webui, or "
                    f"llamafactory-ext webui --port {port + 1}") from e
            if e.errno == errno.EACCES:
                raise UserError(f"no permission to listen on port {port}; choose a port above 1023 "
                                f"(PORT=6006 or --port 6006)") from e
            raise UserError(f"cannot listen on {host}:{port} ({e}); "
                            f"check HOST/--host and PORT/--port") from e


def resolve_dataset_dir(value: str) -> Path:
    d = Path(value).expanduser().resolve()
    if not d.is_dir():
        raise UserError(f"dataset folder {value} does not exist; pass --dataset-dir <folder holding "
                        f"dataset_info.json>")
    if not (d / "dataset_info.json").is_file():
        print(f"warning: no dataset_info.json in {d}: the WebUI's dataset list will be empty. Register a "
              f"dataset with `llamafactory-ext register`, or pass --dataset-dir <folder>.", file=sys.stderr)
    return d


# ----------------------------------------------------------------------------- datasets
def is_test_split(name: str) -> bool:
    return bool(TEST_SPLIT.search(name))


def available_datasets(dataset_dir: str | Path, *, ranking: bool = False, for_training: bool = True) -> list[str]:
    """Datasets of dataset_info.json that LLaMA-Factory can load now: a local `file_name` must exist (hub
    entries are kept). For training, test splits are left out; otherwise they come first."""
    dataset_dir = Path(dataset_dir)
    try:
        info = json.loads((dataset_dir / "dataset_info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = [name for name, entry in info.items() if isinstance(entry, dict)
             and bool(entry.get("ranking", False)) == ranking
             and ("file_name" not in entry or (dataset_dir / str(entry["file_name"])).exists())]
    if for_training:
        return [n for n in names if not is_test_split(n)]
    return sorted(names, key=lambda n: not is_test_split(n))


# ----------------------------------------------------------------------------- recipes -> LlamaBoard configs
def _abs(root: Path, value: str) -> str:
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def run_name(runs_dir: Path, name: str, now: str) -> str:
    """`name` unless runs/<name>/adapter already holds something (a finished or resumable run): NAME_<now>."""
    adapter = runs_dir / name / "adapter"
    return f"{name}_{now}" if adapter.is_dir() and any(adapter.iterdir()) else name


def recipe_config(recipe: Path, root: Path, *, accelerator: bool, now: str) -> dict[str, Any]:
    """A LlamaBoard config (element id -> value) that trains what `recipe` trains, into runs/<name>/adapter.

    Keys with a widget fill it; the rest go to "Extra arguments" (JSON, applied last by LlamaBoard), so the
    arguments LLaMA-Factory gets are the recipe's. Paths in the recipe are relative to the project folder."""
    from llamafactory.extras.constants import TRAINING_STAGES

    from llamafactory_ext.review import read_yaml

    args = read_yaml(recipe)
    if not args:
        raise UserError(f"{recipe}: empty or not a mapping of LLaMA-Factory arguments")
    take = args.pop
    notes: list[str] = []
    stage = take("stage", "sft")
    stages = {v: k for k, v in TRAINING_STAGES.items()}
    if stage not in stages:
        raise UserError(f"{recipe}: stage {stage!r} is not one of {', '.join(stages)}")
    for key in ("do_train", "output_dir", "overwrite_output_dir", "plot_loss"):  # LlamaBoard sets these
        take(key, None)
    model = str(take("model_name_or_path", ""))
    model_path = model
    if model and ((root / model).exists() or model.startswith((".", "/", "~")) or model.count("/") != 1):
        model_path = _abs(root, model)  # a folder (relative to the project), not an org/name hub id
        if not Path(model_path).exists():
            from llamafactory_ext import families

            fam = next((f for f in families.FAMILIES.values() if f.local and f.model == model), None)
            how = f"`llamafactory-ext {fam.builder[0]}` in {root}" if fam else "copy or build it there"
            notes.append(f"the model folder {model_path} does not exist yet: {how}")
    dataset_dir = _abs(root, take("dataset_dir", "data"))
    datasets = [d.strip() for d in str(take("dataset", "") or "").split(",") if d.strip()]
    missing = [d for d in datasets if d not in available_datasets(dataset_dir)]
    if missing:
        notes.append(f"dataset(s) {', '.join(missing)} not built yet: run `make data` (or `llamafactory-ext data`)")
    precision = [k for k in ("pure_bf16", "bf16", "fp16") if take(k, False)]
    compute = precision[0] if precision else "fp32"
    if not accelerator and compute != "fp32":
        notes.append(f"compute type fp32: no GPU here (the recipe's {compute} needs one)")
        compute = "fp32"
    flash, liger = take("flash_attn", "auto"), take("enable_liger_kernel", False)
    deepspeed = take("deepspeed", None)
    if deepspeed and accelerator:
        args["deepspeed"] = _abs(root, deepspeed)  # the project's config, exactly; LlamaBoard adds FORCE_TORCHRUN
    elif deepspeed:
        notes.append("DeepSpeed off: no GPU here")
    if liger and not accelerator:
        notes.append("Liger kernel off: no GPU here")
    qbit = take("quantization_bit", None)
    name = run_name(root / "runs", recipe.stem, now)
    cfg: dict[str, Any] = {
        "top.model_name": "Custom", "top.model_path": model_path,
        "top.finetuning_type": take("finetuning_type", "lora"), "top.checkpoint_path": [],
        "top.quantization_bit": str(qbit) if qbit else "none",
        "top.quantization_method": take("quantization_method", "bnb"),
        "top.template": take("template", "default"), "top.rope_scaling": take("rope_scaling", None) or "none",
        "top.booster": "liger_kernel" if liger and accelerator else "flashattn2" if flash == "fa2" else "auto",
        "train.training_stage": stages[stage], "train.dataset_dir": dataset_dir, "train.dataset": datasets,
        "train.compute_type": compute, "train.output_dir": name, "train.ds_stage": "none", "train.ds_offload": False,
    }
    if flash != "auto" and cfg["top.booster"] != "flashattn2":  # one booster widget: Liger + FA2 needs the key
        args["flash_attn"] = flash
    for key, elem, cast in (
        ("learning_rate", "learning_rate", str), ("num_train_epochs", "num_train_epochs", str),
        ("max_grad_norm", "max_grad_norm", str), ("max_samples", "max_samples", str),
        ("cutoff_len", "cutoff_len", int), ("per_device_train_batch_size", "batch_size", int),
        ("gradient_accumulation_steps", "gradient_accumulation_steps", int), ("val_size", "val_size", float),
        ("lr_scheduler_type", "lr_scheduler_type", str), ("logging_steps", "logging_steps", int),
        ("save_steps", "save_steps", int), ("warmup_steps", "warmup_steps", int),
        ("packing", "packing", bool), ("neat_packing", "neat_packing", bool),
        ("train_on_prompt", "train_on_prompt", bool), ("mask_history", "mask_history", bool),
        ("resize_vocab", "resize_vocab", bool), ("enable_thinking", "enable_thinking", bool),
        ("report_to", "report_to", str), ("lora_rank", "lora_rank", int), ("lora_alpha", "lora_alpha", int),
        ("lora_dropout", "lora_dropout", float), ("loraplus_lr_ratio", "loraplus_lr_ratio", float),
        ("lora_target", "lora_target", str), ("additional_target", "additional_target", str),
        ("use_rslora", "use_rslora", bool), ("use_dora", "use_dora", bool),
        ("create_new_adapter", "create_new_adapter", bool),
    ):
        if key in args:
            cfg[f"train.{elem}"] = cast(take(key))
    cfg.setdefault("train.max_samples", "100000")  # LlamaBoard always passes one; "100000" is its default
    cfg["train.extra_args"] = json.dumps(args)  # everything else, verbatim (LlamaBoard applies it last)
    where = root / "runs" / name / "adapter"
    cfg["train.output_box"] = "\n\n".join([f"Loaded {RECIPE_CONFIGS}/{recipe.name}: trains into `{where}`."]
                                           + [f"Note: {n}." for n in notes])
    return cfg


# ----------------------------------------------------------------------------- LlamaBoard wiring
def _runs_with_weights(runs_dir: Path) -> list[str]:
    from llamafactory.extras.constants import CHECKPOINT_NAMES

    if not runs_dir.is_dir():
        return []
    return sorted(d.name for d in runs_dir.iterdir()
                  if any((d / "adapter" / n).is_file() for n in CHECKPOINT_NAMES))


def wire_llamaboard(root: Path) -> None:
    """Point LlamaBoard at the project: recipes as configs, runs/ for outputs, only loadable datasets, fp32
    without a GPU. Replaces module-level functions of llamafactory.webui 0.9.5 (checked) before the UI is built."""
    import importlib

    import gradio as gr
    import llamafactory
    from transformers.trainer_utils import get_last_checkpoint

    if llamafactory.__version__ != LLAMAFACTORY_VERSION:
        raise UserError(f"the WebUI is wired to LLaMA-Factory {LLAMAFACTORY_VERSION}'s LlamaBoard, found "
                        f"{llamafactory.__version__}; reinstall the pinned set (`make install`)")
    mods = {n: importlib.import_module(f"llamafactory.webui.{n}") for n in
            ("common", "control", "runner", "chatter", "components.top", "components.train", "components.eval",
             "components.export")}
    from llamafactory.extras.constants import PEFT_METHODS, STAGES_USE_PAIR_DATA, TRAINING_STAGES
    from llamafactory.extras.misc import is_accelerator_available

    from llamafactory_ext.fileio import atomic_write_text

    runs_dir = root / "runs"
    config_dir = mods["common"].DEFAULT_CONFIG_DIR
    accelerator = is_accelerator_available()
    eval_names: set[str] = set()
    stock = {"load_args": mods["runner"].load_args, "save_cmd": mods["runner"].save_cmd,
             "get_model_info": mods["control"].get_model_info, "list_config_paths": mods["control"].list_config_paths,
             "parse_eval": mods["runner"].Runner._parse_eval_args, "clean": mods["common"]._clean_cmd}

    def get_save_dir(*paths: str) -> str:
        """Output dir NAME -> runs/NAME/adapter (training) or runs/NAME (evaluation); a path stays a path."""
        if os.path.sep in paths[-1]:
            return paths[-1]
        if len(paths) < 3:
            return str(runs_dir)
        name = paths[-1].replace(" ", "").strip()
        return str(runs_dir / name) if name in eval_names else str(runs_dir / name / "adapter")

    def parse_eval_args(self, data):
        eval_names.add(str(data[self.manager.get_elem_by_id("eval.output_dir")]).replace(" ", "").strip())
        return stock["parse_eval"](self, data)

    def save_cmd(args: dict) -> str:
        path = stock["save_cmd"](args)
        out = Path(args["output_dir"]).resolve()
        if out.name == "adapter" and out.parent.parent == runs_dir.resolve():  # what `run sft` writes too
            import yaml

            atomic_write_text(out.parent / "sft_args.yaml",
                              yaml.safe_dump(stock["clean"](args), sort_keys=False, allow_unicode=True))
        return path

    def load_args(path: str):
        rel = Path(os.path.relpath(path, config_dir))
        if rel.parts[:1] == (RECIPE_CONFIGS,) and not Path(path).exists():
            try:
                return recipe_config(root / rel, root, accelerator=accelerator, now=time.strftime("%Y%m%d-%H%M%S"))
            except UserError as e:
                return {"train.output_box": f"error: {e}"}
        return stock["load_args"](path)

    def list_config_paths(current_time: str):
        choices = stock["list_config_paths"](current_time).choices
        recipes = sorted((root / RECIPE_CONFIGS).glob("*.yaml"))
        return gr.Dropdown(choices=[c for c, _ in choices] + [f"{RECIPE_CONFIGS}/{p.name}" for p in recipes])

    def get_model_info(model_name: str):
        if model_name == "Custom":  # keep the path and template typed or loaded (stock clears them)
            return gr.update(), gr.update()
        return stock["get_model_info"](model_name)

    def list_checkpoints(model_name: str, finetuning_type: str):
        multi = finetuning_type in PEFT_METHODS
        return gr.Dropdown(value=[] if multi else None, choices=_runs_with_weights(runs_dir), multiselect=multi)

    def list_output_dirs(model_name, finetuning_type, current_time: str):
        names = sorted(d.name for d in runs_dir.iterdir()
                       if (d / "adapter").is_dir() and get_last_checkpoint(str(d / "adapter"))) \
            if runs_dir.is_dir() else []
        return gr.Dropdown(choices=[f"train_{current_time}"] + names)

    def list_train_datasets(dataset_dir=None, training_stage=list(TRAINING_STAGES)[0]):
        ranking = TRAINING_STAGES[training_stage] in STAGES_USE_PAIR_DATA
        return gr.Dropdown(choices=available_datasets(dataset_dir or root, ranking=ranking))

    def list_eval_datasets(dataset_dir=None):
        return gr.Dropdown(choices=available_datasets(dataset_dir or root, for_training=False))

    replace = {
        "common": {"get_save_dir": get_save_dir}, "control": {"get_save_dir": get_save_dir},
        "chatter": {"get_save_dir": get_save_dir}, "components.export": {"get_save_dir": get_save_dir},
        "runner": {"get_save_dir": get_save_dir, "save_cmd": save_cmd, "load_args": load_args},
        "components.top": {"get_model_info": get_model_info, "list_checkpoints": list_checkpoints},
        "components.train": {"list_checkpoints": list_checkpoints, "list_output_dirs": list_output_dirs,
                             "list_config_paths": list_config_paths, "list_datasets": list_train_datasets},
        "components.eval": {"list_datasets": list_eval_datasets},
    }
    for mod_name, names in replace.items():
        for name, fn in names.items():
            if not callable(getattr(mods[mod_name], name, None)):
                raise UserError(f"llamafactory.webui.{mod_name}.{name} is gone: not the pinned LLaMA-Factory "
                                f"{LLAMAFACTORY_VERSION}; reinstall the pinned set (`make install`)")
            setattr(mods[mod_name], name, fn)
    mods["runner"].Runner._parse_eval_args = parse_eval_args


def create_ui(root: Path, engine=None):
    """LlamaBoard (llamafactory.webui.interface.create_ui of 0.9.5) with the "Review a paper" tab; `engine`: a
    llamafactory.webui.engine.Engine to build it on (a new one by default)."""
    import gradio as gr
    from llamafactory.extras.misc import is_accelerator_available
    from llamafactory.webui.common import save_config
    from llamafactory.webui.components import (
        create_eval_tab,
        create_export_tab,
        create_footer,
        create_infer_tab,
        create_top,
        create_train_tab,
    )
    from llamafactory.webui.css import CSS
    from llamafactory.webui.engine import Engine

    engine = engine or Engine(demo_mode=False, pure_chat=False)
    with gr.Blocks(title=f"LLaMA Factory ({socket.gethostname().split('.')[0]})", css=CSS) as demo:
        title, subtitle = gr.HTML(), gr.HTML()
        engine.manager.add_elems("head", {"title": title, "subtitle": subtitle})
        engine.manager.add_elems("top", create_top())
        lang = engine.manager.get_elem_by_id("top.lang")
        with gr.Tab("Train"):
            engine.manager.add_elems("train", create_train_tab(engine))
        with gr.Tab("Evaluate & Predict"):
            engine.manager.add_elems("eval", create_eval_tab(engine))
        with gr.Tab("Chat"):
            engine.manager.add_elems("infer", create_infer_tab(engine))
        with gr.Tab("Review a paper"):
            create_review_tab(root)
        with gr.Tab("Export"):
            engine.manager.add_elems("export", create_export_tab(engine))
        engine.manager.add_elems("footer", create_footer())
        if not is_accelerator_available():
            engine.manager.get_elem_by_id("train.compute_type").value = "fp32"  # bf16 fails on a CPU
        demo.load(engine.resume, outputs=engine.manager.get_elem_list(), concurrency_limit=None)
        lang.change(engine.change_lang, [lang], engine.manager.get_elem_list(), queue=False)
        lang.input(save_config, inputs=[lang], queue=False)
    return demo


# ----------------------------------------------------------------------------- the Review tab
def create_review_tab(root: Path) -> dict:
    """Upload a paper, pick a run, read the review. `review_paper` does the work (as `llamafactory-ext review`);
    the click is the API endpoint "review": (file, run, temperature, max_new_tokens) -> Markdown."""
    import gradio as gr

    from llamafactory_ext import review
    from llamafactory_ext import sections as review_sections

    runs_dir = root / "runs"
    out_dir = Path(tempfile.mkdtemp(prefix="llamafactory-ext-reviews-"))

    def run_names() -> list[str]:
        return [d.name for d in review.find_runs(runs_dir)]

    def new_tokens_for(run: str | None) -> int:
        try:
            spec = review.resolve_model(_model_for(run) or review.default_run(runs_dir))
        except UserError:
            return review.DEFAULT_MAX_NEW_TOKENS
        return review.family_defaults(spec.template)[1] if spec.template else review.DEFAULT_MAX_NEW_TOKENS

    def _model_for(run: str | None) -> Path | None:
        """"" -> None (the newest run); a run's name -> runs/NAME; else a folder (relative to the project)."""
        run = (run or "").strip()
        if not run:
            return None
        if "/" not in run and (runs_dir / run).is_dir():
            return runs_dir / run
        path = Path(_abs(root, run))
        if not path.exists():
            raise UserError(f"no run {run!r} in {runs_dir} (trained runs: {', '.join(run_names()) or 'none'}), "
                            f"and no folder {path}")
        return path

    def do_review(paper, run, temperature, max_new_tokens, progress=gr.Progress()):  # noqa: B008 (gradio's way)
        if not paper:
            raise gr.Error("Upload a paper first (.pdf, .txt or .md).")
        started = time.monotonic()
        try:
            r = review.review_paper(
                paper, _model_for(run), runs_dir=runs_dir,
                temperature=0.35 if temperature is None else float(temperature),
                max_new_tokens=int(max_new_tokens) if max_new_tokens else None,
                progress=lambda fraction, what: progress(fraction, desc=what))
        except UserError as e:
            raise gr.Error(str(e)) from None
        r["seconds"] = time.monotonic() - started
        target = out_dir / f"{Path(paper).stem}.review.md"
        target.write_text(r["markdown"], encoding="utf-8")
        r["file"] = str(target)
        return r["markdown"], r

    def details(r: dict):
        missing = [review_sections.HEADERS[k] for k in review_sections.SECTION_KEYS if not r["sections"].get(k)]
        items = review.summary_items(r) + [("generation", f"at most {r['max_new_tokens']} new tokens, "
                                                          f"{r['seconds']:.1f} s")]
        if missing:
            items.append(("missing section(s)", f"**{', '.join(missing)}** (the model did not write them)"))
        return "\n".join(f"- {k}: {v}" for k, v in items), gr.DownloadButton(value=r["file"], visible=True)

    names = run_names()
    with gr.Row():
        with gr.Column(scale=2):
            paper = gr.File(label="Paper (.pdf, .txt or .md)", file_types=[".pdf", ".txt", ".md", ".markdown"], type="filepath",
                            elem_id="review_paper")
        with gr.Column(scale=3):
            run = gr.Dropdown(choices=names, value=names[0] if names else None, allow_custom_value=True,
                              label="Trained run", elem_id="review_run",
                              info=f"{runs_dir}/NAME: its merged/ model, else its LoRA adapter/ on the base model "
                                   f"of its sft_args.yaml (empty: the newest run); or a model folder")
            with gr.Row():
                temperature = gr.Slider(0, 1.5, value=0.35, step=0.05, label="Temperature (0 = greedy)")
                max_new_tokens = gr.Slider(1, 4096, value=new_tokens_for(names[0] if names else None), step=1,
                                           label="Max new tokens")
            button = gr.Button("Review", variant="primary", elem_id="review_button")
    status = gr.Markdown(elem_id="review_status")
    download = gr.DownloadButton("Download the review (.md)", visible=False, elem_id="review_download")
    output = gr.Markdown(elem_id="review_output")
    result = gr.State()

    run.focus(lambda: gr.Dropdown(choices=run_names()), None, run, queue=False, api_name=False)
    run.input(new_tokens_for, run, max_new_tokens, queue=False, api_name=False)
    button.click(lambda: ("", gr.DownloadButton(visible=False)), None, [status, download], queue=False,
                 api_name=False)
    button.click(do_review, [paper, run, temperature, max_new_tokens], [output, result], api_name="review",
                 concurrency_limit=1).success(details, result, [status, download], api_name=False)
    return {"paper": paper, "run": run, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "button": button, "status": status, "download": download, "output": output}


def prepare_environment(host: str) -> Path:
    """Process env inherited by the WebUI and every training subprocess it starts.

    Puts this interpreter's bin/ first on PATH: LLaMA-Factory's runner starts a bare
    `llamafactory-cli train <yaml>` (and that re-launches `torchrun`), so without this a shell
    without the venv activated would run another install, or none, without our fixes.
    """
    venv_bin = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != str(venv_bin):
        os.environ["PATH"] = os.pathsep.join([str(venv_bin), path]) if path else str(venv_bin)
    if not (venv_bin / "llamafactory-cli").exists():
        print(f"warning: {venv_bin}/llamafactory-cli not found: training started from the WebUI "
              f"will fail; reinstall this project into the venv it runs from.", file=sys.stderr)
    # No phoning home (gradio analytics / version check); offline machines must not wait on it.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # gradio checks its own URL over HTTP after start-up: never send that through a proxy.
    for var in ("no_proxy", "NO_PROXY"):
        entries = [e for e in os.environ.get(var, "").split(",") if e]
        for h in ("localhost", "127.0.0.1", "::1", host):
            if h not in entries:
                entries.append(h)
        os.environ[var] = ",".join(entries)
    return venv_bin


def set_default_dataset_dir(dataset_dir: Path) -> None:
    """Make `dataset_dir` the WebUI's default dataset folder (Train and Evaluate tabs)."""
    import importlib

    for name in DATA_DIR_MODULES:
        mod = importlib.import_module(name)
        if not hasattr(mod, "DEFAULT_DATA_DIR"):
            raise RuntimeError(f"{name}.DEFAULT_DATA_DIR is gone: this LLaMA-Factory is not the pinned 0.9.5")
        mod.DEFAULT_DATA_DIR = str(dataset_dir)
    for name, mod in list(sys.modules.items()):  # any other module that copied the name
        if name.startswith("llamafactory.webui") and hasattr(mod, "DEFAULT_DATA_DIR"):
            mod.DEFAULT_DATA_DIR = str(dataset_dir)


def run(args: argparse.Namespace) -> int:
    host = str(args.host).strip().strip("[]")  # "[::1]" -> "::1", as sockets and uvicorn want it
    port = parse_port(args.port)
    auth = parse_auth(args.auth)
    dataset_dir = resolve_dataset_dir(args.dataset_dir)

    if not is_loopback(host):
        print(f"WARNING: the WebUI will listen on {host}:{port}, reachable from other machines. It can start "
              f"processes and read files on this machine.", file=sys.stderr)
        if auth is None:
            print("WARNING: no login is set: anyone who reaches the port gets full control. Set "
                  "WEBUI_AUTH=user:password (or --auth), or keep HOST=127.0.0.1 and use an SSH tunnel "
                  "(ssh -L 6006:127.0.0.1:6006 user@box).", file=sys.stderr)
        else:
            print("WARNING: the login travels over plain HTTP; an SSH tunnel is safer.", file=sys.stderr)
    check_port_free(host, port)  # before the slow imports, and before gradio could pick another port
    venv_bin = prepare_environment(host)

    set_default_dataset_dir(dataset_dir)
    wire_llamaboard(dataset_dir)

    shown = f"[{host}]" if ":" in host else host
    print(f"LlamaBoard: http://{shown}:{port}  (datasets: {dataset_dir}/dataset_info.json; recipes: "
          f"{dataset_dir}/{RECIPE_CONFIGS}; runs: {dataset_dir}/runs; training runs {venv_bin}/llamafactory-cli; "
          f"side files {', '.join(SIDE_FILES)} in {Path.cwd()})", flush=True)
    # a server's log shows each line when it happens, also when it goes to a file (nohup, `> webui.log`)
    sys.stdout.reconfigure(line_buffering=True)
    try:
        create_ui(dataset_dir).queue().launch(
            server_name=host, server_port=port, share=False, inbrowser=False, auth=auth,
            ssr_mode=False, show_error=True,
        )
    except OSError as e:  # lost a race for the port between our check and gradio's bind
        raise UserError(f"cannot listen on {host}:{port} ({e}); pick another port: PORT=... or --port ...") from e
    return 0
