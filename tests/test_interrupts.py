"""Interrupting a command never leaves a half-written output: real subprocesses, real signals, mid-write.

`truncate`, `split` and `register` are frozen (SIGSTOP) once their temp output provably holds data, checked
to be mid-run while frozen, then sent SIGINT, SIGTERM or SIGKILL: the previous complete OUT survives byte
for byte (or stays absent), Ctrl-C exits 130 and SIGTERM 143 without temp files, and what a SIGKILL leaves
is removed by the next write. `register` also runs 20 writers at once with random SIGKILLs:
dataset_info.json always parses and loses nothing. (`convert` has its own interrupt tests in
test_convert.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from conftest import cli_env

from llamafactory_ext.fileio import _host_tag, atomic_write_text, remove_stale_temps

CLI = [sys.executable, "-m", "llamafactory_ext.cli"]
PREVIOUS = b'{"previous": "complete version"}\n'


def _state(pid: int) -> str:
    """The kernel's one-letter process state (R, S, T = stopped, Z = exited, not yet reaped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def temps(folder: Path, name: str | None = None) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp" if name else ".*.tmp"))


def _sizes(folder: Path, name: str, pid: int) -> list[int]:
    sizes = []
    for p in temps(folder, name):
        if p.name.startswith(f".{name}.{pid}-"):
            with contextlib.suppress(FileNotFoundError):  # renamed onto OUT between glob and stat
                sizes.append(p.stat().st_size)
    return sizes


def _freeze_once(proc: subprocess.Popen, folder: Path, name: str, min_bytes: int, names: tuple[str, ...]) -> bool:
    """Stop `proc` once its temp file for OUT `name` holds at least `min_bytes` and check, while it is frozen,
    that it is mid-run: alive and the temp files of every OUT in `names` still there (none renamed yet).
    False when the race was lost (the run got past that point between two looks)."""
    deadline = time.monotonic() + 120
    while True:
        sizes = _sizes(folder, name, proc.pid)
        if sizes and sizes[0] >= min_bytes:
            break
        if proc.poll() is not None:
            out, err = proc.communicate()
            assert proc.returncode == 0, f"failed before writing {min_bytes} bytes of {name}: {err.decode()[-2000:]}"
            return False
        assert time.monotonic() < deadline, f"{name} never got {min_bytes} bytes"
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    while _state(proc.pid) not in "TZ":
        time.sleep(0.001)
    return _state(proc.pid) == "T" and all(_sizes(folder, n, proc.pid) for n in names)


def start_frozen(cmd: list[str], folder: Path, name: str, min_bytes: int, reset=lambda: None,
                 names: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `cmd` and freeze it mid-write (see _freeze_once). On a loaded machine the test process can sleep
    through the whole write; then the run is killed, `reset()` restores the folder and it is tried again."""
    for _ in range(5):
        reset()
        # niced: on a busy machine the writer, not this poller, is the one that waits for a core
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                                preexec_fn=lambda: os.nice(10))
        if _freeze_once(proc, folder, name, min_bytes, names or (name,)):
            return proc
        proc.kill()
        proc.communicate()
        for tmp in temps(folder):  # what the killed try left
            if f".{proc.pid}-" in tmp.name:
                tmp.unlink()
    pytest.fail(f"finished before it could be frozen 5 times: make the input of {name} bigger")


def interrupt(proc: subprocess.Popen, sig: int) -> bytes:
    """Deliver `sig` to the frozen process, let it run on, and return its stderr."""
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"interrupted" in err, err.decode()[-2000:]
    elif sig == signal.SIGTERM:  # unwinds like Ctrl-C, quietly, with the shell's code for "killed by SIGTERM"
        assert proc.returncode == 128 + signal.SIGTERM and b"Traceback" not in err, err.decode()[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
    return err


pytestmark = pytest.mark.slow  # a grid of real processes killed mid-write: a minute

SIGNALS = pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                                  ids=["SIGINT", "SIGTERM", "SIGKILL"])


# ---- truncate ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def truncate_input(tmp_path_factory) -> Path:
    """3000 records whose papers must all be cut to fit 256 tokens: seconds of work for one process."""
    rng = random.Random(0)
    words = "we propose a novel attention method and show consistent gains over strong baselines".split()
    path = tmp_path_factory.mktemp("truncate") / "in.jsonl"
    with path.open("wb") as f:
        for i in range(3000):
            paper = " ".join(rng.choice(words) for _ in range(400))
            f.write(orjson.dumps({"instruction": "Review it.", "input": paper, "output": "A fair review. " * 8,
                                  "paper_id": i}) + b"\n")
    return path


@pytest.mark.parametrize(("sig", "workers"), [  # each signal once, each path once (2: the thread pool, 1: inline)
    (signal.SIGINT, 2), (signal.SIGTERM, 1),
    (signal.SIGKILL, 1),  # (SIGKILL does not care about threads)
], ids=["SIGINT-2", "SIGTERM-1", "SIGKILL-1"])
def test_truncate_interrupt_keeps_previous_out(tmp_path, tiny_models, truncate_input, sig, workers):
    out = tmp_path / "out.jsonl"
    plot = tmp_path / "out.lengths.png"

    def reset():
        out.write_bytes(PREVIOUS)
        plot.write_bytes(b"previous png")
        (tmp_path / "out.jsonl.rejects.jsonl").unlink(missing_ok=True)

    proc = start_frozen([*CLI, "truncate", str(truncate_input), str(out), "--tokenizer", str(tiny_models["mistral"]),
                         "--template", "mistral", "--max-tokens", "256", "--workers", str(workers)],
                        tmp_path, "out.jsonl", 64 * 1024, reset)
    interrupt(proc, sig)
    assert out.read_bytes() == PREVIOUS and plot.read_bytes() == b"previous png"
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()
    if sig != signal.SIGKILL:
        assert not temps(tmp_path)  # Ctrl-C and SIGTERM clean their temp files up
    else:  # SIGKILL cannot: the next write of the same OUT removes them (the dead writer's, nobody else's)
        left = temps(tmp_path)
        assert {p.name.split(".")[-3] for p in left} == {f"{proc.pid}-{_host_tag()}"}
        assert sorted(remove_stale_temps(out) + remove_stale_temps(str(out) + ".rejects.jsonl")) == left
        assert not temps(tmp_path)


# ---- split ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_input(tmp_path_factory) -> Path:
    """40 000 records of 1.5 KB (60 MB) from 20 000 papers."""
    path = tmp_path_factory.mktemp("split") / "reviews.jsonl"
    with path.open("wb") as f:
        for i in range(40_000):
            f.write(orjson.dumps({"instruction": "I", "input": f"paper {i // 2} " + "x" * 1500, "output": "r",
                                  "paper_id": i // 2}) + b"\n")
    return path


SPLIT_OUTS = ("reviews_train.jsonl", "reviews_test.jsonl", "reviews_train_5k.jsonl", "reviews_train_30k.jsonl")


@pytest.mark.parametrize("previous", [True, False], ids=["previous", "none"])
@SIGNALS
def test_split_interrupt_keeps_previous_outs(tmp_path, split_input, sig, previous):
    def reset():
        for name in SPLIT_OUTS:
            if previous:
                (tmp_path / name).write_bytes(PREVIOUS + name.encode())
            else:
                (tmp_path / name).unlink(missing_ok=True)

    cmd = [*CLI, "split", str(split_input), "--test-size", "100", "--sizes", "5k,30k", "--out-dir", str(tmp_path)]
    proc = start_frozen(cmd, tmp_path, "reviews_train.jsonl", 256 * 1024, reset, SPLIT_OUTS)
    interrupt(proc, sig)
    for name in SPLIT_OUTS:
        if previous:
            assert (tmp_path / name).read_bytes() == PREVIOUS + name.encode(), name
        else:
            assert not (tmp_path / name).exists(), name
    if sig != signal.SIGKILL:
        assert not temps(tmp_path)
    else:
        assert len(temps(tmp_path)) == len(SPLIT_OUTS)
        # running the command again completes it and removes the dead run's temp files
        assert subprocess.run(cmd, capture_output=True, env=cli_env(), timeout=120).returncode == 0
        assert not temps(tmp_path)
        train = (tmp_path / "reviews_train.jsonl").read_bytes()
        assert train.count(b"\n") == 40_000 - 200
        assert train.startswith((tmp_path / "reviews_train_30k.jsonl").read_bytes())


# ---- register ------------------------------------------------------------------------------------------------
def _register_round(tmp_path: Path, info: Path, data: Path, rnd: int) -> tuple[list[str], list[int], int]:
    """20 registrations at once; 5 SIGKILLed at random moments and 5 the moment they are seen writing their
    temp file. Returns the names, the exit codes and how many writers were caught mid-write."""
    rng = random.Random(20 + rnd)
    names = [f"new_{rnd}_{i}" for i in range(20)]
    # niced: on a busy machine the writers, not this poller, wait for a core
    procs = [subprocess.Popen([*CLI, "register", name, str(data), "--dataset-info", str(info)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(),
                              preexec_fn=lambda: os.nice(10)) for name in names]
    victims = rng.sample(procs, 10)
    start = time.monotonic()
    at_random = sorted((start + rng.uniform(0.3, 2.5), id(p), p) for p in victims[:5])
    mid_write = {p.pid: p for p in victims[5:]}
    caught_mid_write = 0
    try:
        while any(p.poll() is None for p in procs):
            while at_random and at_random[0][0] <= time.monotonic():
                at_random.pop(0)[2].kill()  # a no-op for one that has finished
            for tmp in temps(tmp_path, "dataset_info.json"):
                p = mid_write.pop(int(tmp.name.split(".")[-3].split("-")[0]), None)
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGSTOP)
                    while _state(p.pid) not in "TZ":
                        time.sleep(0.001)
                    caught_mid_write += _state(p.pid) == "T" and tmp.exists()
                    p.kill()
            assert time.monotonic() < start + 120, "the registrations hang"
            time.sleep(0.001)
    finally:
        for p in procs:
            p.kill()
        codes = [p.wait() for p in procs]
    assert set(codes) <= {0, -signal.SIGKILL}, [p.stderr.read() for p in procs]
    return names, codes, caught_mid_write


def test_register_survives_parallel_writers_and_sigkills(tmp_path):
    """20 processes register at once into a 20 000-entry file; 5 are SIGKILLed at random moments and 5
    the moment they are seen writing their temp file, while a reader parses the file all along.
    dataset_info.json always parses, keeps its entries in order, and has every registration whose
    process finished (a killed one's is there whole or not at all). A round in which the poller caught
    no writer mid-write (it can sleep through every write on a loaded machine) is followed by another."""
    info = tmp_path / "dataset_info.json"
    existing = {f"old_{i}": {"file_name": f"old/{i}.jsonl", "formatting": "alpaca", "n": i} for i in range(20_000)}
    info.write_text(json.dumps(existing, indent=2) + "\n")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "I", "input": "p", "output": "r"}) + "\n")

    bad_reads: list[str] = []
    reads = 0
    done = threading.Event()

    def reader():
        nonlocal reads
        while not done.is_set():
            text = info.read_text()
            try:
                json.loads(text)
            except ValueError as e:
                bad_reads.append(f"{e}: {text[-200:]!r}")
            reads += 1
            time.sleep(0.1)  # json.loads holds the GIL: leave the poller room

    watcher = threading.Thread(target=reader)
    watcher.start()
    names: list[str] = []
    finished: set[str] = set()
    caught_mid_write = 0
    try:
        for rnd in range(3):
            round_names, codes, caught = _register_round(tmp_path, info, data, rnd)
            names += round_names
            finished |= {n for n, c in zip(round_names, codes, strict=True) if c == 0}
            caught_mid_write += caught
            if caught_mid_write:
                break
    finally:
        done.set()
        watcher.join()
    assert not bad_reads and reads
    assert caught_mid_write, "no writer was caught mid-write (5 tries in each of 3 rounds): the kills tested nothing"

    after = json.loads(info.read_text())
    assert list(after)[:20_000] == list(existing) and {k: after[k] for k in existing} == existing
    entry = {"file_name": "d.jsonl", "formatting": "alpaca",
             "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    new = {k: v for k, v in after.items() if k not in existing}
    assert all(v == entry for v in new.values()) and set(new) <= set(names)
    assert finished <= set(new)

    # the next write removes whatever the killed writers left behind
    atomic_write_text(info, info.read_text())
    assert not temps(tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_register_interrupt_mid_write_keeps_previous_file(tmp_path, sig):
    """A registration into a big dataset_info.json, frozen while its temp file is written, then interrupted:
    the file is the previous one, byte for byte, and no temp file is left."""
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({f"old_{i}": {"file_name": f"old/{i}.jsonl", "formatting": "alpaca", "note": "x" * 200}
                                for i in range(100_000)}, indent=2) + "\n")
    before = info.read_bytes()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "I", "input": "p", "output": "r"}) + "\n")
    proc = start_frozen([*CLI, "register", "new", str(data), "--dataset-info", str(info)], tmp_path,
                        "dataset_info.json", 1, lambda: info.write_bytes(before))
    interrupt(proc, sig)
    assert info.read_bytes() == before
    assert not temps(tmp_path)


# ---- atomic_write's stale temp files -------------------------------------------------------------------------
WRITER = """\
import sys
from llamafactory_ext.fileio import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(sys.argv[2].encode())
    f.flush()
    print("ready", flush=True)
    sys.stdin.readline()
"""


def start_writer(target: Path, text: str) -> subprocess.Popen:
    """A process inside atomic_write(target) with `text` written, waiting for a line on stdin to finish."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), text], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=cli_env())
    assert proc.stdout.readline() == b"ready\n"
    return proc


def test_stale_temps_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("previous\n")
    dead = start_writer(target, "killed half-way")
    dead.kill()
    dead.wait()
    (stale,) = temps(tmp_path, "out.jsonl")
    assert stale.name.startswith(f".out.jsonl.{dead.pid}-") and target.read_text() == "previous\n"
    live = start_writer(target, "live writer\n")
    (live_tmp,) = [p for p in temps(tmp_path, "out.jsonl") if p != stale]
    # temp files that must survive although their PID is dead: another target's, another host's
    other_target = tmp_path / f".out.jsonl.rejects.jsonl.{dead.pid}-{_host_tag()}.abcd1234.tmp"
    other_host = tmp_path / f".out.jsonl.{dead.pid}-00000000.abcd1234.tmp"
    other_target.write_text("x")
    other_host.write_text("x")

    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert not stale.exists()
    assert live_tmp.read_text() == "live writer\n" and other_target.exists() and other_host.exists()

    live.communicate(b"\n", timeout=30)
    assert live.returncode == 0 and target.read_text() == "live writer\n" and not live_tmp.exists()


FOLDER_BUILDER = """
import sys, time
from pathlib import Path
from llamafactory_ext.fileio import build_folder
with build_folder(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_text("half a model")
    print("ready", flush=True)
    time.sleep(600)
"""


def test_a_model_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """fileio.build_folder, what every model build (tiny, smollm2, gpu-check) and `make merge` (swap_folder) use: a
    builder SIGKILLed mid-write leaves the previous folder as it was; an error inside leaves it too; the next build
    replaces it and clears what the dead builder left (its temp folder, a moved-aside old one)."""
    from llamafactory_ext.fileio import build_folder

    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("the old model")
    proc = subprocess.Popen([sys.executable, "-c", FOLDER_BUILDER, str(out)], stdout=subprocess.PIPE, env=cli_env())
    assert proc.stdout.readline() == b"ready\n"
    proc.kill()
    proc.wait()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the old model"
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".model.")]
    assert left.name.startswith(f".model.{proc.pid}-") and left.is_dir()
    aside = tmp_path / f".model.{proc.pid}-{_host_tag()}.old.tmp"  # as if killed between swap_folder's two renames
    aside.mkdir()

    with pytest.raises(RuntimeError), build_folder(out) as tmp:
        (tmp / "model.safetensors").write_text("a failed build")
        raise RuntimeError("conversion failed")
    assert (out / "model.safetensors").read_text() == "the old model"
    with build_folder(out) as tmp:
        (tmp / "model.safetensors").write_text("the new model")
        assert (out / "model.safetensors").read_text() == "the old model"  # until the block ends
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the new model"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing of the dead builder is left
