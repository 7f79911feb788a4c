"""LLaMA-Factory's WebUI (LlamaBoard), safe by default, with the project's datasets in its list.

Differences from `llamafactory-cli webui`:
  - binds to 127.0.0.1 (stock binds to 0.0.0.0: an unauthenticated page that can start processes
    and read paths on the machine); another host prints a warning, and --auth / WEBUI_AUTH adds a
    login (gradio's auth);
  - the port is fixed (6006 unless --port / WEBUI_PORT / make webui PORT=): a port in use is an error, never a silent move
    to the next free one; no browser is opened and nothing is shared through gradio.live;
  - the dataset folder box defaults to --dataset-dir (the folder holding dataset_info.json), so
    datasets registered with `llamafactory-ext register` are listed without typing a path;
  - training started from the page runs this venv's `llamafactory-cli` (its bin/ goes first on
    PATH), so it gets the same fixes as `llamafactory-ext run sft` (the RoPE-scaling fix).
The WebUI keeps its side files in the current directory: llamaboard_cache/, llamaboard_config/
and saves/ (training outputs).

examples:
  llamafactory-ext webui                                  # http://127.0.0.1:6006
  WEBUI_PORT=7000 llamafactory-ext webui --dataset-dir data/    # or: make webui PORT=7000
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
from pathlib import Path

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
SIDE_FILES = ("llamaboard_cache/", "llamaboard_config/", "saves/")


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
                   help="folder holding dataset_info.json, the WebUI's default dataset folder (default: .)")


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
    from llamafactory.webui.interface import create_ui

    shown = f"[{host}]" if ":" in host else host
    print(f"LlamaBoard: http://{shown}:{port}  (datasets: {dataset_dir}/dataset_info.json; training runs "
          f"{venv_bin}/llamafactory-cli; side files {', '.join(SIDE_FILES)} in {Path.cwd()})", flush=True)
    try:
        create_ui().queue().launch(
            server_name=host, server_port=port, share=False, inbrowser=False, auth=auth,
            ssr_mode=False, show_error=True,
        )
    except OSError as e:  # lost a race for the port between our check and gradio's bind
        raise UserError(f"cannot listen on {host}:{port} ({e}); pick another port: PORT=... or --port ...") from e
    return 0
