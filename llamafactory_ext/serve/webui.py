"""LLaMA-Factory's WebUI (LlamaBoard), safe by default, wired to this project, with a "Review a paper" tab.

Differences from `llamafactory-cli webui`:
  - binds to 127.0.0.1 (stock binds to 0.0.0.0: an unauthenticated page that can start processes
    and read paths on the machine); another host prints a warning, and --auth / WEBUI_AUTH adds a
    login (gradio's auth; it covers every tab and the API, the review endpoint included);
  - the port is fixed (6006 unless --port / WEBUI_PORT / make webui PORT=): a port in use is an error, never a silent move
    to the next free one; no browser is opened and nothing is shared through gradio.live;
  - the project (--dataset-dir, default: the project root, project.py) is wired in (serve/llamaboard.py): its
    recipes are configs, its runs/ holds the outputs, only its built datasets are listed, no test split is
    offered for training, and the compute type is fp32 on a machine without a GPU;
  - "Review a paper": upload a PDF/TXT/MD, pick a run (default: the newest trained run), read the review in its
    four sections and download it; the same code as `llamafactory-ext review` (the family's sampling defaults),
    also a gradio API endpoint: `Client(url).predict(handle_file("p.pdf"), "", 0.35, 400, api_name="/review")`
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
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from llamafactory_ext import UserError, families

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6006
SIDE_FILES = ("llamaboard_cache/", "llamaboard_config/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # WEBUI_HOST/WEBUI_PORT, not the generic HOST/PORT many shells and platforms export (tcsh sets
    # HOST to the machine's name): those must never silently move the UI onto the network.
    p.add_argument("--host", default=os.environ.get("WEBUI_HOST") or DEFAULT_HOST,
                   help="address to listen on (env WEBUI_HOST; make webui HOST=...; default %(default)s, this machine only)")
    p.add_argument("--port", default=os.environ.get("WEBUI_PORT") or str(DEFAULT_PORT),
                   help="port to listen on (env WEBUI_PORT; make webui PORT=...; default %(default)s)")
    p.add_argument("--auth", default=os.environ.get("WEBUI_AUTH") or None, metavar="USER:PASSWORD",
                   help="require this login (env WEBUI_AUTH; prefer the env var: arguments show in `ps`)")
    p.add_argument("--dataset-dir", default=None,
                   help="the project folder: dataset_info.json (the default dataset folder), sft_recipes/ "
                        "(offered as configs) and runs/ (training outputs, runs to review) (default: the project root)")


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


def resolve_project(value: str | None):
    """The project the page serves: --dataset-dir, else the project root (project.py)."""
    from llamafactory_ext import project

    if value is None:
        return project.get()
    d = Path(value).expanduser().resolve()
    if not d.is_dir():
        raise UserError(f"dataset folder {value} does not exist; pass --dataset-dir <folder holding "
                        f"dataset_info.json>")
    if not (d / "dataset_info.json").is_file():
        print(f"warning: no dataset_info.json in {d}: the WebUI's dataset list will be empty. Register a "
              f"dataset with `llamafactory-ext register`, or pass --dataset-dir <folder>.", file=sys.stderr)
    return project.Project(d)


def create_ui(project, engine=None):
    """LlamaBoard (llamafactory.webui.interface.create_ui of 0.9.5, fingerprinted in patches.py) with the "Review a
    paper" tab; `engine`: a llamafactory.webui.engine.Engine to build it on (a new one by default)."""
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
            create_review_tab(project)
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
def create_review_tab(project) -> dict:
    """Upload a paper, pick a run, read the review. `review_paper` does the work (as `llamafactory-ext review`);
    the click is the API endpoint "review": (file, run, temperature, max_new_tokens) -> Markdown."""
    import gradio as gr

    from llamafactory_ext.eval import sections as review_sections
    from llamafactory_ext.serve import review
    from llamafactory_ext.train import runs

    runs_dir = project.runs
    out_dir = Path(tempfile.mkdtemp(prefix="llamafactory-ext-reviews-"))

    def run_names() -> list[str]:
        return [t.dir.name for t in runs.trained_runs(runs_dir)]

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
        path = project.path(run)
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
                temperature=families.TEMPERATURE if temperature is None else float(temperature),
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
                temperature = gr.Slider(0, 1.5, value=families.TEMPERATURE, step=0.05, label="Temperature (0 = greedy)")
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


def run(args: argparse.Namespace) -> int:
    host = str(args.host).strip().strip("[]")  # "[::1]" -> "::1", as sockets and uvicorn want it
    port = parse_port(args.port)
    auth = parse_auth(args.auth)
    proj = resolve_project(args.dataset_dir)

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

    from llamafactory_ext.serve import llamaboard

    llamaboard.set_default_dataset_dir(proj.root)
    llamaboard.wire(proj)

    shown = f"[{host}]" if ":" in host else host
    print(f"LlamaBoard: http://{shown}:{port}  (datasets: {proj.dataset_info}; recipes: "
          f"{proj.recipes}; runs: {proj.runs}; training runs {venv_bin}/llamafactory-cli; "
          f"side files {', '.join(SIDE_FILES)} in {Path.cwd()})", flush=True)
    # a server's log shows each line when it happens, also when it goes to a file (nohup, `> webui.log`)
    sys.stdout.reconfigure(line_buffering=True)
    try:
        create_ui(proj).queue().launch(
            server_name=host, server_port=port, share=False, inbrowser=False, auth=auth,
            ssr_mode=False, show_error=True,
        )
    except OSError as e:  # lost a race for the port between our check and gradio's bind
        raise UserError(f"cannot listen on {host}:{port} ({e}); pick another port: PORT=... or --port ...") from e
    return 0
