"""How fast: training tokens/s and hours, MFU, and review generation (batch from memory, expected time), per card.

Training, per GPU and micro-step of T = batch x cutoff tokens at sequence length s:

    step time = A x (4.8 TB/s / the card's bandwidth)  +  T x F(s) / (ETA x the card's dense BF16 peak)
    F(s) = 6 N + 12 L d s   FLOPs per token (N parameters, L layers, d = heads x head_dim; PaLM's count)

A (seconds, memory-bound: dequantizing the 4-bit weights and the optimizer step) and ETA (the share of the peak
the matmuls reach) are fitted on the H200 (tests/fixtures/gpu_h200_2026-12-04.json: Mistral-7B at 4,096 and
12,288 tokens, steady seconds per step); other cards scale by their bandwidth and their peak (gpus.py), the
stated rule. Mistral 4K/12K are reproduced exactly (two points, two parameters); gemma-7b 12K is -5 % (stock
loss) and +9 % (Liger), a check. tokens/s = T / step time; with G GPUs, G x that (ideal data-parallel scaling).
MFU = 6 N x tokens/s / peak (the convention the measurements were reported in).

Generation (HF generate through LLaMA-Factory's predict): the KV cache holds 2 x layers x kv_heads x head_dim x 2
bytes per token (bf16 keys and values: Mistral-7B 131,072 B, gemma-7b 458,752 B) for prompt + new tokens of every
sequence of the batch, beside the bf16 weights (2 N bytes) and the prefill's activations (GEN_ACT x the MLP width
per prompt token, fitted: 0.75 GiB a 7,000-token Mistral prompt at batch 8 and 32). The batch is the largest whose total stays within
GEN_MARGIN of the card. On the H200, HF generate took 0.111-0.118 s per decoding step whatever the batch (1 to
32: launch-bound; reading the weights and the KV cache bounds it on slow cards), so a batch's time is max_new_tokens
steps plus its prefill (2 N FLOPs per prompt token at ETA).
"""

from __future__ import annotations

import math

from llamafactory_ext import gpus

GiB = 1024**3
# fitted on the H200 measurements (module docstring)
STEP_FIXED_S = 0.261  # A: seconds per micro-step at 4.8 TB/s
ETA = 0.495  # share of the dense BF16 peak the training matmuls reach
DECODE_STEP_S = 0.115  # HF generate, one step of a batch (H200, 1-32 sequences; scaled by bandwidth)
GEN_ACT = 8.0  # bytes x MLP width per prompt token alive during the prefill (0.75 GiB for Mistral's 7,000 tokens)
GEN_MARGIN = 0.90  # of the card's memory, for the allocator's cache and the CUDA context

# what the constants were fitted on and are checked against (`plan --speed-check`): steady tokens/s on the H200
# (one sequence of exactly cutoff_len tokens per step; tests/fixtures/gpu_h200_2026-12-04.json), and the seed's
# own gemma-7b-it figure on one A40 (5K and 15K records of ~8-9K tokens, 2 epochs: 35 h and 110 h)
H200_MEASURED = (("mistral", 4096, False, 6037), ("mistral", 12288, False, 6691), ("gemma", 12288, True, 6821),
                 ("gemma", 12288, False, 5925))
SEED_A40 = (("gemma", 5000, 35.0), ("gemma", 15000, 110.0))
SEED_TOKENS_PER_RECORD = 8500


def flops_per_token(arch, seq: int) -> float:
    """F(s) = 6 N + 12 L d s (N: every parameter of the base model)."""
    from llamafactory_ext.fit import memory

    n = memory.param_counts(arch, memory.Setup())["total"]
    return 6 * n + 12 * arch.layers * arch.heads * arch.head_dim * seq


def params(arch) -> int:
    from llamafactory_ext.fit import memory

    return memory.param_counts(arch, memory.Setup())["total"]


def step_seconds(arch, tokens: int, seq: int, card: gpus.Card) -> float:
    if not card.bf16_tflops:
        raise ValueError(f"{card.name} has no BF16: the recipes need a card that has it")
    ref = gpus.CARDS[gpus.REFERENCE]
    return (STEP_FIXED_S * ref.bandwidth_gbs / card.bandwidth_gbs
            + tokens * flops_per_token(arch, seq) / (ETA * card.bf16_tflops * 1e12))


def train_speed(arch, batch: int, cutoff: int, card: gpus.Card, gpus_n: int = 1) -> dict:
    """tokens/s (all GPUs), seconds per micro-step and MFU for batch x cutoff tokens per GPU and micro-step."""
    t = step_seconds(arch, batch * cutoff, cutoff, card)
    tps = gpus_n * batch * cutoff / t
    mfu = 6 * params(arch) * tps / gpus_n / (card.bf16_tflops * 1e12)
    return {"card": card.name, "gpus": gpus_n, "train_tokens_per_s": round(tps, 1), "step_s": round(t, 3),
            "mfu": round(mfu, 4), "mfu_formula": "6 x params x tokens/s per GPU / dense BF16 peak"}


def mfu(n_params: int, tokens_per_s: float, card: gpus.Card | None, gpus_n: int = 1) -> float | None:
    if card is None or not card.bf16_tflops:
        return None
    return 6 * n_params * tokens_per_s / gpus_n / (card.bf16_tflops * 1e12)


# ----------------------------------------------------------------------------- generation
def kv_bytes_per_token(arch) -> int:
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * 2


def predict_batch(arch, prompt: int, new_tokens: int, card_gib: float, limit: int = 256) -> tuple[int, dict]:
    """The largest batch whose weights + KV cache + prefill activations fit GEN_MARGIN of the card, and why."""
    weights = 2 * params(arch)
    per_seq = (prompt + new_tokens) * kv_bytes_per_token(arch) + prompt * GEN_ACT * arch.intermediate
    room = GEN_MARGIN * card_gib * GiB - weights
    batch = max(0, min(limit, int(room // per_seq)))
    return batch, {"weights_gib": round(weights / GiB, 2), "per_sequence_gib": round(per_seq / GiB, 3),
                   "kv_bytes_per_token": kv_bytes_per_token(arch), "usable_gib": round(GEN_MARGIN * card_gib, 1)}


def predict_seconds(arch, papers: int, batch: int, prompt: int, new_tokens: int, card: gpus.Card | None) -> float:
    """HF generate: per batch, its prefill plus max_new_tokens decoding steps (the batch runs to the cap)."""
    ref = gpus.CARDS[gpus.REFERENCE]
    card = card or ref
    peak = (card.bf16_tflops or ref.bf16_tflops) * 1e12
    batches = math.ceil(papers / max(batch, 1))
    prefill = batch * prompt * 2 * params(arch) / (ETA * peak)
    # a decoding step reads the weights and the batch's KV cache; HF generate's own overhead bounds it below
    read = 2 * params(arch) + batch * (prompt + new_tokens / 2) * kv_bytes_per_token(arch)
    step = max(DECODE_STEP_S, read / (card.bandwidth_gbs * 1e9))
    return batches * (prefill + new_tokens * step)


def speed_check() -> str:
    """The speed model against its H200 measurements and the seed's A40 figure, as a table (`plan --speed-check`)."""
    from llamafactory_ext import families
    from llamafactory_ext.fit import memory

    def arch(name):
        return memory.arch_from_config(families.get(name).arch, families.get(name).model)

    h200, a40 = gpus.CARDS["h200"], gpus.CARDS["a40"]
    lines = ["| measured | tokens/s measured | predicted | off |", "|---|---|---|---|"]
    for fam, cutoff, liger, measured in H200_MEASURED:
        got = train_speed(arch(fam), 1, cutoff, h200)["train_tokens_per_s"]
        lines.append(f"| H200 {fam} {cutoff:,}{' Liger' if liger else ''} | {measured:,} | {got:,.0f} | "
                     f"{100 * (got - measured) / measured:+.0f} % |")
    lines += ["", "| the seed on one A40 | hours | predicted | off |", "|---|---|---|---|"]
    for fam, records, hours in SEED_A40:
        tps = train_speed(arch(fam), 1, SEED_TOKENS_PER_RECORD, a40)["train_tokens_per_s"]
        got = records * 2 * SEED_TOKENS_PER_RECORD / tps / 3600
        lines.append(f"| {fam} {records:,} records x 2 epochs x ~{SEED_TOKENS_PER_RECORD:,} tokens | {hours:g} | "
                     f"{got:.0f} | {100 * (got - hours) / hours:+.0f} % |")
    return "\n".join(lines) + ("\n\nThe seed's A40 ran slower than the model says (27 % MFU counting 6 x params: the "
                               "A40's 300 W cap keeps its clocks below the datasheet's peak, and an older stack).")
