"""Callbacks every LLaMA-Factory training started from this venv gets (patches.py adds them to `_training_function`).

- PeakMemoryRecorder: `<output_dir>/peak_memory.json` at every checkpoint save and at the end of training:
  torch.cuda.max_memory_allocated/reserved, the device, the step, the longest sequence, the run's arguments
  and model config. On CPU it records the process's max RSS, labelled as such, and no GPU figures.
- SpeedRecorder: `<output_dir>/speed.json` at the same moments: steady-state tokens/s (the first step left out),
  seconds per step and MFU (6 x params x tokens/s / the card's dense BF16 peak, gpus.py), with its formula. It asks
  the Trainer to count the tokens it trains on (`include_num_input_tokens_seen: non_padding`, unless set).
- RunCheck: in a distributed run started by `run sft` (train/sft.py puts what to compare into
  $LLAMAFACTORY_EXT_RUN_CHECK), every rank compares its training data hash, arguments and resume point with
  rank 0's before the first step; a difference stops every rank with both values named (a node given other
  data would otherwise train on different batches, or hang when its step count differs).
A measurement never stops a training run: a recorder that fails prints one line. The check does stop it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

RECORD = "peak_memory.json"
CHECK_ENV = "LLAMAFACTORY_EXT_RUN_CHECK"


def _longest_sequence(dataloader) -> int | None:
    """Longest tokenized example of an HF `datasets` training set, from the Arrow column (no Python lists)."""
    try:
        import pyarrow.compute as pc

        column = dataloader.dataset.data.column("input_ids")
        return int(pc.max(pc.list_value_length(column)).as_py())
    except Exception:
        return None


MODEL_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "max_position_embeddings",
                     "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@functools.cache
def _base_class():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Writes <output_dir>/<FILE> (what `record` returns) at every save and at the end of training, on rank 0."""

        FILE = ""

        def record(self, args, state, event: str) -> dict:
            raise NotImplementedError

        def on_save(self, args, state, control, **kwargs):
            self.write(args, state, "save")

        def on_train_end(self, args, state, control, **kwargs):
            self.write(args, state, "train_end")

        def write(self, args, state, event: str) -> None:
            if not state.is_world_process_zero:
                return
            try:
                from llamafactory_ext import fileio

                rec = self.record(args, state, event)
                fileio.atomic_write_text(Path(args.output_dir) / self.FILE, json.dumps(rec, indent=1, default=str) + "\n")
            except Exception as e:  # a measurement must never stop a training run
                print(f"llamafactory_ext: could not write {self.FILE}: {e}", file=sys.stderr)

    return Recorder


@functools.cache
def _recorder_class():
    class PeakMemoryRecorder(_base_class()):
        """Writes <output_dir>/peak_memory.json at every save and at the end of training (rank 0)."""

        FILE = RECORD

        def __init__(self, run_args):
            self.run_args = run_args if isinstance(run_args, dict) else list(run_args or [])
            self.longest = None
            self.model_config = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.longest = _longest_sequence(kwargs.get("train_dataloader"))
            try:
                cfg = kwargs["model"].config.to_dict()
                cfg = cfg.get("text_config") or cfg
                self.model_config = {k: cfg[k] for k in MODEL_CONFIG_KEYS if cfg.get(k) is not None}
            except Exception:
                self.model_config = None

        def record(self, args, state, event: str) -> dict:
            rec = peak_memory_record(args, state.global_step, event)
            ds = getattr(args, "hf_deepspeed_config", None)
            rec.update(longest_sequence=self.longest, model_config=self.model_config,
                       deepspeed_config=getattr(ds, "config", None), args=self.run_args)
            return rec

    return PeakMemoryRecorder


def peak_memory_record(args, step: int, event: str) -> dict:
    """This process's peak memory: GPU figures from PyTorch's allocator on CUDA, else none (host RSS always)."""
    import resource

    import torch

    device = getattr(args, "device", None)
    cuda = bool(torch.cuda.is_available() and getattr(device, "type", None) == "cuda")
    gib = 1024**3
    rec = {"what": "peak memory of this training process, written by llamafactory_ext.patches",
           "event": event, "step": step, "cuda": cuda, "device": "cpu", "world_size": getattr(args, "world_size", 1),
           "per_device_train_batch_size": getattr(args, "per_device_train_batch_size", None),
           "max_memory_allocated_gib": None, "max_memory_reserved_gib": None, "total_memory_gib": None,
           # host RAM of this process (Linux ru_maxrss is in KiB): NOT GPU memory
           "cpu_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib, 3)}
    if cuda:
        rec.update(device=torch.cuda.get_device_name(device),
                   max_memory_allocated_gib=round(torch.cuda.max_memory_allocated(device) / gib, 3),
                   max_memory_reserved_gib=round(torch.cuda.max_memory_reserved(device) / gib, 3),
                   total_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / gib, 3))
    return rec


SPEED = "speed.json"


@functools.cache
def _speed_class():
    class SpeedRecorder(_base_class()):
        """Writes <output_dir>/speed.json at every save and at the end of training (rank 0): steady-state tokens/s and
        seconds per optimizer step (the first step, which compiles and warms the allocator, left out), MFU."""

        FILE = SPEED

        def __init__(self):
            self.marks: list[tuple[float, int, int]] = []  # (time, global step, tokens seen) after each step
            self.params = None

        def on_train_begin(self, args, state, control, **kwargs):
            try:
                self.params = sum(p.numel() for p in kwargs["model"].parameters())
                quantized = getattr(kwargs["model"], "is_loaded_in_4bit", False) or getattr(
                    kwargs["model"], "is_quantized", False)
                if quantized:  # bitsandbytes packs two 4-bit weights per element: count from the config instead
                    self.params = _params_from_config(kwargs["model"].config) or self.params
            except Exception:
                self.params = None

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), state.global_step, int(state.num_input_tokens_seen or 0)))

        def record(self, args, state, event: str) -> dict:
            return speed_record(self.marks, self.params, args, event)

    return SpeedRecorder


def _params_from_config(cfg) -> int | None:
    """Every parameter of a Llama-style decoder, from its config (a 4-bit model's numel() is half of it)."""
    try:
        c = cfg.to_dict()
        c = c.get("text_config") or c
        h, layers, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads") or heads
        hd = c.get("head_dim") or h // heads
        linear = layers * (h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * inter)
        tied = c.get("tie_word_embeddings", False)
        return linear + vocab * h * (1 if tied else 2) + (2 * layers + 1) * h
    except Exception:
        return None


def speed_record(marks: list[tuple[float, int, int]], params: int | None, args, event: str) -> dict:
    """Steady state over the steps after the first: tokens/s (all ranks), s/step, MFU per GPU."""
    from llamafactory_ext import gpus

    world = max(1, int(getattr(args, "world_size", 1) or 1))
    rec = {"what": "training speed of this run, written by llamafactory_ext (train/callbacks.py)", "event": event,
           "steps": marks[-1][1] if marks else 0, "steps_measured": max(0, len(marks) - 1), "world_size": world,
           "tokens_per_s": None, "step_s": None, "tokens_per_step": None, "params": params, "device": "cpu",
           "bf16_tflops_per_gpu": None, "mfu": None,
           "mfu_formula": "6 x params x tokens/s / (GPUs x dense BF16 peak of the card); tokens: non-padding, all GPUs"}
    device = getattr(args, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        rec["device"] = torch.cuda.get_device_name(device)
    if len(marks) >= 2:
        (t0, s0, n0), (t1, s1, n1) = marks[0], marks[-1]
        if s1 > s0 and t1 > t0:
            rec["step_s"] = round((t1 - t0) / (s1 - s0), 4)
            if n1 > n0:
                rec["tokens_per_s"] = round((n1 - n0) / (t1 - t0), 1)
                rec["tokens_per_step"] = round((n1 - n0) / (s1 - s0), 1)
    card = gpus.by_device_name(rec["device"]) if rec["device"] != "cpu" else None
    if card is not None and card.bf16_tflops:
        rec["bf16_tflops_per_gpu"] = card.bf16_tflops
        if rec["tokens_per_s"] and params:
            rec["mfu"] = round(6 * params * rec["tokens_per_s"] / (world * card.bf16_tflops * 1e12), 4)
    return rec


@functools.cache
def _check_class():
    from transformers import TrainerCallback

    class RunCheck(TrainerCallback):
        """Every rank trains rank 0's data, arguments and resume point (see the module docstring)."""

        def __init__(self, mine: dict):
            self.mine = mine

        def on_train_begin(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                return
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, self.mine)
            problems = mismatches(found)
            if problems:
                raise RuntimeError("llamafactory_ext: the nodes of this run disagree, nothing was trained: "
                                   + "; ".join(problems))

    return RunCheck


def mismatches(found: list[dict]) -> list[str]:
    """What differs from rank 0 in each rank's check record (one phrase per node and field)."""
    ref, out, seen = found[0], [], set()
    for rank, rec in enumerate(found[1:], 1):
        for key, what in (("data", "training data"), ("args", "training arguments"), ("resume", "resume point")):
            if rec.get(key) != ref.get(key) and (rec.get("node"), key) not in seen:
                seen.add((rec.get("node"), key))
                mine, theirs = rec.get(key), ref.get(key)
                if key == "data":
                    mine, theirs = f"{mine[:16]} ({rec.get('covers')})", f"{theirs[:16]} ({ref.get('covers')})"
                elif key == "args":
                    mine, theirs = mine[:16], theirs[:16]
                hint = {"data": "build the same data on every node (or share one filesystem)",
                        "args": "run the same command and recipe on every node",
                        "resume": "give every node the same checkpoints (a shared filesystem) or the same RESUME="}[key]
                out.append(f"{what} of node {rec.get('node')} (rank {rank}) is {mine}, node {ref.get('node')}'s is "
                           f"{theirs}: {hint}")
    return out


def for_training(config: dict) -> list:
    """The callbacks for one `_training_function(config)` call."""
    args = config.get("args")
    out = [_recorder_class()(dict(args) if isinstance(args, dict) else args), _speed_class()()]  # (as given)
    if isinstance(args, dict) and args.get("do_train", True):
        args.setdefault("include_num_input_tokens_seen", "non_padding")  # for the speed record
    mine = os.environ.get(CHECK_ENV)
    if mine:
        try:
            out.append(_check_class()(json.loads(mine)))
        except ValueError:
            print(f"llamafactory_ext: ${CHECK_ENV} is not JSON; the nodes are not compared", file=sys.stderr)
    return out
