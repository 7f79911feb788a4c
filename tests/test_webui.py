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
from conftest import ROOT, VENV_BIN, cli_env
from test_review import _make_pdf as make_pdf
from test_review import make_adapter_run

from llamafactory_ext import REVIEWER_INSTRUCTION, cli, families
from llamafactory_ext.eval.sections import HEADERS
from llamafactory_ext.project import Project

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium missing: `apt-get install -y chromium` (CI installs it)")
LOCAL_ONLY = re.compile(r"^https?://(?!127\.0\.0\.1[:/])")  # the page must not wait on the internet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# gradio_client's httpx default is 5 s; the first /gradio_api/info of a loaded LlamaBoard takes longer
SLOW_SERVER = {"timeout": 120}


def webui_env(**extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    # without it, gradio's "Running on local URL" reaches a log file only because webui line-buffers stdout
    for var in ("WEBUI_HOST", "WEBUI_PORT", "WEBUI_AUTH", "PYTHONUNBUFFERED"):
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
            except OSError:
                time.sleep(0.5)
                continue
            if "Running on local URL" in self.output():  # printed after the socket opens
                return
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"webui did not listen on port {port} and say so within 240 s:\n{self.output()}")

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
def reviewer(smollm2_workspace) -> dict:
    """The run the Review tab is tested with: the SmolLM2 reviewer trained on the sample (conftest.py
    `smollm2_workspace`: runs/smollm2_sample/{sft_args.yaml, adapter/, merged/}), which writes the four sections."""
    run = Path(smollm2_workspace) / "runs" / "smollm2_sample"
    return {"run": run, "name": run.name, "max_new_tokens": None}


@pytest.fixture(scope="module")
def project(tmp_path_factory, sample_jsonl, tiny_models, reviewer) -> Path:
    """A project folder as `make` leaves it: dataset_info.json (two built datasets, a registered one whose file
    was never built, a ranking one), every recipe of sft_recipes/, build/ (the tiny models the recipes name) and
    runs/ with the reviewer run."""
    d = tmp_path_factory.mktemp("project")
    rows = [json.loads(x) for x in sample_jsonl.read_text(encoding="utf-8").split("\n") if x.strip()]
    records = [{"instruction": REVIEWER_INSTRUCTION, "input": r["input"][:1500], "output": r["output"][:600]}
               for r in rows[:8]]
    (d / "data").mkdir()
    (d / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    (d / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[6:]))
    (d / "dataset_info.json").write_text(json.dumps({
        "sample_train": {"file_name": "data/train.jsonl"},
        "sample_test": {"file_name": "data/test.jsonl"},
        "paper_review_5k_mistral": {"file_name": "data/never_built.jsonl"},  # registered, not built
        "sample_pairs": {"file_name": "data/train.jsonl", "ranking": True},  # DPO only: not in the SFT list
    }))
    shutil.copytree(ROOT / "sft_recipes", d / "sft_recipes")
    (d / "build").symlink_to(ROOT / "build")
    (d / "runs").mkdir()
    (d / "runs" / reviewer["name"]).symlink_to(reviewer["run"])
    return d


@pytest.fixture(scope="module")
def review_pdf(sample_jsonl, tmp_path_factory) -> Path:
    """A sample paper (body + REFERENCES) as a text PDF."""
    rows = [json.loads(x) for x in sample_jsonl.read_text(encoding="utf-8").split("\n") if x.strip()]
    text = next(r["input"] for r in rows if "\nREFERENCES\n" in r["input"])
    refs = text.index("\nREFERENCES\n")
    return make_pdf(text[:4000].rsplit("\n", 1)[0] + "\n" + text[refs:refs + 1500],
                    tmp_path_factory.mktemp("pdf") / "paper.pdf")


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    """The WebUI on a free port set through WEBUI_PORT, default host, no venv on PATH, run from its own CWD."""
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
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.route(LOCAL_ONLY, lambda route: route.abort())
    page.goto(server.url, wait_until="domcontentloaded")
    yield page
    page.close()


def options(page) -> list[str]:
    """The texts of the open dropdown's options (selected ones carry a check mark)."""
    page.get_by_role("option").first.wait_for()
    return [t.strip().lstrip("✓").strip() for t in page.get_by_role("option").all_text_contents()]


def listbox(page, label: str):
    return page.get_by_role("listbox", name=re.compile(rf"^{re.escape(label)}"))


def number(page, label: str):
    return page.get_by_role("spinbutton", name=f"number input for {label}")


@pytest.fixture(scope="module")
def llamaboard(tmp_path_factory):
    """LlamaBoard's own argument builder (Runner._parse_train_args) on a UI built in this process, wired to the
    repository's project folder (llamaboard_cache/ goes to a temp folder, not the repo)."""
    from llamafactory_ext.serve import llamaboard, webui

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("llamaboard_cwd"))
    try:
        llamaboard.wire(Project(ROOT))
        from llamafactory.webui.engine import Engine

        engine = Engine()
        webui.create_ui(Project(ROOT), engine)
    finally:
        os.chdir(cwd)

    def train_args(config: dict) -> dict:
        manager = engine.manager
        data = {elem: getattr(elem, "value", None) for elem in manager.get_elem_list()}
        data.update({manager.get_elem_by_id(k): v for k, v in config.items() if k != "train.output_box"})
        return engine.runner._parse_train_args(data)

    return train_args


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu", "gpu"])
@pytest.mark.slow
def test_every_recipe_loads_as_a_llamaboard_config(llamaboard, accelerator):
    """Each sft_recipes/*.yaml, loaded as a config, makes LlamaBoard pass LLaMA-Factory the recipe's arguments:
    paths resolved in the project, output in runs/<recipe>/adapter; without a GPU fp32 and no DeepSpeed."""
    import yaml

    from llamafactory_ext.serve import llamaboard as board

    recipes = sorted((ROOT / "sft_recipes").glob("*.yaml"))
    assert len(recipes) >= 7
    for path in recipes:
        recipe = yaml.safe_load(path.read_text())
        config = board.recipe_config(path, Project(ROOT), accelerator=accelerator, now="T")
        args = llamaboard(config)
        resolved = {"model_name_or_path", "dataset_dir", "output_dir", "deepspeed", "overwrite_output_dir"}
        needs_gpu = {"bf16", "fp16", "pure_bf16", "enable_liger_kernel"} if not accelerator else set()
        for key, value in recipe.items():
            if key in resolved | needs_gpu:
                continue
            assert args.get(key) == value, f"{path.name}: {key} = {args.get(key)!r}, the recipe says {value!r}"
        model = recipe["model_name_or_path"]
        assert args["model_name_or_path"] == (model if model.count("/") == 1 else str((ROOT / model).resolve()))
        assert args["dataset_dir"] == str((ROOT / recipe.get("dataset_dir", "data")).resolve())
        name = path.stem if not (ROOT / "runs" / path.stem / "adapter").exists() else f"{path.stem}_T"
        assert args["output_dir"] == str(ROOT / "runs" / name / "adapter")
        if accelerator:
            assert args.get("deepspeed") == (str(ROOT / recipe["deepspeed"]) if "deepspeed" in recipe else None)
        else:
            assert not any(args.get(k) for k in ("bf16", "fp16", "pure_bf16", "deepspeed", "enable_liger_kernel"))
            if recipe.get("bf16"):
                assert "compute type fp32: no GPU here (the recipe's bf16 needs one)" in config["train.output_box"]
            if recipe.get("deepspeed"):
                assert "DeepSpeed off: no GPU here" in config["train.output_box"]


def test_a_recipe_says_what_is_missing(tmp_path):
    """A fresh project: the recipe's model and dataset are not built yet; loading it says how to build them."""
    from llamafactory_ext.serve import llamaboard

    (tmp_path / "sft_recipes").mkdir()
    recipe = shutil.copy(ROOT / "sft_recipes" / "tiny_sample.yaml", tmp_path / "sft_recipes")
    (tmp_path / "runs" / "tiny_sample" / "adapter").mkdir(parents=True)
    (tmp_path / "runs" / "tiny_sample" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    config = llamaboard.recipe_config(Path(recipe), Project(tmp_path), accelerator=False, now="20260101-000000")
    note = config["train.output_box"]
    assert f"the model folder {tmp_path}/build/tiny/mistral does not exist yet: `llamafactory-ext tiny` in" in note
    assert "dataset(s) sample_train not built yet: run `make data`" in note
    assert config["train.output_dir"] == "tiny_sample_20260101-000000"  # never on top of a finished run
    assert f"trains into `{tmp_path}/runs/tiny_sample_20260101-000000/adapter`" in note


@pytest.mark.slow
def test_listens_on_loopback_only_by_default(server):
    import psutil

    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening, f"no listening socket found:\n{server.output()}"
    assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", server.port)}, listening
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in server.output()


@needs_chromium
@pytest.mark.slow
def test_page_offers_built_datasets_recipes_and_fp32(page, server, project, artifacts_dir):
    """Train: only datasets whose files exist, no test split; every recipe under "Config path"; fp32 without a
    GPU. Evaluate: the test split first."""
    import torch

    page.get_by_role("heading", name=re.compile("LLaMA Factory")).wait_for()
    assert page.get_by_role("textbox", name=re.compile(r"^Data dir")).input_value() == str(project)
    assert listbox(page, "Compute type").input_value() == ("bf16" if torch.cuda.is_available() else "fp32")
    page.get_by_role("textbox", name="Dataset", exact=True).click()  # focus -> list_datasets()
    assert options(page) == ["sample_train"]  # not sample_test (test split), never_built, nor the ranking one
    page.keyboard.press("Escape")

    listbox(page, "Config path").click()
    recipes = {f"sft_recipes/{p.name}" for p in (ROOT / "sft_recipes").glob("*.yaml")}
    assert len(recipes) >= 7 and recipes <= set(options(page))
    page.screenshot(path=str(artifacts_dir / "webui.png"))
    page.keyboard.press("Escape")

    page.get_by_role("tab", name="Evaluate & Predict").click()  # the other copy of DEFAULT_DATA_DIR
    assert page.get_by_role("textbox", name=re.compile(r"^Data dir")).input_value() == str(project)
    page.get_by_role("textbox", name="Dataset", exact=True).click()
    assert options(page) == ["sample_test", "sample_train"]


@needs_chromium
@pytest.mark.slow
def test_review_tab_reviews_an_uploaded_pdf(page, server, reviewer, review_pdf, artifacts_dir):
    """Upload a PDF, keep the default run (the newest), read the four sections, download the Markdown."""
    page.get_by_role("heading", name=re.compile("LLaMA Factory")).wait_for()
    page.get_by_role("tab", name="Review a paper").click()
    assert page.locator("#review_run").get_by_role("listbox").input_value() == reviewer["name"]
    max_new = number(page, "Max new tokens")
    if reviewer["max_new_tokens"]:
        max_new.fill(str(reviewer["max_new_tokens"]))
        max_new.press("Enter")
    else:  # the SmolLM2 family's default, what its reviews were trained to fit
        assert max_new.input_value() == str(families.get("smollm2").max_new_tokens)
    number(page, "Temperature (0 = greedy)").fill("0")
    page.locator("#review_paper input[type=file]").set_input_files(str(review_pdf))
    # the finished upload: its row in the preview table has a download link (while uploading, gradio shows the
    # name in a progress line and ignores a click on Review: "Waiting for file(s) to finish uploading")
    page.locator('#review_paper tr.file:has(td.filename[aria-label="paper.pdf"]) a.download-link').wait_for()
    page.locator("#review_button").click()

    status = page.locator("#review_status")
    error = page.get_by_role("alert").filter(has_text=re.compile("Error|finish uploading")).first
    status.get_by_text(re.compile("tokens used")).or_(error).first.wait_for(timeout=300_000)
    page.screenshot(path=str(artifacts_dir / "webui-review.png"), full_page=True)
    assert not error.is_visible(), f"{error.inner_text()}\n{server.output()}"
    m = re.search(r"paper: ([\d,]+) of ([\d,]+) tokens used.*references: ([\d,]+) characters dropped",
                  status.inner_text(), re.S)
    assert m, status.inner_text()
    used, total = (int(g.replace(",", "")) for g in m.groups()[:2])
    assert 0 < used <= total and int(m.group(3).replace(",", "")) > 1000
    # SmolLM2's paper budget, what it was trained with: the paper was cut, the page says so
    assert used == families.get("smollm2").paper_budget < total

    out = page.locator("#review_output")
    assert out.locator("h1").inner_text() == "Review of paper.pdf"
    shown = out.locator("h2").all_inner_texts()
    assert shown[:4] == list(HEADERS.values())
    # the text the page shows under each header (up to the next header)
    under = out.locator("h2").evaluate_all("""hs => hs.map(h => { let t = "", e = h.nextElementSibling;
        while (e && e.tagName !== "H2") { t += e.innerText + "\\n"; e = e.nextElementSibling; } return t.trim(); })""")
    with page.expect_download() as download:
        page.locator("#review_download").click()
    markdown = Path(download.value.path()).read_text(encoding="utf-8")
    assert download.value.suggested_filename == "paper.review.md" and markdown.startswith("# Review of paper.pdf")
    # the model wrote every section: text under each header, nothing marked missing
    assert shown == list(HEADERS.values()) and "missing section" not in status.inner_text()
    for header, text in zip(HEADERS.values(), under, strict=True):
        assert len(text) > 3 and "section missing" not in text, f"{header}: {text!r}"
    assert "section missing" not in markdown


@pytest.fixture(scope="module")
def gradio_client():
    return pytest.importorskip("gradio_client")  # comes with gradio


@pytest.mark.slow
def test_review_api_is_the_cli_code(server, project, reviewer, review_pdf, tiny_models, gradio_client, tmp_path):
    """POST /review (file, run, temperature, max_new_tokens) -> the Markdown `llamafactory-ext review` writes
    (greedy: the same text); run "" is the newest run; an adapter-only run works; errors say what is wrong."""
    from gradio_client import handle_file

    from llamafactory_ext.serve.review import review_paper

    client = gradio_client.Client(server.url, verbose=False, httpx_kwargs=SLOW_SERVER)
    # (gradio's Markdown drops the final newline; the downloaded file keeps it)
    got = client.predict(handle_file(str(review_pdf)), "", 0.0, 32, api_name="/review")
    assert got == review_paper(review_pdf, project / "runs" / reviewer["name"], temperature=0,
                               max_new_tokens=32)["markdown"].rstrip("\n")

    adapter_run = make_adapter_run(tiny_models["mistral"], tmp_path / "elsewhere" / "tiny_adapter", "mistral")
    paper = tmp_path / "paper.md"
    paper.write_text("# Attention in long papers\n\n" + "We study attention in long papers. " * 40)
    got = client.predict(handle_file(str(paper)), str(adapter_run), 0.0, 16, api_name="/review")
    assert got == review_paper(paper, adapter_run, temperature=0, max_new_tokens=16)["markdown"].rstrip("\n")

    bad = tmp_path / "paper.docx"
    bad.write_bytes(b"PK\x03\x04")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"Invalid file type.*'\.pdf', '\.txt', '\.md'"):
        client.predict(handle_file(str(bad)), "", 0.35, 16, api_name="/review")
    with pytest.raises(gradio_client.exceptions.AppError, match=rf"no run 'nope' in {project}/runs"):
        client.predict(handle_file(str(paper)), "nope", 0.35, 16, api_name="/review")


@needs_chromium
@pytest.mark.slow
def test_training_from_a_recipe_lands_in_runs(page, server, project, tiny_models, artifacts_dir):
    """Load sft_recipes/tiny_sample.yaml, train 2 steps with the page's defaults (fp32 on CPU) into
    runs/tiny_sample/adapter. RoPE scaling is switched on too: stock LLaMA-Factory 0.9.5 on transformers 5
    dies loading the model ("expected int, got float"); ours trains and logs the fix."""
    import yaml

    page.get_by_role("heading", name=re.compile("LLaMA Factory")).wait_for()
    listbox(page, "Config path").click()
    page.get_by_role("option", name="sft_recipes/tiny_sample.yaml", exact=True).click()
    page.get_by_role("button", name="Load arguments").click()
    page.get_by_text(re.compile(r"^Loaded sft_recipes/tiny_sample\.yaml")).wait_for()
    page.wait_for_timeout(1000)  # the handlers the loaded values trigger (model name, output dir) have run
    recipe = yaml.safe_load((ROOT / "sft_recipes" / "tiny_sample.yaml").read_text())
    model_path = page.get_by_role("textbox", name=re.compile(r"^Model path"))
    assert listbox(page, "Model name").input_value() == "Custom"
    assert Path(model_path.input_value()) == tiny_models["mistral"].resolve()
    assert listbox(page, "Chat template").input_value() == recipe["template"]
    assert listbox(page, "Quantization bit").input_value() == str(recipe["quantization_bit"])
    assert listbox(page, "Compute type").input_value() == "fp32"
    assert listbox(page, "Output dir").input_value() == "tiny_sample"
    assert number(page, "Cutoff length").input_value() == str(recipe["cutoff_len"])
    assert page.get_by_title(f"Remove {recipe['dataset']}").first.is_visible()  # the chosen dataset's token
    page.get_by_role("button", name=re.compile(r"^LoRA configurations")).click()
    assert number(page, "LoRA rank").input_value() == str(recipe["lora_rank"])
    assert number(page, "LoRA alpha").input_value() == str(recipe["lora_alpha"])

    listbox(page, "RoPE scaling").click()
    page.get_by_role("option", name="linear", exact=True).click()
    cutoff = number(page, "Cutoff length")
    cutoff.fill("65536")  # > the tiny model's 32768 positions: RoPE scaling factor 2
    cutoff.press("Enter")
    page.get_by_role("button", name=re.compile(r"^Extra configurations")).click()
    extra_box = page.get_by_role("textbox", name=re.compile(r"^Extra arguments"))
    extra = json.loads(extra_box.input_value())
    assert extra["optim"] == recipe["optim"] and extra["warmup_ratio"] == recipe["warmup_ratio"]
    extra_box.fill(json.dumps({**extra, "max_steps": 2}))
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
    run = project / "runs" / "tiny_sample"
    log = (run / "adapter" / "running_log.txt").read_text() if (run / "adapter" / "running_log.txt").exists() else ""
    assert done.inner_text().startswith("Finished."), f"{log}\n{server.output()}"
    assert (run / "adapter" / "adapter_model.safetensors").is_file(), f"training failed:\n{log}\n{server.output()}"
    assert not (server.cwd / "saves").exists()
    assert "Using linear scaling strategy and setting scaling factor to 2.0" in log
    assert "fix from llamafactory_ext.patches" in log

    # What LLaMA-Factory got is the recipe, but for the paths (resolved in the project) and what was changed here.
    trained = yaml.safe_load((run / "adapter" / "training_args.yaml").read_text())
    assert yaml.safe_load((run / "sft_args.yaml").read_text()) == trained  # as `run sft` leaves a run
    changed = {"model_name_or_path", "dataset_dir", "output_dir", "overwrite_output_dir", "cutoff_len"}
    assert {k: trained.get(k) for k in recipe if k not in changed} == {k: v for k, v in recipe.items()
                                                                        if k not in changed}
    assert trained["dataset_dir"] == str(project) and trained["output_dir"] == str(run / "adapter")
    assert trained["rope_scaling"] == "linear" and trained["max_steps"] == 2 and "bf16" not in trained
    # The server's PATH was /usr/bin:/bin, where there is no llamafactory-cli: the run above was the
    # venv's (webui put its bin/ first), and the log line shows our .pth import hook was active in it.
    assert shutil.which("llamafactory-cli", path="/usr/bin:/bin") is None


def _status(req: urllib.request.Request | str, opener=None) -> int:
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_auth_refuses_unauthenticated_requests(project, review_pdf, gradio_client, tmp_path):
    """With a login, every route needs it: the page, its config, LlamaBoard's handlers, and the review API."""
    port = free_port()
    srv = Server(tmp_path, ["--port", str(port), "--dataset-dir", str(project)],
                 webui_env(WEBUI_AUTH="alice:s3:cr3t"), port)  # the password may contain ':'
    try:
        assert _status(f"{srv.url}/config") == 401
        assert _status(f"{srv.url}/gradio_api/info") == 401

        def post(path: str, body: dict) -> int:
            return _status(urllib.request.Request(f"{srv.url}{path}", method="POST", data=json.dumps(body).encode(),
                                                  headers={"Content-Type": "application/json"}))

        assert post("/gradio_api/queue/join", {"data": [], "fn_index": 0, "session_hash": "x"}) == 401
        assert post("/gradio_api/call/review", {"data": [None, "", 0.35, 16]}) == 401
        assert post("/gradio_api/upload", {}) == 401
        with pytest.raises(ValueError, match="credentials were not provided"):  # no API without the login
            gradio_client.Client(srv.url, verbose=False, httpx_kwargs=SLOW_SERVER)

        def login(password: str):
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            body = urllib.parse.urlencode({"username": "alice", "password": password}).encode()
            return opener, _status(urllib.request.Request(f"{srv.url}/login", data=body), opener)

        _, code = login("wrong")
        assert code == 400
        opener, code = login("s3:cr3t")
        assert code == 200
        assert _status(f"{srv.url}/config", opener) == 200
        client = gradio_client.Client(srv.url, auth=("alice", "s3:cr3t"), verbose=False, httpx_kwargs=SLOW_SERVER)
        got = client.predict(gradio_client.handle_file(str(review_pdf)), "", 0.0, 8, api_name="/review")
        assert got.startswith("# Review of paper.pdf")
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
