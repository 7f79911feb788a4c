"""`llamafactory-ext webui`: the real LlamaBoard in a real browser (Debian's chromium + Playwright).

One WebUI server per module (gradio start-up takes seconds). It is started as users start it, but
with PATH=/usr/bin:/bin (no venv on it): training launched from the page must still run this
venv's `llamafactory-cli`, with the RoPE fix active.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import VENV_BIN, cli_env

from llamafactory_ext import cli

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium missing: `apt-get install -y chromium` (CI installs it)")
ROWS = [{"instruction": "Review the paper.", "input": f"Paper {i} studies attention.", "output": f"Verdict {i}."}
        for i in range(4)]
LOCAL_ONLY = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")  # the page must not wait on the internet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def webui_env(**extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    for var in ("WEBUI_HOST", "WEBUI_PORT", "WEBUI_AUTH"):
        if var not in extra:
            env.pop(var, None)
    return env


class Server:
    """A `llamafactory-ext webui` subprocess in its own session (so its training children die with it)."""

    def __init__(self, cwd: Path, args: list[str], env: dict[str, str], port: int):
        self.cwd, self.port, self.log = cwd, port, cwd / "webui.log"
        cwd.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(VENV_BIN / "llamafactory-ext"), "webui", *args], cwd=cwd, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"webui exited with {self.proc.returncode}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"webui did not listen on port {port} within 240 s:\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder with dataset_info.json: two SFT datasets and one ranking dataset."""
    d = tmp_path_factory.mktemp("project")
    (d / "sample.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "dataset_info.json").write_text(json.dumps({
        "sample_train": {"file_name": "sample.jsonl"},
        "sample_test": {"file_name": "sample.jsonl"},
        "sample_pairs": {"file_name": "sample.jsonl", "ranking": True},  # DPO only: not in the SFT list
    }))
    return d


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    """The WebUI on a free port set through PORT, default host, no venv on PATH, run from its own CWD."""
    port = free_port()
    srv = Server(tmp_path_factory.mktemp("webui_cwd"), ["--dataset-dir", str(project)],
                 webui_env(WEBUI_PORT=str(port), PATH="/usr/bin:/bin"), port)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium missing: `apt-get install -y chromium` (CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.route(LOCAL_ONLY, lambda route: route.abort())
    page.goto(server.url, wait_until="domcontentloaded")
    yield page
    page.close()


def pick(page, label: str, value: str, *, type_to_filter: bool = True) -> None:
    """Choose `value` in a gradio dropdown (long lists: type to filter first)."""
    box = page.get_by_role("textbox" if label == "Dataset" else "listbox", name=label, exact=True)
    box.click()
    if type_to_filter:
        box.fill(value)
    page.get_by_role("option", name=value, exact=True).click()


def fill_until_it_sticks(page, box, value: str, settle_ms: int = 1500, tries: int = 20) -> None:
    """Gradio handlers fired by earlier choices (the model dropdown resets the path box) may land after
    our edit; fill again until the value survives a quiet period."""
    for _ in range(tries):
        box.fill(value)
        box.press("Tab")
        page.wait_for_timeout(settle_ms)
        if box.input_value() == value:
            return
    raise AssertionError(f"the page kept resetting the box to {box.input_value()!r}")


def test_listens_on_loopback_only_by_default(server):
    import psutil

    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening, f"no listening socket found:\n{server.output()}"
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", server.port)}, listening
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in server.output()


@needs_chromium
def test_page_lists_the_project_datasets(page, server, project, artifacts_dir):
    page.get_by_role("heading", name=re.compile("LLaMA Factory")).wait_for()
    assert page.get_by_role("tab", name="Train").is_visible()
    data_dir = page.get_by_role("textbox", name=re.compile(r"^Data dir"))
    assert data_dir.input_value() == str(project)

    page.get_by_role("textbox", name="Dataset", exact=True).click()  # focus -> list_datasets()
    options = page.get_by_role("option")
    options.first.wait_for()
    names = sorted(t.strip().lstrip("✓").strip() for t in options.all_text_contents())
    assert names == ["sample_test", "sample_train"]  # the ranking dataset is not offered for SFT
    page.screenshot(path=str(artifacts_dir / "webui.png"))

    page.keyboard.press("Escape")
    page.get_by_role("tab", name="Evaluate & Predict").click()  # the other copy of DEFAULT_DATA_DIR
    assert page.get_by_role("textbox", name=re.compile(r"^Data dir")).input_value() == str(project)


@needs_chromium
@pytest.mark.slow
def test_training_started_from_the_page_gets_our_fixes(page, server, project, tiny_models, artifacts_dir):
    """Start SFT with RoPE scaling from the browser: stock LLaMA-Factory 0.9.5 on transformers 5 dies
    loading the model ("expected int, got float"); ours trains and logs the fix."""
    page.get_by_role("heading", name=re.compile("LLaMA Factory")).wait_for()
    pick(page, "Model name", "Custom")
    model_path = page.get_by_role("textbox", name=re.compile(r"^Model path"))
    fill_until_it_sticks(page, model_path, str(tiny_models["mistral"]))
    pick(page, "Chat template", "mistral")
    pick(page, "RoPE scaling", "linear", type_to_filter=False)
    pick(page, "Dataset", "sample_train", type_to_filter=False)
    page.keyboard.press("Escape")
    cutoff = page.get_by_role("spinbutton", name="number input for Cutoff length")
    cutoff.fill("65536")  # > the tiny model's 32768 positions: RoPE scaling factor 2
    cutoff.press("Enter")
    page.get_by_role("button", name=re.compile(r"^Extra configurations")).click()
    page.get_by_role("textbox", name=re.compile(r"^Extra arguments")).fill(json.dumps(
        {"optim": "adamw_torch", "bf16": False, "max_steps": 1, "preprocessing_num_workers": 1}))
    assert model_path.input_value() == str(tiny_models["mistral"])
    page.get_by_role("button", name="Start", exact=True).click()

    done = page.get_by_text(re.compile(r"^(Finished|Failed)\.")).first
    error = page.get_by_role("alert").filter(has_text="Error").first  # gradio's toast for an exception
    # LlamaBoard's own refusals ("Please choose a dataset.", "Model not found.", ...) end the wait too
    refused = page.get_by_text(re.compile(r"^(Please (select|choose|provide)|Model not found|A process is in running|"
                                          r"Invalid JSON|Config file is not found)")).first
    done.or_(error).or_(refused).first.wait_for(timeout=300_000)
    page.screenshot(path=str(artifacts_dir / "webui-train.png"))
    assert not error.is_visible(), f"{error.inner_text()}\n{server.output()}"
    assert not refused.is_visible(), f"LlamaBoard refused to start: {refused.inner_text()}\n{server.output()}"
    runs = list((server.cwd / "saves" / "Custom" / "lora").glob("train_*"))  # side files in the CWD
    assert len(runs) == 1, f"no run under {server.cwd}/saves:\n{server.output()}"
    run = runs[0]
    log = (run / "running_log.txt").read_text() if (run / "running_log.txt").exists() else ""
    assert (run / "adapter_model.safetensors").is_file(), f"training failed:\n{log}\n{server.output()}"
    assert "Using linear scaling strategy and setting scaling factor to 2.0" in log
    assert "fix from llamafactory_ext.patches" in log
    args = (run / "training_args.yaml").read_text()
    assert f"dataset_dir: {project}" in args and "rope_scaling: linear" in args
    # The server's PATH was /usr/bin:/bin, where there is no llamafactory-cli: the run above was the
    # venv's (webui put its bin/ first), and the log line shows our .pth import hook was active in it.
    assert shutil.which("llamafactory-cli", path="/usr/bin:/bin") is None


def _status(req: urllib.request.Request | str, opener=None) -> int:
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_auth_refuses_unauthenticated_requests(project, tmp_path):
    port = free_port()
    srv = Server(tmp_path, ["--port", str(port), "--dataset-dir", str(project)],
                 webui_env(WEBUI_AUTH="alice:s3:cr3t"), port)  # the password may contain ':'
    try:
        assert _status(f"{srv.url}/config") == 401
        assert _status(f"{srv.url}/gradio_api/info") == 401
        run_fn = urllib.request.Request(f"{srv.url}/gradio_api/queue/join", method="POST",
                                        data=json.dumps({"data": [], "fn_index": 0, "session_hash": "x"}).encode(),
                                        headers={"Content-Type": "application/json"})
        assert _status(run_fn) == 401

        def login(password: str):
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            body = urllib.parse.urlencode({"username": "alice", "password": password}).encode()
            return opener, _status(urllib.request.Request(f"{srv.url}/login", data=body), opener)

        _, code = login("wrong")
        assert code == 400
        opener, code = login("s3:cr3t")
        assert code == 200
        assert _status(f"{srv.url}/config", opener) == 200
    finally:
        srv.stop()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([str(VENV_BIN / "llamafactory-ext"), "webui"], env=webui_env(WEBUI_PORT=str(port)),
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"port {port} is already in use" in r.stderr
    assert "PORT=" in r.stderr and "--port" in r.stderr
    assert "Running on" not in r.stdout + r.stderr  # refused before gradio started


def test_public_host_warns_before_starting():
    with socket.socket() as busy:  # keep it from actually starting: the port is taken on all interfaces
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([str(VENV_BIN / "llamafactory-ext"), "webui", "--port", str(port)],
                           env=webui_env(WEBUI_HOST="0.0.0.0"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "WARNING: the WebUI will listen on 0.0.0.0" in r.stderr
    assert "WEBUI_AUTH=user:password" in r.stderr and "ssh -L" in r.stderr
    assert f"port {port} is already in use" in r.stderr


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({"WEBUI_AUTH": "alice"}, [], "USER:PASSWORD"),
    ({"WEBUI_AUTH": ":pw"}, [], "USER:PASSWORD"),
    ({}, ["--auth", "alice:"], "USER:PASSWORD"),
    ({"WEBUI_PORT": "http"}, [], "port 'http' is not a number"),
    ({}, ["--port", "70000"], "from 1 to 65535"),
    ({}, ["--dataset-dir", "/nonexistent/dir"], "dataset folder /nonexistent/dir does not exist"),
])
def test_bad_settings_are_user_errors(monkeypatch, capsys, env, argv, message):
    for var in ("WEBUI_HOST", "WEBUI_PORT", "WEBUI_AUTH"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["webui", *argv]) == 2
    assert message in capsys.readouterr().err
