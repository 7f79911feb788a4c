"""How a LLaMA-Factory process is started: its environment (torchrun on one or N nodes, CPU threads), its log.

Every `llamafactory-cli train|export` the project starts goes through `launch`: in the project root, with this
venv's bin/ first on PATH (its torchrun and llamafactory-cli), HF_HUB_OFFLINE=1 for the locally built models,
and either the output on the terminal or, with `log=`, into a log file with one progress line instead.

Distributed training is LLaMA-Factory's own launcher (FORCE_TORCHRUN=1: `torchrun --nnodes N --node_rank i
--nproc_per_node P --master_addr A --master_port 29500`). `distributed()` checks, before anything starts, what
makes multi-node runs hang: NODE_RANK given and below NNODES, RANK given instead of NODE_RANK (LLaMA-Factory
0.9.5 reads only NODE_RANK: every node would believe it is node 0), MASTER_ADDR missing, and no MASTER_PORT
(LLaMA-Factory would pick a random free port on each node; here it is 29500 on all of them).

CPU threads: one torch thread per idle core, counted when a stage starts (`cpu_threads`); OMP_NUM_THREADS wins.
Environment: only LLaMA-Factory's own launcher variables are read (NPROC_PER_NODE, NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT, FORCE_TORCHRUN), plus RANK to refuse it; every other setting is a flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llamafactory_ext import UserError, units

LAUNCH_ENV = ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
              "RDZV_ID", "MIN_NNODES", "MAX_NNODES", "MAX_RESTARTS")
DEFAULT_MASTER_PORT = 29500  # torchrun's own default; the same on every node


# ----------------------------------------------------------------------------------------- CPU threads
def cgroup_cpus(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """The CPU quota of this container in whole cores (rounded up), or None without one (cgroup v2 `cpu.max`,
    v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`). `docker --cpus=2` on a 64-core host: 2, not 64."""
    root = Path(root)
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        return None


def cpu_threads(sample_s: float = 0.5, cgroup_root: str | Path = "/sys/fs/cgroup") -> tuple[int, str]:
    """Torch threads for a CPU run: one per core that this process may use and that is idle right now (at
    least 1), and why.

    Measured (tests/bench_threads.py, SmolLM2-135M, 2 cores): on idle cores 2 threads take 0.56-0.65x the
    wall time of 1 per training step and 0.53-0.59x per prefill; on a busy machine 2 threads ran 2.5-6x
    SLOWER than 1 (spin-waiting on a core another process holds). So count the idle cores now, from the
    /proc/stat lines of the cores in this process's affinity mask over `sample_s` seconds (not the load
    average, which still holds the previous stage), capped by the container's CPU quota.
    """
    cpus = sorted(os.sched_getaffinity(0))

    def snap() -> tuple[int, int]:
        per_cpu = {ln.split()[0]: [int(x) for x in ln.split()[1:]]
                   for ln in Path("/proc/stat").read_text().splitlines() if ln[:3] == "cpu" and ln[3:4].isdigit()}
        rows = [per_cpu[f"cpu{c}"] for c in cpus]
        return sum(map(sum, rows)), sum(v[3] + (v[4] if len(v) > 4 else 0) for v in rows)  # total, idle+iowait

    quota = cgroup_cpus(cgroup_root)
    n = min(len(cpus), quota or len(cpus))
    limit = f"{n} usable core{'s' if n > 1 else ''}" + (f" (container quota {quota})" if quota else "")
    try:
        t0, i0 = snap()
        time.sleep(sample_s)
        t1, i1 = snap()
    except (OSError, ValueError, KeyError):
        return 1, f"CPU load unknown; {limit}"
    busy = len(cpus) * (1 - (i1 - i0) / max(t1 - t0, 1))
    threads = max(1, min(n, int(len(cpus) - busy + 0.5)))
    return threads, f"{busy:.1f} of {len(cpus)} cores busy; {limit}"


def has_cuda() -> bool:
    """Without importing torch (seconds): an NVIDIA driver is loaded."""
    return Path("/proc/driver/nvidia/version").exists() or bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip(" -1"))


# ----------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    """Where this process sits in a distributed run (1 node x 1 process: not distributed)."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    torchrun: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    def describe(self) -> str:
        if not self.torchrun:
            return "one process"
        where = f"node {self.node_rank} of {self.nnodes}, " if self.nnodes > 1 else ""
        return (f"{where}{self.nproc} process(es) per node, world size {self.world_size}"
                + (f", rendezvous {self.master_addr}:{self.master_port}" if self.nnodes > 1 else ""))


def distributed(*, nproc=None, nnodes=None, node_rank=None, master_addr=None, master_port=None,
                deepspeed: bool = False, environ=None, training: bool = True) -> Dist:
    """The distributed setting from the flags (NPROC=, NNODES=, NODE_RANK=, MASTER_ADDR=, MASTER_PORT=) and
    LLaMA-Factory's own variables, checked (see the module docstring). `training`: the RANK check applies."""
    env = os.environ if environ is None else environ

    def pick(flag, var):
        return flag if flag not in (None, "") else (env.get(var) or None)

    nproc = pick(nproc, "NPROC_PER_NODE")
    nproc = units.count(nproc, "NPROC", example="8") if nproc else None
    nnodes = pick(nnodes, "NNODES")
    nnodes = units.count(nnodes, "NNODES", example="2") if nnodes else 1
    rank = pick(node_rank, "NODE_RANK")
    if rank is not None and not str(rank).isdigit():
        raise UserError(f"NODE_RANK={rank!r}: expected 0, 1, ... (this node's index, below NNODES={nnodes})")
    if training and rank is None and env.get("RANK"):
        raise UserError(f"RANK={env['RANK']} is set but NODE_RANK is not: LLaMA-Factory's launcher reads only NODE_RANK, "
                        f"so every node would start as node 0 and the run would hang; give this node's index as "
                        f"NODE_RANK={env['RANK']} (make sft ... NODE_RANK={env['RANK']}) and unset RANK")
    rank = int(rank) if rank is not None else 0
    if rank >= nnodes:
        raise UserError(f"NODE_RANK={rank} with NNODES={nnodes}: node ranks go from 0 to {nnodes - 1}")
    addr = pick(master_addr, "MASTER_ADDR")
    if nnodes > 1 and not addr:
        raise UserError(f"NNODES={nnodes} needs MASTER_ADDR=<the address of node 0> on every node "
                        f"(the host every node can reach; in Slurm the first host of the allocation)")
    port = pick(master_port, "MASTER_PORT")
    port = units.count(port, "MASTER_PORT", example="29500") if port else None
    if port is not None and port > 65535:
        raise UserError(f"MASTER_PORT={port}: a port is 1 to 65535")
    torchrun = deepspeed or (nproc or 1) > 1 or nnodes > 1 or env.get("FORCE_TORCHRUN", "").lower() in ("1", "true")
    if torchrun and not nproc:
        nproc = _gpu_count() or 1  # LLaMA-Factory's default is the device count: 0 on a CPU machine
    if nnodes > 1 and port is None:
        port = DEFAULT_MASTER_PORT  # LLaMA-Factory would pick a random free port, different on every node
    return Dist(nproc or 1, nnodes, rank, addr, port, torchrun)


def _gpu_count() -> int:
    if not has_cuda():
        return 0
    import torch

    return torch.cuda.device_count()


# ----------------------------------------------------------------------------------------- environment
def environment(dist: Dist | None = None, *, offline: bool = False, dry_run: bool = False,
                quiet: bool = False, extra: dict | None = None) -> dict[str, str]:
    """The environment of a LLaMA-Factory process: this venv's bin first on PATH, the launcher variables of
    `dist`, HF_HUB_OFFLINE=1 when `offline` (a locally built model), CPU threads (unless a dry run; the note
    saying how many is printed unless `quiet`: `launch` with a log shows them on its progress line)."""
    # LLaMA-Factory's launcher does int(os.getenv("NNODES", "1")): an exported-but-empty variable crashes it
    env = {k: v for k, v in os.environ.items() if v != "" or k not in LAUNCH_ENV}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if dist is not None and dist.torchrun:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(dist.nproc), NNODES=str(dist.nnodes),
                   NODE_RANK=str(dist.node_rank))
        if dist.master_addr:
            env["MASTER_ADDR"] = dist.master_addr
        if dist.master_port:
            env["MASTER_PORT"] = str(dist.master_port)
    if not has_cuda() and "OMP_NUM_THREADS" not in env and not dry_run:
        n, why = cpu_threads()
        env["OMP_NUM_THREADS"] = str(n)
        env.setdefault("MKL_NUM_THREADS", str(n))
        if not quiet:
            print(f"note: CPU run, {n} torch thread(s) ({why}; set OMP_NUM_THREADS to choose)", file=sys.stderr)
    env.update(extra or {})
    return env


def shown(env: dict) -> str:
    """The launcher variables of `env`, as a shell prefix (for dry runs and logs)."""
    keys = ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
    return " ".join(f"{k}={env[k]}" for k in keys if k in env)


# ----------------------------------------------------------------------------------------- running
def launch(cmd: list[str], env: dict[str, str], cwd: Path, *, log: Path | None = None, progress=None,
           label: str = "", header: list[str] = ()) -> int:
    """Run `cmd` in `cwd` and return its exit status. Without `log` its output goes to the terminal; with it, to
    that file (after the `header` lines), and one line shows `progress()` -> (done, total, unit) or None while it
    runs (a bar on a terminal, the final line otherwise); on failure the end of the log is printed, with its path."""
    if log is None:
        print("+ " + " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=env, cwd=cwd)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if "OMP_NUM_THREADS" in env and not has_cuda():
        label = f"{label} ({env['OMP_NUM_THREADS']} thr)"
    with open(log, "w", encoding="utf-8") as f:
        f.write("".join(f"# {h}\n" for h in header) + f"+ {shown(env)} {' '.join(cmd)}\n".replace("+  ", "+ "))
        f.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        try:
            tty = sys.stderr.isatty()
            while proc.poll() is None:
                if tty:
                    _line(label, progress, t0, final=False)
                time.sleep(0.5)
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    rc = proc.returncode
    _line(label, progress, t0, final=True, failed=rc != 0)
    if rc:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        print("\n".join(f"  | {ln}" for ln in tail), file=sys.stderr)
        print(f"  (exit {rc}; the whole log: {log})", file=sys.stderr)
    return rc


def _line(label: str, progress, t0: float, *, final: bool, failed: bool = False) -> None:
    state = progress() if progress else None
    took = f"{time.monotonic() - t0:.0f} s"
    if state:
        done, total, unit = state
        width = 20
        filled = int(width * done / total) if total else 0
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}  "
    else:
        bar = ""
    text = f"{label:<14} {bar}{took}" + ("  FAILED" if failed else "")
    if final:
        print(("\r" if sys.stderr.isatty() else "") + text + " " * 8, file=sys.stderr, flush=True)
    else:
        print("\r" + text, end="", file=sys.stderr, flush=True)


def tqdm_progress(log: Path, unit: str):
    """(done, total, unit) from the last tqdm bar in a log (`12%|#  | 3/24 [...`), for `launch(progress=...)`."""
    import re

    pattern = re.compile(rb"(\d+)/(\d+) \[")

    def progress():
        try:
            with open(log, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 4096))
                found = pattern.findall(f.read())
        except OSError:
            return None
        return (int(found[-1][0]), int(found[-1][1]), unit) if found else None

    return progress
