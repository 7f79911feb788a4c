"""GPU cards: what `plan`, the speed recorder, `make predict` and `gpu-check` know about them, in one table.

memory: what nvidia-smi reports as memory.total (MiB), default ECC setting: a "48 GB" A40 shows 46068 MiB =
45.0 GiB. bf16: dense BF16 tensor-core peak (TFLOP/s, no sparsity), the denominator of MFU. bandwidth: HBM/GDDR
bandwidth (GB/s). Each from the vendor's datasheet (source column); the H200's memory is what one reported here
(tests/fixtures/gpu_h200_2026-12-04.json). Cards without bf16 (T4, V100) cannot run the bf16 recipes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    name: str
    memory_mib: int
    bf16_tflops: float | None
    bandwidth_gbs: float
    source: str
    names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name() that mean this card

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


CARDS: dict[str, Card] = {c.name: c for c in (
    Card("a40", 46068, 149.7, 696, "NVIDIA A40 datasheet (BF16 Tensor 149.7 dense / 299.4 sparse TFLOPS, 696 GB/s)",
         ("A40",)),
    Card("l40s", 46068, 362.05, 864, "NVIDIA L40S datasheet (BF16 Tensor 362.05 dense, 864 GB/s)", ("L40S",)),
    Card("a6000", 49140, 154.8, 768, "NVIDIA RTX A6000 datasheet (Tensor 309.7 TFLOPS with sparsity = 154.8 dense, "
         "768 GB/s)", ("RTX A6000",)),
    Card("a100-40", 40960, 312.0, 1555, "NVIDIA A100 datasheet (BF16 Tensor 312 dense, 40 GB SXM 1,555 GB/s)",
         ("A100-SXM4-40GB", "A100-PCIE-40GB")),
    Card("a100-80", 81920, 312.0, 2039, "NVIDIA A100 datasheet (BF16 Tensor 312 dense, 80 GB SXM 2,039 GB/s)",
         ("A100-SXM4-80GB", "A100 80GB", "A100-PCIE-80GB")),
    Card("h100", 81559, 989.4, 3350, "NVIDIA H100 datasheet, SXM (BF16 Tensor 989.4 dense, 3.35 TB/s)",
         ("H100 80GB HBM3", "H100 SXM")),
    Card("h100-pcie", 81559, 756.0, 2000, "NVIDIA H100 datasheet, PCIe (BF16 Tensor 756 dense, 2.0 TB/s)",
         ("H100 PCIe",)),
    Card("h200", 143771, 989.4, 4800, "NVIDIA H200 datasheet (BF16 Tensor 989.4 dense, 4.8 TB/s); memory as "
         "nvidia-smi showed it here", ("H200",)),
    Card("4090", 24564, 165.2, 1008, "NVIDIA Ada whitepaper, RTX 4090 (BF16 Tensor with FP32 accumulate 165.2 "
         "dense, 1,008 GB/s)", ("RTX 4090",)),
    Card("a10g", 23028, 125.0, 600, "NVIDIA A10 datasheet (BF16 Tensor 125 dense, 600 GB/s); AWS's A10G is its "
         "variant", ("A10G", "A10")),
    Card("l4", 23034, 121.0, 300, "NVIDIA L4 datasheet (BF16 Tensor 121 dense, 300 GB/s)", ("L4",)),
    Card("t4", 15360, None, 320, "NVIDIA T4 datasheet (no BF16; FP16 Tensor 65 TFLOPS, 320 GB/s)", ("T4",)),
    Card("v100-32", 32768, None, 900, "NVIDIA V100 datasheet (no BF16; FP16 Tensor 125 TFLOPS, 900 GB/s)",
         ("V100",)),
)}
REFERENCE = "h200"  # the card the speed model is calibrated on (tests/fixtures/gpu_h200_2026-12-04.json)


def by_device_name(device_name: str | None) -> Card | None:
    """The card torch.cuda.get_device_name() names (the longest matching substring wins), None when unknown."""
    if not device_name:
        return None
    hits = [(len(n), c) for c in CARDS.values() for n in c.names if n.lower() in device_name.lower()]
    return max(hits, key=lambda h: h[0])[1] if hits else None
