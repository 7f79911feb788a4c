"""The planner's memory model: peak GPU memory of one LoRA/QLoRA training step, before launching it.

Units: GiB (2^30 bytes) everywhere. A card's memory is what `nvidia-smi --query-gpu=memory.total` reports in MiB,
divided by 1024: a "48 GB" A40 shows 46068 MiB = 45.0 GiB (ECC keeps 1/16). The seed's "33 GB / 47 GB" readings
are decimal GB.

For T = batch x cutoff tokens per micro-step, three figures, each the sum of named terms (`estimate().items`):

    allocated (torch.cuda.max_memory_allocated) = W + L + C + max(moment_loss, moment_layer) + mask
    reserved  (torch.cuda.max_memory_reserved)  = allocated + cache
    nvidia-smi                                  = reserved + outside

Derived from first principles (and checked on CPU against a live-tensor trace of LLaMA-Factory's own QLoRA step,
tests/test_plan.py):
* W, frozen weights: 4-bit NF4 = 0.5 B/param of every linear projection, the quantization constants (fp32 absmax
  per 64 weights = 0.0625 B/param; 0.0159 with double quantization), the bf16 embedding and LM head (bitsandbytes
  leaves them unquantized; stored once when tied).
* L, the LoRA parameters that are alive all the time: fp32 weights (LLaMA-Factory upcasts them), plus the optimizer
  states unless they are paged (bitsandbytes' paged_* optimizers keep them in CUDA managed memory, outside the
  allocator: they count in nvidia-smi only). Under DeepSpeed ZeRO-1/2: bf16 weights + fp32 master and gradient (+
  states) split over the GPUs, plus its gradient bucket (reduce_bucket_size x 2 B).
* C, gradient checkpointing: one bf16 hidden state per layer and token, layers x hidden x 2 B.
* The two moments of a step that can be its peak, the larger one counts:
  - the loss backward: transformers 5.6's ForCausalLMLoss upcasts the logits to fp32; its log-softmax, the incoming
    and the outgoing gradient are alive together, 12 B x vocab per token, plus the final norm (6 x hidden); Liger's
    fused linear cross entropy never materialises the logits (~8 x hidden). The LoRA gradients are not alive then
    (they are freed between steps);
  - the backward through a recomputed layer: what autograd saves in it (norms, q/k/v after RoPE, the attention
    output, the gated MLP, per LoRA projection the bf16 copy of its input and the dropout mask) and the gradients
    alive while down_proj runs backward, plus the fp32 LoRA gradients and two dequantized bf16 copies of the largest
    4-bit weight.
* mask: SDPA on a padded batch (b > 1, sequences of different lengths: real data) gets a b x s x s mask (1 B, and
  2 B as a bias in the recomputed layer) and repeats k/v for GQA; a batch of sequences of one length (gpu-check's,
  --fixed-length) gets none; flash-attention never does; eager stores b x heads x s^2 probabilities.

Fitted on one H200 (torch 2.11 with the pinned stack: tests/fixtures/gpu_h200_2026-12-04.json, Mistral-7B at 4,096
and 12,288 tokens, gemma-7b at 12,288 with and without Liger; tests/fixtures/gpu_h200_2026-12-04.json):
* C_LAYER: on CUDA the recomputed layer holds half of the derived bytes (0.5; from gemma + Liger, the one point
  where that moment is the peak; Mistral 4K agrees to 0.2 %). The CPU trace matches the derived bytes; which saved
  tensor CUDA's kernels keep smaller is not known here.
* cache: the caching allocator keeps the freed blocks of the moment that was not the peak (they are not reused by
  the other moment's different sizes), and the block the bf16 logits leave when they are upcast (2 B x vocab per
  token; none with Liger). A rule that reproduces the four reserved figures (-3 % to +7 %), not a simulation.
* outside: CUDA context and workspaces, 1.1 GiB, plus the paged optimizer states.
Every measured figure is within 7 % (allocated within 3 %); Mistral at 12,288 x 2, which the fit did not see, 27.4
GiB in nvidia-smi: +9 %. Before this fit the planner added the moments (fitted to the seed's A40 on an older stack)
and over-predicted the H200 by 18-30 %.

`fits` compares the nvidia-smi peak with the card, with 10 % HEADROOM when batches are padded (batch > 1): batch
shapes vary over a long run and fragment the cache; the seed's Mistral batch 3 on an A40 ran at 47 GB and died of
OOM hours in, and the planner now puts it at 44.3 GB, over the A40 with the headroom. Batch 2: 32.8 GB (the seed
saw 33). gemma-7b on the A40: up to 8,704 tokens (the seed: 9K fit, 10K did not).

Other published measurements (tests/fixtures/published_memory_points.json, with sources) agree within 10 % where
their setup is expressible: torchtune's Llama-2-7B LoRA and QLoRA (+3 %, +10 %), litgpt's LoRA without
checkpointing (-4 % to -6 %), Qwen-7B LoRA at 256-8,192 tokens (-10 % to +1 %), the seed's two A40 points (+1 %,
+6 %). Known misses, pinned in bands: litgpt's QLoRA with double quantization (+10.2 %), and Unsloth's "HF + FA2"
column for Llama-3.1-8B QLoRA (+19 % to +28 %: one straight line on an unpublished transformers/peft setup).
`plan --calibrate runs/*/` compares the prediction with the peaks every run records (peak_memory.json, written by
train/callbacks.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from llamafactory_ext import UserError

GiB = 1024**3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fitted on one H200 (torch 2.11 + the pinned stack; tests/fixtures/gpu_h200_2026-12-04.json), module docstring:
C_LAYER = 0.5  # the recomputed layer's live bytes on CUDA, as a share of the derived upper bound
OUTSIDE_ALLOCATOR = 1.1 * GiB  # nvidia-smi minus max_memory_reserved (and the paged optimizer states)
HEADROOM = 0.10  # a long run of padded batches of varying length fragments the cache: fits = peak x 1.10 <= memory
ROUND = 256  # recommended cutoffs are multiples of this

# a card's marketed size -> what it exposes, where the two differ materially (cards: gpus.py)


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
    padded: bool = True  # batch > 1 of varying lengths (real data): a padding mask (SDPA); gpu-check's are not
    notes: tuple[str, ...] = field(default=())

    @property
    def tokens(self) -> int:
        return self.cutoff * self.batch

    @property
    def masked(self) -> bool:
        """SDPA gets a padding mask: a batch of sequences of different lengths."""
        return self.batch > 1 and self.padded

    @property
    def headroom(self) -> float:
        return HEADROOM if self.masked else 0.0


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
        if s.attention == "eager" or s.masked:  # a mask: GQA falls back to repeat_kv
            attn += 4 * (q - kv)
    saved = norms + lora_saved + attn + mlp
    # backward of down_proj: grad of its output, of its input, and the LoRA path's grad (and dropout's)
    g = 4 if s.lora_fp32 else 2
    bwd = 2 * h + 2 * inter
    if "down_proj" in s.lora_targets:
        bwd += g * inter * (2 if s.lora_dropout > 0 else 1)
    ckpt = 0 if (s.offload_ckpt or not s.grad_ckpt) else arch.layers * 2 * h
    if s.liger:
        head = 4 * h + 4 * h  # final norm + FLCE (grad_input + one logits chunk)
    else:
        head = 6 * h + 12 * arch.vocab
    if s.grad_ckpt:  # one layer is recomputed at a time; on CUDA it holds C_LAYER of the derived bytes (fitted)
        held, layer, layer_gpu = 0, saved + bwd, C_LAYER * (saved + bwd)
    else:  # every layer's saved tensors stay alive through the loss backward
        held, layer, layer_gpu = arch.layers * saved, arch.layers * saved + bwd, arch.layers * saved + bwd
    return {"ckpt": ckpt, "held": held, "layer": layer, "layer_gpu": layer_gpu, "head_live": head + held}


def attention_quadratic(arch: Arch, s: Setup) -> float:
    """Bytes of the s^2 attention terms (mask, eager probabilities) for the whole micro-batch."""
    b, n = s.batch, s.cutoff
    if s.attention == "fa2":
        return 0.0
    if s.attention == "sdpa":
        return float(b * n * n * (1 + 2)) if s.masked else 0.0  # bool mask + bf16 bias in the recomputed layer
    layers = 1 if s.grad_ckpt else arch.layers
    return float(b * n * n * 2 + b * arch.heads * n * n * (6 * layers + 8))


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    arch: Arch
    setup: Setup
    items: list[tuple[str, str, float]]  # key, label, bytes: they add up to the nvidia-smi peak
    allocated: float  # torch.cuda.max_memory_allocated
    reserved: float  # torch.cuda.max_memory_reserved
    gpu_mem: float | None
    notes: list[str]
    phase: str = ""  # which moment of a step is the peak: "loss" (the logits' backward) or "layer" (a recompute)

    @property
    def peak(self) -> float:
        return sum(b for _, _, b in self.items)

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    @property
    def needed(self) -> float:
        """The memory a whole run needs: the peak plus the headroom for a long run of padded batches."""
        return self.peak * (1 + self.setup.headroom)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem is None else self.needed <= self.gpu_mem * GiB


def estimate(arch: Arch, s: Setup, gpu_mem: float | None = None) -> Estimate:
    """The memory of one training step (see the module docstring: which terms are derived, which fitted)."""
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
    paged = s.optim.startswith("paged_")  # bitsandbytes' paged states live in CUDA managed memory, not the allocator
    p = n["lora"] + n["extra_trainable"]
    if s.ds_stage:  # bf16 weights on every GPU; the fp32 master + grad (+ states) split over the GPUs, or on the CPU
        share = 0.0 if s.ds_offload_optimizer else 1 / s.gpus
        lora = p * 2 + p * (4 + 4 + (0 if paged else opt)) * share
        grads = p * 2.0
        label = (f"LoRA {p / 1e6:.1f} M params: bf16 weights, fp32 master + grad"
                 + ("" if paged or s.ds_offload_optimizer else f" + {s.optim} states")
                 + f" (ZeRO-{s.ds_stage}{', optimizer on CPU' if s.ds_offload_optimizer else ''})")
    else:
        w = 4 if s.lora_fp32 else 2
        lora = p * w + (0.0 if paged else p * opt)
        grads = p * w
        label = f"LoRA {p / 1e6:.1f} M params: {'fp32' if w == 4 else 'bf16'} weights" + (
            "" if paged else f" + {s.optim} states")
    items.append(("lora", label, lora))
    if s.ds_bucket:
        items.append(("deepspeed_buckets", "DeepSpeed contiguous-gradient bucket (reduce_bucket_size x 2 B)",
                      s.ds_bucket))
    if pt["ckpt"]:
        items.append(("checkpoints", f"checkpointed hidden states ({arch.layers} layers x {2 * arch.hidden} B/token)",
                      t * pt["ckpt"]))
    elif s.offload_ckpt:
        s = replace(s, notes=s.notes + (f"checkpoints in host RAM: {t * arch.layers * 2 * arch.hidden / GiB:.1f} GiB",))
    dequant = 2 * 2.0 * max(i * o for i, o in arch.shapes().values()) if s.quant_bit else 0.0  # fwd + bwd copies
    # the two moments that can be the peak of a step (module docstring): the loss backward over the fp32 logits,
    # and the backward through a recomputed layer (its live tensors, the LoRA gradients, two dequantized weights)
    loss = t * pt["head_live"]
    layer = t * pt["layer_gpu"] + grads + dequant
    quad = attention_quadratic(arch, s)
    if layer >= loss:
        items.append(("layer", f"peak in a layer's backward: recomputed layer ({pt['layer_gpu'] / 1024:.0f} KiB/token)"
                      f" + LoRA gradients + dequantized weights", layer))
        phase, other = "layer", loss
    else:
        head = (f"Liger fused linear cross entropy ({pt['head_live']} B/token, no logits)" if s.liger else
                f"final norm + fp32 logits + cross entropy (6h + 12 B x {arch.vocab} vocab/token)")
        items.append(("logits", f"peak in the loss backward: {head}", loss))
        phase, other = "loss", layer
    attn_label = {"fa2": "attention: flash-attn, no s^2 term",
                  "sdpa": "attention: SDPA" + (" padded-batch mask (b x s^2)" if quad else
                                               ", no mask (batch 1 or unpadded): no s^2 term"),
                  "eager": "attention: eager, b x heads x s^2 probabilities"}[s.attention]
    items.append(("attention", attn_label, quad))
    allocated = sum(b for _, _, b in items)
    # PyTorch's caching allocator keeps the freed blocks of the other moment reserved, and the hole the bf16
    # logits leave when they are upcast (fitted rule, module docstring)
    cache = min(loss, other) + (0.0 if s.liger else 2.0 * t * arch.vocab)
    cache_label = "allocator cache: the other moment's freed blocks" + ("" if s.liger else " + the bf16 logits' block")
    items.append(("cache", cache_label, cache))
    reserved = allocated + cache
    outside = OUTSIDE_ALLOCATOR + (p * opt if paged and not s.ds_offload_optimizer else 0.0)
    items.append(("outside", "outside PyTorch's allocator: CUDA context, cuBLAS workspaces"
                  + (f", {s.optim} states (managed memory)" if paged else ""), outside))
    notes = list(s.notes)
    if paged:
        notes.append(f"{s.optim}: {p * opt / GiB:.2f} GiB of optimizer states can page out to host RAM under "
                     "pressure (slower steps), so the hard limit is that much higher")
    if arch.max_positions and s.cutoff > arch.max_positions and not s.rope_scaling:
        notes.append(f"cutoff {s.cutoff} > {arch.max_positions} native positions: set rope_scaling (no memory cost)")
    if s.headroom:
        notes.append(f"fits is judged with {100 * s.headroom:.0f} % headroom over the peak: padded batches of "
                     "varying length fragment the cache over a long run (the seed's batch 3 died hours in)")
    return Estimate(arch, s, items, allocated, reserved, gpu_mem, notes, phase)


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
