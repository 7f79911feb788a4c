"""`plan --calibrate runs/*/`: the planner against what runs recorded (memory and speed).

Every training run writes `peak_memory.json` and `speed.json` beside its adapter (train/callbacks.py); this
compares each with the planner's prediction for the same arguments: allocated and reserved memory (fit/plan.py)
and tokens/s (fit/speed.py, on the card the run used). A run on a CPU has nothing to compare (skipped, said so).
"""

from __future__ import annotations

import json
from pathlib import Path

from llamafactory_ext import UserError, gpus
from llamafactory_ext.fit.memory import GiB, arch_from_config, estimate, resolve_arch, setup_from_recipe
from llamafactory_ext.train.callbacks import RECORD, SPEED


def find_records(paths: list[str]) -> list[Path]:
    """peak_memory.json files: the paths themselves, or anywhere under the given folders."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob(RECORD))
        else:
            raise UserError(f"--calibrate {raw}: no such file or folder")
    return list({p.resolve(): p for p in found}.values())


def calibrate_one(path: Path, base: Path | None = None) -> dict:
    """The recorded peaks of one run against the planner's prediction for the same arguments."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        args = rec["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a peak-memory record ({e})") from e
    row: dict = {"record": str(path), "device": rec.get("device"), "step": rec.get("step"),
                 "event": rec.get("event"), "gpus": rec.get("world_size", 1)}
    if not isinstance(args, dict):
        return {**row, "skipped": "the run's arguments were not a YAML/JSON file (command-line arguments)"}
    cutoff, batch = int(args.get("cutoff_len", 2048)), int(args.get("per_device_train_batch_size", 8))
    longest = rec.get("longest_sequence")
    used = min(cutoff, int(longest)) if longest else cutoff  # padding goes to the longest in a batch
    row.update(cutoff=cutoff, longest_sequence=longest, batch=batch, tokens=used * batch)
    if not rec.get("cuda"):
        return {**row, "skipped": f"no GPU in that run (CPU max RSS {rec.get('cpu_max_rss_gib', 0):.2f} GiB)"}
    if isinstance(rec.get("deepspeed_config"), dict):  # the config the run really used, "auto" values filled in
        args = dict(args, deepspeed=rec["deepspeed_config"])
    model = str(args.get("model_name_or_path", ""))
    try:
        arch = (arch_from_config(rec["model_config"], model) if isinstance(rec.get("model_config"), dict)
                else resolve_arch(model, base))
        e = estimate(arch, setup_from_recipe(args, None, cutoff=used, gpus=int(row["gpus"] or 1)))
    except UserError as err:
        return {**row, "skipped": f"no prediction: {err}"}
    pred = {"reserved": e.reserved / GiB, "allocated": e.allocated / GiB}
    meas = {"reserved": rec.get("max_memory_reserved_gib"), "allocated": rec.get("max_memory_allocated_gib")}
    speed_file = path.parent / SPEED
    card = gpus.by_device_name(rec.get("device"))
    if speed_file.is_file() and card is not None and card.bf16_tflops:
        from llamafactory_ext.fit import speed

        spd = json.loads(speed_file.read_text(encoding="utf-8"))
        meas["tokens_per_s"] = spd.get("tokens_per_s")
        pred["tokens_per_s"] = speed.train_speed(arch, batch, used, card, int(row["gpus"] or 1))["train_tokens_per_s"]
    for k in pred:
        row[f"{k}_recorded"], row[f"{k}_predicted"] = meas[k], pred[k]
        row[f"{k}_residual"] = None if meas[k] is None else meas[k] - pred[k]
        row[f"{k}_ratio"] = None if not meas[k] else meas[k] / pred[k]
    return row


def calibration_table(rows: list[dict]) -> str:
    def f(x):
        return "n/a" if x is None else f"{x:.2f}"

    def sign(x):
        return "n/a" if x is None else f"{x:+.2f}"

    head = ["run", "device", "tokens (cutoff x batch)", "recorded reserved", "predicted reserved", "residual",
            "recorded alloc", "predicted alloc", "residual", "recorded tokens/s", "predicted tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in rows:
        run_name = str(Path(r["record"]).parent)
        if "skipped" in r:
            notes.append(f"{run_name}: {r['skipped']}")
            continue
        shape = f"{r['tokens']:,} ({r['cutoff']:,} x {r['batch']})"
        if r.get("longest_sequence") and r["longest_sequence"] < r["cutoff"]:
            shape = f"{r['tokens']:,} (longest {r['longest_sequence']:,} x {r['batch']})"
        lines.append("| " + " | ".join([
            run_name, str(r["device"]), shape, f(r["reserved_recorded"]), f(r["reserved_predicted"]),
            sign(r["reserved_residual"]), f(r["allocated_recorded"]), f(r["allocated_predicted"]),
            sign(r["allocated_residual"]), f(r.get("tokens_per_s_recorded")), f(r.get("tokens_per_s_predicted"))]) + " |")
    measured = [r for r in rows if "skipped" not in r and r["reserved_ratio"]]
    out = "\n".join(lines) if measured else "no run with a GPU measurement"
    if measured:
        rel = [abs(r["reserved_ratio"] - 1) for r in measured]
        out += (f"\n\nGiB. residual = recorded - predicted (reserved = torch.cuda.max_memory_reserved). "
                f"{len(measured)} run(s): mean |residual| of reserved "
                f"{100 * sum(rel) / len(rel):.1f} %, worst {100 * max(rel):.1f} %.")
    return out + "".join(f"\nskipped {n}" for n in notes)


def calibrate(paths: list[str], as_json: bool = False) -> int:
    records = find_records(paths)
    if not records:
        raise UserError(f"no {RECORD} under {' '.join(paths)}: runs record their peak memory when the "
                        "llamafactory_ext plugin is active (see `llamafactory-ext doctor`)")
    from llamafactory_ext import project

    rows = [calibrate_one(p, project.get().root) for p in records]
    if as_json:
        print(json.dumps([{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows], indent=1))
    else:
        print(calibration_table(rows))
    return 0
