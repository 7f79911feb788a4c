"""Check LLaMA-Factory training arguments without loading a model: `run sft` (a dry run here, a real run in its
training process before anything loads: `refuse_bad_values`) and the recipe tests.

Two layers, both reporting EVERY bad key at once:
  1. values: each key's value against the type of LLaMA-Factory's own dataclass field (int, float, bool,
     str, Literal choices) and the ranges that make sense (a batch size of 0, a negative learning rate,
     an empty or unknown template);
  2. LLaMA-Factory's parser itself (`get_train_args`: unknown keys, incompatible combinations).
`llamafactory-cli train` hands a YAML dict to HfArgumentParser.parse_dict, which converts nothing:
`cutoff_len: abc` would only fail deep inside data loading. Runs in a child process
(`python -m llamafactory_ext.train.parsecheck`, one JSON dict per stdin line) so the caller stays light and
several recipes share one import of LLaMA-Factory. On a CPU machine the child poses as rank 0 of 1 so
DeepSpeed recipes parse, and sets `use_cpu` so bf16 recipes parse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

POSITIVE = ("cutoff_len", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
            "lora_rank", "lora_alpha", "num_train_epochs", "learning_rate", "save_steps", "logging_steps",
            "max_samples", "max_new_tokens", "preprocessing_num_workers", "save_total_limit", "eval_steps")
UNIT_INTERVAL = ("warmup_ratio", "lora_dropout", "top_p", "val_size")
NON_NEGATIVE = ("weight_decay", "max_grad_norm", "temperature", "max_steps", "warmup_steps")


def _kind(hint):
    """(base type or Literal, choices) of a field type, Optional stripped; None when not checkable."""
    import typing

    origin = typing.get_origin(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        lits = [a for a in args if typing.get_origin(a) is typing.Literal]
        if lits and len(lits) == len(args):
            return "literal", [c for lit in lits for c in typing.get_args(lit)]
        if len(args) == 1:
            return _kind(args[0])
        return None, None
    if origin is typing.Literal:
        return "literal", list(typing.get_args(hint))
    if hint in (int, float, bool, str):
        return hint, None
    import enum

    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "literal", [m.value for m in hint]
    return None, None


def value_problems(args: dict, dataclasses_: list) -> list[str]:
    """Type and range problems of `args` against LLaMA-Factory's dataclasses, one line per bad key."""
    import dataclasses
    import typing

    fields = {}
    for cls in dataclasses_:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001 - a forward reference we cannot resolve: skip those fields
            hints = {}
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, hints.get(f.name))
    problems = []
    for key, value in args.items():
        if value is None or key not in fields:
            continue  # unknown keys are the parser's to report
        kind, choices = _kind(fields[key])
        bad = None
        if kind is bool and not isinstance(value, bool):
            bad = "expected true or false"
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            bad = "expected a whole number"
        elif kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            bad = "expected a number"
        elif kind is str and not isinstance(value, str):
            bad = "expected text"
        elif kind == "literal" and value not in choices:
            bad = f"expected one of {choices}"
        elif key in POSITIVE and isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            bad = "must be greater than 0"
        elif key in UNIT_INTERVAL and isinstance(value, int | float) and not 0 <= value <= 1:
            bad = "must be between 0 and 1"
        elif key in NON_NEGATIVE and isinstance(value, int | float) and value < 0:
            bad = "must not be negative"
        if bad:
            problems.append(f"{key}: {value!r}: {bad}")
    template = args.get("template", "")
    if "template" in args and (not isinstance(template, str) or not template.strip()):
        problems.append(f"template: {template!r}: expected a LLaMA-Factory template name (e.g. mistral)")
    elif isinstance(template, str) and template:
        from llamafactory.data import TEMPLATES

        if template not in TEMPLATES:
            near = sorted(t for t in TEMPLATES if t.startswith(template[:3]))[:8]
            problems.append(f"template: {template!r} is not a LLaMA-Factory template"
                            + (f" (similar: {', '.join(near)})" if near else ""))
    return problems


def _literal_problems(parsed) -> list[str]:
    """HfArgumentParser.parse_dict does not enforce Literal choices after its own conversions either."""
    import dataclasses
    import typing

    out = []
    for obj in parsed:
        try:
            hints = typing.get_type_hints(type(obj))
        except Exception:  # noqa: BLE001
            continue
        for field in dataclasses.fields(obj):
            kind, choices = _kind(hints.get(field.name))
            value = getattr(obj, field.name)
            value = getattr(value, "value", value)
            if kind == "literal" and value is not None and value not in choices:
                out.append(f"{field.name}: {value!r}: expected one of {choices}")
    return out


def _check_one(a: dict, dataclasses_) -> dict:
    from llamafactory.hparams import get_train_args

    problems = value_problems(a, dataclasses_)
    if problems:
        return {"problems": problems}
    a = dict(a)
    if a.get("bf16") or a.get("fp16"):
        a.setdefault("use_cpu", True)  # only for validation on a machine without a GPU
    if a.get("enable_liger_kernel"):
        try:
            import liger_kernel  # noqa: F401  (GPU extra)
        except ImportError:
            a["enable_liger_kernel"] = False  # LLaMA-Factory requires the package; validate the rest
    if a.get("deepspeed"):
        # DeepSpeed's CPU backend compiles a C++ op (shm comm, ~90 s) inside init_distributed; parsing needs
        # no collective ops, so mark it unavailable in this validation-only child.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    try:
        parsed = get_train_args(a)
    except BaseException as e:  # noqa: BLE001 - LLaMA-Factory raises ValueError, SystemExit, ImportError...
        msg = (str(e) or type(e).__name__).strip().splitlines()
        return {"problems": [f"LLaMA-Factory rejected the arguments: {type(e).__name__}: {msg[-1] if msg else ''}"]}
    return {"problems": _literal_problems(parsed), "model_max_length": parsed[0].model_max_length}


def _child() -> None:
    from llamafactory.hparams import parser as lf_parser

    dataclasses_ = list(lf_parser._TRAIN_ARGS)
    for line in sys.stdin:
        print("RESULT " + json.dumps(_check_one(json.loads(line), dataclasses_)), flush=True)


def check_many(arg_dicts: list[dict]) -> list[list[str]]:
    """Problems of each argument dict (empty list = OK), checked in one child process."""
    import socket

    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # no torch import here (seconds): a machine without CUDA poses as rank 0 of 1 for DeepSpeed recipes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        env.setdefault(k, v)
    stdin = "".join(json.dumps(a) + "\n" for a in arg_dicts)
    p = subprocess.run([sys.executable, "-m", "llamafactory_ext.train.parsecheck"], input=stdin, text=True,
                       capture_output=True, env=env)
    results = [json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    out = []
    for i in range(len(arg_dicts)):
        if i >= len(results):
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            out.append([f"LLaMA-Factory's parser crashed: {tail}"])
        else:
            out.append(results[i]["problems"])
    return out


def check(args: dict) -> list[str]:
    return check_many([args])[0]


IN_PROCESS = "LLAMAFACTORY_EXT_CHECK_VALUES"  # set by `run sft`: the training process checks its own arguments


def refuse_bad_values(args: dict | None) -> None:
    """In the training process itself, before LLaMA-Factory parses and loads anything (patches.py): the value checks
    of `check` (LLaMA-Factory's own parser follows at once), without a second process paying the imports again.
    Prints every problem and exits 2."""
    from llamafactory.hparams import parser as lf_parser

    problems = value_problems(dict(args or {}), list(lf_parser._TRAIN_ARGS))
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"error: {len(problems)} problem(s) with the arguments; nothing was trained", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    _child()
