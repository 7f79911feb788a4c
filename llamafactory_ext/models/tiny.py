"""Build tiny Mistral and Gemma models offline: the embedded default model (`MODEL=tiny`).

Real architectures (`MistralForCausalLM`, `GemmaForCausalLM` from transformers), two layers and a
64-wide hidden state, random weights from a fixed seed, and a byte-level BPE tokenizer trained
locally on the sample papers. Each tokenizer carries the special tokens LLaMA-Factory's template
for that family uses (`<s>`/`</s>` for `mistral`; `<bos>`, `<eos>`, `<start_of_turn>`,
`<end_of_turn>` for `gemma`). Nothing is downloaded. The result is cached: a second call with the
same settings returns at once.

    llamafactory-ext tiny                       # both, into the project's build/tiny/{mistral,gemma}
    llamafactory-ext tiny --arch gemma --max-position-embeddings 256 --rope-theta 1e6 --out /tmp/g
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from llamafactory_ext import REVIEWER_INSTRUCTION, UserError, families

ARCHS = ("mistral", "gemma")
FAMILY = {"mistral": "tiny", "gemma": "tiny_gemma"}  # the family each architecture is built for (families.py)
BUILD_VERSION = 1  # bump when the recipe below changes, to invalidate caches

# Per family: special tokens (in id order, so ids match the real models' layout) and the config.
SPECIAL_TOKENS = {
    "mistral": ["<unk>", "<s>", "</s>"],
    "gemma": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
}
# the real models' positions and RoPE base, where they matter for our code paths (families.py)
DEFAULTS = {arch: {k: families.get(arch).arch[k] for k in ("max_position_embeddings", "rope_theta")}
            for arch in ARCHS}


def _sample() -> Path | None:
    """The sample papers shipped with the checkout this package runs from (the tokenizer's corpus), None for a wheel:
    the model's identity depends on the installation, never on the folder a command runs in."""
    from llamafactory_ext import project

    path = project.Project(project.CHECKOUT).sample
    return path if path.is_file() else None


def _corpus(sample: Path | None) -> list[str]:
    """Text the tokenizer is trained on: the sample papers and reviews, or a built-in fallback."""
    texts = [REVIEWER_INSTRUCTION, "[INST] [/INST] user model Verdict: A B tie"]
    if sample is not None:
        with sample.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["input"], row["output"]]
    else:  # installed from a wheel without the repo: still deterministic
        words = REVIEWER_INSTRUCTION.split()
        texts += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    texts.append("论文 评审 中文 测试 ünïcödé")  # so non-ASCII text is not all single bytes
    return texts


def _train_tokenizer(arch: str, vocab_size: int, sample: Path | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIAL_TOKENS[arch]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(sample), trainer=trainer)
    if arch == "mistral":
        kw = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        kw = {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        }
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)
    fast.model_max_length = 1_000_000
    return fast


def _config(arch: str, vocab_size: int, max_pos: int, rope_theta: float, tok):
    from transformers import GemmaConfig, MistralConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        max_position_embeddings=max_pos,
        rope_theta=rope_theta,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.02,
    )
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False, **common)
    return GemmaConfig(num_key_value_heads=1, pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **common)


def build(
    arch: str,
    out: str | Path | None = None,
    *,
    max_position_embeddings: int | None = None,
    rope_theta: float | None = None,
    vocab_size: int = 2048,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build (or return the cached) tiny model of family `arch`; returns its folder (default: the family's, under
    the project's build/). Concurrent builders (pytest-xdist workers) wait on a lock; the model is written to a
    temp folder and renamed into place."""
    from importlib.metadata import version

    from filelock import FileLock

    from llamafactory_ext.fileio import build_folder, remove_stale_temps

    if arch not in ARCHS:
        raise UserError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    max_pos = int(max_position_embeddings or DEFAULTS[arch]["max_position_embeddings"])
    theta = float(rope_theta or DEFAULTS[arch]["rope_theta"])
    if out is None:
        out = families.model_dir(FAMILY[arch])
    out = Path(out)
    sample = _sample()
    spec = {"v": BUILD_VERSION, "arch": arch, "max_pos": max_pos, "theta": theta, "vocab": vocab_size,
            "seed": seed, "corpus": sample.stat().st_size if sample else None,
            "transformers": version("transformers"), "tokenizers": version("tokenizers")}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    stamp = out / ".tiny-build"

    def built() -> bool:
        return not force and stamp.exists() and stamp.read_text().strip() == key

    if built():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if built():  # another process built it while we waited
            return out
        import torch
        from transformers import AutoModelForCausalLM

        remove_stale_temps(out)
        tok = _train_tokenizer(arch, vocab_size, sample)
        config = _config(arch, len(tok), max_pos, theta, tok)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with build_folder(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / ".tiny-build").write_text(key + "\n")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, action="append", help="family to build (default: both)")
    p.add_argument("--out", help="output folder (only with a single --arch); default: the family's, build/tiny/<arch>")
    p.add_argument("--max-position-embeddings", type=int, help="override the family default")
    p.add_argument("--rope-theta", type=float, help="override the family default")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")


def run(args: argparse.Namespace) -> int:
    archs = args.arch or list(ARCHS)
    if args.out and len(archs) != 1:
        raise UserError("--out needs exactly one --arch")
    for arch in archs:
        path = build(arch, args.out, max_position_embeddings=args.max_position_embeddings,
                     rope_theta=args.rope_theta, force=args.force)
        print(f"tiny {arch}: {path}")
    return 0
