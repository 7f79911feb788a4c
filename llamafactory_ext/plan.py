"""Will this recipe fit? Peak GPU memory of a LoRA/QLoRA recipe, from first principles, before launching.

    llamafactory-ext plan sft_recipes/mistral_15k.yaml --gpu a40
    llamafactory-ext plan sft_recipes/gemma_15k.yaml --gpu-mem 45 --batch 1 --cutoff 9216 --json
    llamafactory-ext plan sft_recipes/gemma_15k.yaml --gpu a40 --liger
    llamafactory-ext plan --table                         # Markdown: model x cutoff x batch (seed settings)

Units: GiB (2^30 bytes) everywhere. `--gpu-mem` is the memory the GPU really has, as `nvidia-smi
--query-gpu=memory.total` reports it in MiB, divided by 1024: a "48 GB" A40 shows 46068 MiB = 45.0 GiB,
because ECC keeps 1/16 of it. `--gpu a40` fills that in. The seed's "33 GB / 47 GB" readings are decimal
GB (47 GiB would not even fit on an A40).

The model, for T = batch x cutoff tokens per micro-step:

    peak = W + S + C + T x (c_ckpt + c_layer + c_head) + attention s^2 terms

* W, frozen weights: 4-bit NF4 = 0.5 B/param of every linear projection, plus the quantization
  constants (fp32 absmax per 64 weights = 0.0625 B/param; 0.0159 with double quantization), plus the
  bf16 embedding and LM head (bitsandbytes leaves them unquantized; stored once when tied).
* S, trainable LoRA parameters: fp32 weights + fp32 grads + AdamW m and v = 16 B/param (LLaMA-Factory
  upcasts them to fp32). Under DeepSpeed ZeRO-1/2 (which casts the model to bf16): bf16 weight + bf16
  grad + fp32 master + fp32 grad + m + v = 20 B/param (the fp32 parts split over the GPUs), plus its
  gradient bucket (reduce_bucket_size x 2 B).
* C: the CUDA context (0.6 GiB, outside PyTorch's allocator: in nvidia-smi, not in
  max_memory_allocated/reserved) plus two dequantized bf16 copies of the largest 4-bit weight (forward
  and backward of bitsandbytes' matmul_4bit).
* c_ckpt, gradient checkpointing: one bf16 hidden state per layer and token, L x h x 2 B.
* c_layer, the one layer that is recomputed during backward: what autograd saves (two RMSNorms keep an
  fp32 copy and their bf16 output, 12h; q/k/v after RoPE and the attention output; gate, up, act and
  their product, 8I; per LoRA projection the bf16 copy of its input (LLaMA-Factory's fp32 LoRA weights
  make peft cast the input, autocast casts it back) and, with lora_dropout > 0, the dropout mask) plus
  the gradients alive while down_proj runs backward. Flash-attention has no s^2 term; SDPA on a padded
  batch (b > 1) uses the memory-efficient kernel with a b x s x s mask (1 B, and 2 B as a bias in the
  recomputed layer) and repeats k/v for GQA; eager attention stores b x heads x s^2 probabilities.
* c_head, the loss: transformers 5.6 `ForCausalLMLoss` upcasts the logits to fp32 before
  cross_entropy; during its backward the fp32 log-softmax it saved, the incoming fp32 gradient and the
  outgoing one are alive together: 12 B x V per token (plus the final norm, 6h). Liger's fused linear
  cross entropy (`enable_liger_kernel: true`) never materialises the logits: ~4h per token; Liger also
  swaps RMSNorm (saves 4h less per norm) and the gated MLP (saves 2I less).

How the terms compose is calibrated, not derived. The live tensors peak at c_ckpt + max(c_layer,
c_head) per token (the loss backward and the layer recompute come one after the other); that is
`torch.cuda.max_memory_allocated`, `allocated_gib` in the JSON. What nvidia-smi shows is higher, because
PyTorch's caching allocator keeps freed blocks reserved; how much higher depends on block reuse, which
this model does not simulate. `peak` ADDS the terms, c_ckpt + c_layer + c_head per token, because that
rule is the one that reproduces the seed's runs on the A40 (Mistral-7B at 12,288 tokens: 33 GB at batch
2, 47 GB at batch 3, predicted 33.1 / 45.3 GiB = 35.6 / 48.7 GB; gemma-7b: 9K fits, 10K does not). The
live-tensor rule would predict 24.1 / 31.7 GiB for Mistral (22-28 % too little) and let gemma fit at
10K. Three observations on one card and one software stack: treat the rule as a fit to them.

Other published measurements (tests/fixtures/published_memory_points.json, with sources, checked by
tests/test_plan.py) agree within 10 % (measured vs predicted) where their setup is expressible:
torchtune's Llama-2-7B LoRA and QLoRA (+1 %, +6 %), litgpt's Llama-2-7B LoRA/QLoRA without
checkpointing (-6 % to +9 %), Qwen-7B LoRA at 256-8,192 tokens (-7 % to +4 %). One known miss:
Unsloth's "HF + FA2" column for Llama-3.1-8B QLoRA needs 24-36 % more memory than predicted (15-27 % if
its "GB" are decimal); on 80 GB it reaches 28,454 tokens where the planner would allow 35,840. That
column is one straight line (4 GB per 1,619 tokens from 9.7 GB at zero) on an unpublished
transformers/peft setup; the planner does NOT reproduce it.
tests/test_plan.py checks the per-token terms against a live-tensor trace of a real LLaMA-Factory QLoRA
step on CPU; `plan --calibrate runs/*/` compares the prediction with the peaks every run records
(`peak_memory.json`, written by llamafactory_ext.patches).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from llamafactory_ext import UserError

GiB = 1024**3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_CONTEXT = 0.6 * GiB
ROUND = 256  # recommended cutoffs are multiples of this

# nvidia-smi memory.total (MiB) of common cards, default ECC setting.
GPUS_MIB = {
    "a40": 46068, "l40s": 46068, "a6000": 49140, "a100-40": 40960, "a100-80": 81920,
    "h100": 81559, "h200": 143771, "4090": 24564, "a10g": 23028, "l4": 23034, "t4": 15360, "v100-32": 32768,
}

# a card's marketed size -> what it exposes, where the two differ materially
NOMINAL_GIB = {48: GPUS_MIB["a40"] / 1024}


@dataclass(frozen=True)
class Arch:
    """The architecture numbers the memory model needs (a Llama-style decoder with a gated MLP)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int | None = None

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each projection."""
        h, q, kv, inter = self.hidden, self.q, self.kv, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


# Keys that make a config.json a mixture-of-experts model (Mixtral, Qwen-MoE, DeepSeek, OLMoE, ...).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def arch_from_config(cfg: dict, name: str) -> Arch:
    """Arch from a Hugging Face config.json dict (multimodal configs: their `text_config`)."""
    cfg = cfg.get("text_config") or cfg
    experts = [(k, cfg[k]) for k in MOE_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 1]
    if experts:
        k, v = experts[0]
        raise UserError(f"{name}: config.json has {k}: {v}, a mixture-of-experts model; the planner models dense "
                        "decoders only (it would count one MLP per layer instead of every expert's)")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        tied_default = cfg.get("model_type", "").startswith("gemma")
        return Arch(
            name=name, hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", tied_default)),
            max_positions=cfg.get("max_position_embeddings"),
        )
    except KeyError as e:
        raise UserError(f"{name}: config.json has no {e.args[0]!r}; the planner needs a Llama-style decoder "
                        "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)") from e


def builtin_archs(hub_only: bool = False) -> dict[str, Arch]:
    """Family.model -> Arch of every family in llamafactory_ext/families.py that has an `arch`; hub_only: only
    the models downloaded from a hub (the real 7B ones), not those built on this machine."""
    from llamafactory_ext import families

    return {f.model: arch_from_config(f.arch, f.model) for f in families.FAMILIES.values()
            if f.arch and not (hub_only and f.local)}


def resolve_arch(model: str, base: Path | None = None) -> Arch:
    """A local model folder's config.json, else a family's `arch`, matched by the family's `model` (hub id or
    local build folder) or by its last path component (a local copy of the same model)."""
    for cand in [Path(model)] + ([base / model] if base is not None else []):
        cfg_path = cand / "config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"{cfg_path}: not a readable JSON file ({e})") from e
            return arch_from_config(cfg, model)
    known = builtin_archs()
    text = model.rstrip("/").lower()
    for key, arch in known.items():
        if text == key.lower() or text.endswith("/" + key.rsplit("/", 1)[-1].lower()):
            return arch
    raise UserError(f"model_name_or_path {model!r}: no config.json there and not a built-in architecture "
                    f"({', '.join(known)}); point it at a local model folder")


@dataclass(frozen=True)
class Setup:
    """The recipe settings that change memory."""

    cutoff: int = 2048
    batch: int = 1
    quant_bit: int | None = None
    double_quant: bool = True
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = PROJECTIONS
    lora_dropout: float = 0.0
    attention: str = "sdpa"  # fa2 | sdpa | eager
    liger: bool = False
    grad_ckpt: bool = True
    offload_ckpt: bool = False  # use_unsloth_gc: checkpoints in host RAM
    optim: str = "adamw_torch"
    lora_fp32: bool = True  # LLaMA-Factory upcasts trainable params unless DeepSpeed/pure_bf16
    ds_stage: int = 0
    ds_bucket: float = 0.0  # bytes of the contiguous-gradient bucket(s)
    ds_offload_optimizer: bool = False
    gpus: int = 1
    extra_targets: tuple[str, ...] = ()  # additional_target: modules trained in full
    rope_scaling: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def tokens(self) -> int:
        return self.cutoff * self.batch


ATTENTION = {"fa2": "fa2", "fa3": "fa2", "sdpa": "sdpa", "auto": "sdpa", "disabled": "eager", "eager": "eager"}


def _deepspeed(value, recipe_path: Path | None) -> tuple[dict, str | None]:
    """The DeepSpeed config dict of a recipe's `deepspeed:` (a path or an inline dict)."""
    if isinstance(value, dict):
        return value, None
    cands = [Path(value)]
    if recipe_path is not None:
        cands += [recipe_path.parent / value, recipe_path.parent.parent / value]
    for c in cands:
        if c.is_file():
            return json.loads(c.read_text()), None
    return {"zero_optimization": {"stage": 2}}, f"deepspeed config {value} not found; assumed ZeRO-2 defaults"


def setup_from_recipe(recipe: dict, path: Path | None = None, **overrides) -> Setup:
    """Setup from a LLaMA-Factory training YAML (missing keys take LLaMA-Factory/HF defaults)."""
    where = f"{path}" if path else "recipe"
    ft = recipe.get("finetuning_type", "lora")
    if ft != "lora":
        raise UserError(f"{where}: finetuning_type: {ft}; the planner models LoRA/QLoRA only")
    notes = []
    target = recipe.get("lora_target", "all")
    if str(target).strip() == "all":
        targets = PROJECTIONS
    else:
        names = [t.strip() for t in str(target).split(",") if t.strip()]
        unknown = [t for t in names if t not in PROJECTIONS]
        if unknown:
            notes.append(f"lora_target {', '.join(unknown)} not modelled (only {', '.join(PROJECTIONS)})")
        targets = tuple(t for t in PROJECTIONS if t in names)
    attn = str(recipe.get("flash_attn", "auto"))
    if attn not in ATTENTION:
        raise UserError(f"{where}: flash_attn: {attn} is not one of {', '.join(ATTENTION)}")
    if attn == "fa3":
        notes.append("flash_attn: fa3 raises NotImplementedError in LLaMA-Factory 0.9.5 (except gpt_oss); use fa2")
    if attn == "fa2":
        notes.append("flash_attn: fa2 assumes flash-attn is installed; without it LLaMA-Factory falls back to SDPA")
    ds_stage, ds_bucket, ds_off = 0, 0.0, False
    if recipe.get("deepspeed"):
        cfg, note = _deepspeed(recipe["deepspeed"], path)
        if note:
            notes.append(note)
        zero = cfg.get("zero_optimization", {})
        ds_stage = int(zero.get("stage", 0))
        bucket = zero.get("reduce_bucket_size", 5e8)
        bucket = 5e8 if bucket == "auto" else float(bucket)
        if ds_stage in (1, 2) and zero.get("contiguous_gradients", True):
            ds_bucket = bucket * 2 * (2 if zero.get("overlap_comm") else 1)
        off = zero.get("offload_optimizer") or {}
        ds_off = str(off.get("device", "none")) == "cpu"
        if ds_stage == 3:
            notes.append("ZeRO-3 modelled like ZeRO-2 (the 4-bit base is not partitioned)")
    extra = tuple(t.strip() for t in str(recipe.get("additional_target") or "").split(",") if t.strip())
    s = Setup(
        cutoff=int(recipe.get("cutoff_len", 2048)),
        batch=int(recipe.get("per_device_train_batch_size", 8)),
        quant_bit=recipe.get("quantization_bit"),
        double_quant=bool(recipe.get("double_quantization", True)),
        lora_rank=int(recipe.get("lora_rank", 8)),
        lora_targets=targets,
        lora_dropout=float(recipe.get("lora_dropout", 0.0)),
        attention=ATTENTION[attn],
        liger=bool(recipe.get("enable_liger_kernel", False)),
        grad_ckpt=not recipe.get("disable_gradient_checkpointing", False),
        offload_ckpt=bool(recipe.get("use_unsloth_gc", False)),
        optim=str(recipe.get("optim", "adamw_torch")),
        lora_fp32=not (ds_stage or recipe.get("pure_bf16")),
        ds_stage=ds_stage, ds_bucket=ds_bucket, ds_offload_optimizer=ds_off,
        extra_targets=extra,
        rope_scaling=recipe.get("rope_scaling"),
        notes=tuple(notes) + ((f"additional_target {', '.join(extra)}: trained in full",) if extra else ()),
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(s, **overrides)


# ----------------------------------------------------------------------------- parameter counts
def param_counts(arch: Arch, setup: Setup) -> dict[str, int]:
    """linear (quantizable), embedding (+ untied head), norms, LoRA trainable, total base parameters."""
    shapes = arch.shapes()
    linear = arch.layers * sum(i * o for i, o in shapes.values())
    embed = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    norms = (2 * arch.layers + 1) * arch.hidden
    lora = arch.layers * sum(setup.lora_rank * (shapes[p][0] + shapes[p][1]) for p in setup.lora_targets)
    extra = sum(arch.vocab * arch.hidden for t in setup.extra_targets if t in ("embed_tokens", "lm_head"))
    return {"linear": linear, "embedding": embed, "norms": norms, "lora": lora, "extra_trainable": extra,
            "total": linear + embed + norms}


def optimizer_bytes_per_param(optim: str) -> float:
    o = optim.lower()
    if "8bit" in o:
        return 2.0
    if o.startswith("sgd"):
        return 4.0
    if "adafactor" in o:
        return 0.5
    return 8.0


# ----------------------------------------------------------------------------- per-token terms
def per_token(arch: Arch, s: Setup) -> dict[str, float]:
    """Bytes per token of each activation term (see the module docstring)."""
    h, q, kv, inter = arch.hidden, arch.q, arch.kv, arch.intermediate
    shapes = arch.shapes()
    lora_in = sum(shapes[p][0] for p in s.lora_targets)
    # per LoRA projection: the bf16 copy of its input (fp32 LoRA) / dropout output (bf16 LoRA), + the mask
    if s.lora_fp32:
        lora_saved = 2 * lora_in + (lora_in if s.lora_dropout > 0 else 0)
    else:
        lora_saved = 3 * lora_in if s.lora_dropout > 0 else 0
    norms = 2 * (4 * h if s.liger else 6 * h)
    mlp = 6 * inter if s.liger else 8 * inter
    attn = 4 * q + 4 * kv  # rotated q, k; v; output (+ logsumexp, negligible)
    if s.attention in ("sdpa", "eager"):
        attn += 2 * q  # transpose(1, 2).contiguous() copy of the output for o_proj
        if s.attention == "eager" or s.batch > 1:  # a mask: GQA falls back to repeat_kv
            attn += 4 * (q - kv)
    saved = norms + lora_saved + attn + mlp
    # backward of down_proj: grad of its output, of its input, and the LoRA path's grad (and dropout's)
    g = 4 if s.lora_fp32 else 2
    bwd = 2 * h + 2 * inter
    if "down_proj" in s.lora_targets:
        bwd += g * inter * (2 if s.lora_dropout > 0 else 1)
    ckpt = 0 if (s.offload_ckpt or not s.grad_ckpt) else arch.layers * 2 * h
    if s.liger:
        head_live = head_reserved = 4 * h + 4 * h  # final norm + FLCE (grad_input + one logits chunk)
    else:
        head_live = head_reserved = 6 * h + 12 * arch.vocab
    layers_saved = saved if s.grad_ckpt else arch.layers * saved
    return {"ckpt": ckpt, "layer_saved": layers_saved, "layer_bwd": bwd, "layer": layers_saved + bwd,
            "head_live": head_live, "head": head_reserved}


def attention_quadratic(arch: Arch, s: Setup) -> float:
    """Bytes of the s^2 attention terms (mask, eager probabilities) for the whole micro-batch."""
    b, n = s.batch, s.cutoff
    if s.attention == "fa2":
        return 0.0
    if s.attention == "sdpa":
        return float(b * n * n * (1 + 2)) if b > 1 else 0.0  # bool mask + bf16 bias in the recomputed layer
    layers = 1 if s.grad_ckpt else arch.layers
    return float(b * n * n * 2 + b * arch.heads * n * n * (6 * layers + 8))


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    arch: Arch
    setup: Setup
    items: list[tuple[str, str, float]]  # key, label, bytes
    allocated: float
    gpu_mem: float | None
    notes: list[str]

    @property
    def peak(self) -> float:
        return sum(b for _, _, b in self.items)

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    @property
    def reserved(self) -> float:
        """What torch.cuda.max_memory_reserved would show: the peak less the CUDA context."""
        return self.peak - CUDA_CONTEXT

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem is None else self.peak <= self.gpu_mem * GiB


def estimate(arch: Arch, s: Setup, gpu_mem: float | None = None) -> Estimate:
    n = param_counts(arch, s)
    pt = per_token(arch, s)
    t = s.tokens
    items: list[tuple[str, str, float]] = []
    if s.quant_bit == 4:
        items.append(("weights", f"frozen 4-bit NF4 weights ({n['linear'] / 1e9:.2f} B params x 0.5 B)",
                      0.5 * n["linear"]))
        per = (1 / 64 + 4 / (64 * 256)) if s.double_quant else 4 / 64
        dq = "double quant" if s.double_quant else "fp32 absmax per 64"
        items.append(("quant_constants", f"quantization constants ({dq}, {per:.4f} B/param)", per * n["linear"]))
    elif s.quant_bit == 8:
        items.append(("weights", f"frozen int8 weights ({n['linear'] / 1e9:.2f} B params x 1 B)", 1.0 * n["linear"]))
    elif s.quant_bit is None:
        items.append(("weights", f"frozen bf16 weights ({n['linear'] / 1e9:.2f} B params x 2 B)", 2.0 * n["linear"]))
    else:
        raise UserError(f"quantization_bit: {s.quant_bit}; bitsandbytes only accepts 4 or 8")
    tie = "tied, stored once" if arch.tied else "untied"
    items.append(("embeddings", f"embeddings + LM head (bf16, {tie})", 2.0 * (n["embedding"] + n["norms"])))
    opt = optimizer_bytes_per_param(s.optim)
    p = n["lora"] + n["extra_trainable"]
    if s.ds_stage:
        split = 1 if s.ds_offload_optimizer else s.gpus
        fp32_part = 0.0 if s.ds_offload_optimizer else (4 + 4 + opt) / split
        lora = p * (2 + 2 + fp32_part)
        label = (f"LoRA {p / 1e6:.1f} M params: bf16 w+g, fp32 master+grad+{s.optim} "
                 f"(ZeRO-{s.ds_stage}{', optimizer on CPU' if s.ds_offload_optimizer else ''})")
    else:
        lora = p * ((4 + 4) if s.lora_fp32 else (2 + 2)) + p * opt
        label = f"LoRA {p / 1e6:.1f} M params: fp32 weights + grads + {s.optim} states"
    items.append(("lora", label, lora))
    if s.ds_bucket:
        items.append(("deepspeed_buckets", "DeepSpeed contiguous-gradient bucket (reduce_bucket_size x 2 B)",
                      s.ds_bucket))
    items.append(("cuda_context", "CUDA context (outside PyTorch's allocator)", CUDA_CONTEXT))
    if s.quant_bit:
        biggest = max(i * o for i, o in arch.shapes().values())
        items.append(("dequant", "dequantized bf16 copies of the largest weight (forward + backward)",
                      2 * 2.0 * biggest))
    if pt["ckpt"]:
        items.append(("checkpoints", f"checkpointed hidden states ({arch.layers} layers x {2 * arch.hidden} B/token)",
                      t * pt["ckpt"]))
    elif s.offload_ckpt:
        s = replace(s, notes=s.notes + (f"checkpoints in host RAM: {t * arch.layers * 2 * arch.hidden / GiB:.1f} GiB",))
    what = "one recomputed layer" if s.grad_ckpt else f"all {arch.layers} layers (no gradient checkpointing)"
    items.append(("layer", f"{what}: saved + backward ({pt['layer'] / 1024:.0f} KiB/token)", t * pt["layer"]))
    quad = attention_quadratic(arch, s)
    attn_label = {"fa2": "attention: flash-attn, no s^2 term",
                  "sdpa": "attention: SDPA" + (" padded-batch mask (b x s^2)" if s.batch > 1 else
                                               ", batch 1 uses the flash kernel: no s^2 term"),
                  "eager": "attention: eager, b x heads x s^2 probabilities"}[s.attention]
    items.append(("attention", attn_label, quad))
    if s.liger:
        head = f"loss: Liger fused linear cross entropy ({pt['head']} B/token, no logits)"
    else:
        head = f"final norm + fp32 logits + cross entropy (6h + 12 B x {arch.vocab} vocab/token)"
    items.append(("logits", head, t * pt["head"]))
    fixed = sum(b for k, _, b in items if k in ("weights", "quant_constants", "embeddings", "lora",
                                               "deepspeed_buckets", "dequant"))
    if s.grad_ckpt:  # the loss backward and the layer recompute come one after the other, both over the checkpoints
        act = pt["ckpt"] + max(pt["layer"], pt["head_live"])
    else:  # every layer's saved tensors are alive while the loss backward runs
        act = pt["layer_saved"] + max(pt["layer_bwd"], pt["head_live"])
    allocated = fixed + quad + t * act
    notes = list(s.notes)
    if s.optim.startswith("paged_"):
        notes.append(f"{s.optim}: {p * opt / GiB:.2f} GiB of optimizer states can page out to host RAM under "
                     "pressure (slower steps), so the hard limit is that much higher")
    if arch.max_positions and s.cutoff > arch.max_positions and not s.rope_scaling:
        notes.append(f"cutoff {s.cutoff} > {arch.max_positions} native positions: set rope_scaling (no memory cost)")
    return Estimate(arch, s, items, allocated, gpu_mem, notes)


# ----------------------------------------------------------------------------- searches
def max_batch(arch: Arch, s: Setup, gpu_mem: float, limit: int = 256) -> int:
    """Largest per-device batch that fits at s.cutoff (0: not even batch 1)."""
    best = 0
    for b in range(1, limit + 1):
        if estimate(arch, replace(s, batch=b), gpu_mem).fits:
            best = b
        else:
            break
    return best


def max_cutoff(arch: Arch, s: Setup, gpu_mem: float, batch: int | None = None) -> int:
    """Largest cutoff (a multiple of 256, up to 1M) that fits at `batch` (0: not even 256)."""
    b = batch or s.batch
    lo, hi = 0, (1 << 20) // ROUND
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(arch, replace(s, batch=b, cutoff=mid * ROUND), gpu_mem).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * ROUND


# ----------------------------------------------------------------------------- output
def to_json(e: Estimate, recipe: str | None = None) -> dict:
    s = e.setup
    out = {
        "recipe": recipe, "model": e.arch.name, "peak_gib": round(e.peak_gib, 3),
        "gpu_mem_gib": e.gpu_mem, "fits": e.fits, "allocated_gib": round(e.allocated / GiB, 3),
        "reserved_gib": round(e.reserved / GiB, 3), "tokens_per_device_step": s.tokens,
        "breakdown": {k: round(b / GiB, 3) for k, _, b in e.items},
        "breakdown_labels": {k: label for k, label, _ in e.items},
        "per_token_bytes": per_token(e.arch, s),
        "params": param_counts(e.arch, s),
        "arch": asdict(e.arch),
        "settings": {k: v for k, v in asdict(s).items() if k != "notes"},
        "notes": e.notes,
    }
    if e.gpu_mem is not None:
        out["recommend"] = {
            "max_batch_at_cutoff": max_batch(e.arch, s, e.gpu_mem),
            "max_cutoff_at_batch": max_cutoff(e.arch, s, e.gpu_mem),
            "max_cutoff_at_batch_1": max_cutoff(e.arch, s, e.gpu_mem, 1),
        }
    return out


def render(e: Estimate, recipe: str | None = None) -> str:
    s, a = e.setup, e.arch
    quant = {4: "QLoRA 4-bit NF4" + (" + double quant" if s.double_quant else ""), 8: "QLoRA 8-bit",
             None: "LoRA on bf16"}[s.quant_bit]
    lines = [
        f"Plan{' for ' + recipe if recipe else ''}: {a.name} ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab})",
        f"  {quant}, LoRA r={s.lora_rank} on {len(s.lora_targets)} projections (dropout {s.lora_dropout:g}), "
        f"attention {s.attention}, {'Liger fused CE' if s.liger else 'HF cross entropy'}"
        + (f", DeepSpeed ZeRO-{s.ds_stage} on {s.gpus} GPU(s)" if s.ds_stage else ""),
        f"  cutoff_len {s.cutoff} x per-device batch {s.batch} = {s.tokens:,} tokens per micro-step, "
        f"gradient checkpointing {'on' if s.grad_ckpt else 'OFF'}",
        "",
    ]
    width = max(len(label) for _, label, _ in e.items) + 2
    for _, label, b in e.items:
        lines.append(f"  {label:<{width}} {b / GiB:7.2f} GiB")
    lines.append("  " + "-" * (width + 12))
    verdict = ""
    if e.gpu_mem is not None:
        pct = 100 * e.peak_gib / e.gpu_mem
        verdict = f"   vs {e.gpu_mem:.1f} GiB: {'fits' if e.fits else 'DOES NOT FIT'} ({pct:.0f}%)"
        if e.fits and pct > 95:
            verdict += ", tight: fragmentation over a long run can tip it over"
    lines.append(f"  {'peak (nvidia-smi, default allocator)':<{width}} {e.peak_gib:7.2f} GiB{verdict}")
    lines.append(f"  {'torch.cuda.max_memory_allocated':<{width}} {e.allocated / GiB:7.2f} GiB")
    if e.gpu_mem is not None:
        mb = max_batch(a, s, e.gpu_mem)
        mc, mc1 = max_cutoff(a, s, e.gpu_mem), max_cutoff(a, s, e.gpu_mem, 1)
        lines += ["", f"Recommended on {e.gpu_mem:.1f} GiB:",
                  f"  per_device_train_batch_size: {mb} at cutoff_len {s.cutoff}" if mb else
                  f"  not even batch 1 fits at cutoff_len {s.cutoff}",
                  f"  cutoff_len up to {mc:,} at batch {s.batch}" + (f"; up to {mc1:,} at batch 1" if s.batch > 1 else "")]
        if not e.fits and not s.liger:
            lig = estimate(a, replace(s, liger=True), e.gpu_mem)
            lines.append(f"  enable_liger_kernel: true would need {lig.peak_gib:.1f} GiB "
                         f"({'fits' if lig.fits else 'still too much'})")
    for n in e.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


SEED_RECIPE = {  # the seed's settings (issue 4), for --table without a recipe
    "finetuning_type": "lora", "quantization_bit": 4, "double_quantization": True, "lora_rank": 64,
    "lora_alpha": 16, "lora_dropout": 0.1, "lora_target": "all", "cutoff_len": 12288,
    "per_device_train_batch_size": 1, "bf16": True, "flash_attn": "fa2", "optim": "paged_adamw_32bit",
    "deepspeed": {"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "contiguous_gradients": True,
                                        "overlap_comm": False}},
}


def table(recipe: dict | None = None, gpu_mem: float = GPUS_MIB["a40"] / 1024,
          cutoffs=(4096, 8192, 12288, 16384), batches=(1, 2, 3)) -> str:
    """Markdown table: predicted peak GiB per built-in model x cutoff x batch, stock loss and Liger."""
    recipe = recipe or SEED_RECIPE
    head = ["model", "cutoff"] + [f"b={b}" for b in batches] + [f"b={b} Liger" for b in batches]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arch in builtin_archs(hub_only=True).items():
        for c in cutoffs:
            cells = [name.split("/")[1], f"{c:,}"]
            for liger in (False, True):
                for b in batches:
                    s = setup_from_recipe(recipe, None, cutoff=c, batch=b, liger=liger)
                    e = estimate(arch, s, gpu_mem)
                    cells.append(f"{e.peak_gib:.1f}" + ("" if e.fits else " ✗"))
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + (f"\n\nPeak GiB (nvidia-smi) per GPU; ✗ = over {gpu_mem:.1f} GiB (a 48 GB A40). "
                              "QLoRA 4-bit DQ, r=64 all projections, dropout 0.1, FA2, gradient checkpointing, "
                              "paged AdamW, DeepSpeed ZeRO-2 on 1 GPU.")


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="LLaMA-Factory training YAML (sft_recipes/*.yaml)")
    p.add_argument("--gpu-mem", type=float, help="usable GPU memory in GiB (nvidia-smi memory.total MiB / 1024)")
    p.add_argument("--gpu", choices=sorted(GPUS_MIB), help="a card's usable memory instead of --gpu-mem")
    p.add_argument("--batch", type=int, help="override per_device_train_batch_size")
    p.add_argument("--cutoff", type=int, help="override cutoff_len")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (splits ZeRO optimizer states)")
    p.add_argument("--liger", action="store_true", help="as if enable_liger_kernel: true")
    p.add_argument("--model", help="override model_name_or_path (a local folder or a built-in id)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--table", action="store_true",
                   help="Markdown table for the built-in models x cutoff (4K-16K) x batch (1-3)")
    p.add_argument("--calibrate", nargs="+", metavar="RUN_DIR",
                   help="predicted vs recorded peak memory of finished runs (their peak_memory.json), e.g. runs/*/")


def _gpu_mem(args) -> float | None:
    if args.gpu:
        return GPUS_MIB[args.gpu] / 1024
    if args.gpu_mem is not None:
        if args.gpu_mem <= 0:
            raise UserError(f"--gpu-mem {args.gpu_mem}: give the GPU's memory in GiB, e.g. 45 for an A40")
        # "48" is how the seed's A40 is sold, not what it has: with ECC on (the default) a 48 GB
        # A40/L40S exposes 46068 MiB = 45.0 GiB, so that is what `fits` is judged against.
        return NOMINAL_GIB.get(args.gpu_mem, args.gpu_mem)
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.get_device_properties(i).total_memory
                       for i in range(torch.cuda.device_count())) / GiB
    except ImportError:
        pass
    return None


def load_recipe(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe {path} not found (see sft_recipes/*.yaml)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of LLaMA-Factory arguments")
    return data


# ----------------------------------------------------------------------------- calibration against recorded runs
RECORD = "peak_memory.json"  # written into each run's output_dir by llamafactory_ext.patches


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
            "recorded alloc", "predicted alloc", "residual"]
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
            sign(r["allocated_residual"])]) + " |")
    measured = [r for r in rows if "skipped" not in r and r["reserved_ratio"]]
    out = "\n".join(lines) if measured else "no run with a GPU measurement"
    if measured:
        rel = [abs(r["reserved_ratio"] - 1) for r in measured]
        out += (f"\n\nGiB. residual = recorded - predicted (reserved = torch.cuda.max_memory_reserved; the planner's "
                f"peak less the 0.6 GiB CUDA context). {len(measured)} run(s): mean |residual| of reserved "
                f"{100 * sum(rel) / len(rel):.1f} %, worst {100 * max(rel):.1f} %.")
    return out + "".join(f"\nskipped {n}" for n in notes)


def calibrate(paths: list[str], as_json: bool = False) -> int:
    records = find_records(paths)
    if not records:
        raise UserError(f"no {RECORD} under {' '.join(paths)}: runs record their peak memory when the "
                        "llamafactory_ext plugin is active (see `llamafactory-ext doctor`)")
    rows = [calibrate_one(p, Path.cwd()) for p in records]
    if as_json:
        print(json.dumps([{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows], indent=1))
    else:
        print(calibration_table(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    """Exit 0: fits (or no GPU size to judge against); 1: does not fit; 2: usage error (UserError)."""
    if args.calibrate:
        return calibrate(args.calibrate, args.json)
    gpu_mem = _gpu_mem(args)
    if args.table:
        recipe = load_recipe(args.recipe) if args.recipe else None
        print(table(recipe, gpu_mem or GPUS_MIB["a40"] / 1024))
        return 0
    if not args.recipe:
        raise UserError("give a recipe, e.g. `llamafactory-ext plan sft_recipes/mistral_15k.yaml --gpu a40`")
    recipe = load_recipe(args.recipe)
    for flag, v in (("--batch", args.batch), ("--cutoff", args.cutoff), ("--gpus", args.gpus)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be at least 1")
    model = args.model or recipe.get("model_name_or_path")
    if not model:
        raise UserError(f"{args.recipe} has no model_name_or_path; pass --model")
    arch = resolve_arch(str(model), Path(args.recipe).resolve().parent.parent)
    s = setup_from_recipe(recipe, Path(args.recipe), batch=args.batch, cutoff=args.cutoff, gpus=args.gpus,
                          liger=True if args.liger else None)
    e = estimate(arch, s, gpu_mem)
    if args.gpu is None and args.gpu_mem in NOMINAL_GIB:
        e.notes.append(f"--gpu-mem {args.gpu_mem:g}: judged as a '48 GB' A40/L40S, which exposes 46068 MiB = "
                       f"{NOMINAL_GIB[args.gpu_mem]:.1f} GiB in nvidia-smi (ECC on); an RTX A6000 has 48.0: --gpu a6000")
    elif args.gpu is None and args.gpu_mem in (16, 24, 32, 40, 80, 96, 141):
        e.notes.append(f"--gpu-mem {args.gpu_mem:g} is a marketing size? Cards expose a little less in nvidia-smi "
                       "(memory.total MiB / 1024); pass that, or --gpu NAME")
    if args.json:
        print(json.dumps(to_json(e, args.recipe), indent=1))
    else:
        print(render(e, args.recipe))
        if gpu_mem is None:
            print("\n(no GPU here: pass --gpu-mem GiB or --gpu NAME for a verdict and recommendations)")
    return 1 if e.fits is False else 0
