"""The GPUs this project knows, one row each: its compute capability, which decides the dtype it
trains in here, its dense peak FLOP/s in that dtype (for MFU, paligemma_json/speed.py) and the memory
sizes it comes in (for the estimate tables of paligemma_json/memory.py and benchmarks/real_width.py).

Peaks are dense (no sparsity), from NVIDIA's datasheets, which print bf16 "with sparsity" (twice
dense) for Hopper, Ada and the L4; a peak of None marks a variant whose figure is not in a datasheet
at hand, so that it is not taken for its namesake's. Memory is the total nvidia-smi reports, in MiB.
"""

import re
from dataclasses import dataclass, field


def has_native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 at full speed starts at compute capability 8.0 (Ampere): the one rule for the dtype a card
    trains in here, bf16 or else fp32 (devices.py's `training_dtype`, and this table's `compute`)."""
    return tuple(capability) >= (8, 0)


@dataclass(frozen=True)
class Card:
    capability: tuple[int, int]  # CUDA compute capability (NVIDIA's list of CUDA GPUs)
    peak_flops: float | None  # dense, in `compute`
    memory_mib: dict[str, int] = field(default_factory=dict)  # {name in the memory tables: nvidia-smi's total}

    @property
    def compute(self) -> str:
        """The dtype it trains in here."""
        return "bf16" if has_native_bf16(self.capability) else "fp32"


# Keys are `torch.cuda.get_device_name()` substrings, matched at word boundaries, the longest matching key
# wins (`find_card`). Oldest first: the memory tables' columns follow this order.
CARDS = {
    "T4": Card((7, 5), 8.1e12, {"T4": 15360}),  # T4 datasheet: FP32 8.1 TFLOPS (no bf16; fp16 tensor cores 65)
    "V100-SXM2": Card((7, 0), 15.7e12),  # V100 datasheet: SXM2 FP32 15.7 TFLOPS (no bf16)
    "V100-PCIE": Card((7, 0), 14e12),  # V100 datasheet: PCIe FP32 14 TFLOPS
    "V100S": Card((7, 0), 16.4e12),  # V100S datasheet: FP32 16.4 TFLOPS
    "A10": Card((8, 6), 125e12),  # A10 datasheet: BF16 125 TFLOPS dense (250 with sparsity)
    "A10G": Card((8, 6), None),  # AWS's variant of the A10: NVIDIA publishes no datasheet for it
    "L4": Card((8, 9), 121e12, {"L4": 23034}),  # L4 datasheet: BF16 242 TFLOPS with sparsity
    "L40S": Card((8, 9), 362e12),  # L40S datasheet: BF16 362 TFLOPS dense (733 with sparsity)
    "RTX 4090": Card((8, 9), 165e12),  # Ada whitepaper: BF16 with FP32 accumulate 165.2 TFLOPS dense
    "RTX 4090 D": Card((8, 9), None),  # the cut-down 4090: fewer SMs
    # A100 datasheet (SXM and PCIe, 40 and 80 GB): BF16 312 TFLOPS dense
    "A100": Card((8, 0), 312e12, {"A100 40GB": 40960, "A100 80GB": 81920}),
    # H100 SXM5 datasheet: BF16 1,979 TFLOPS with sparsity
    "H100 80GB HBM3": Card((9, 0), 989e12, {"H100 80GB": 81559}),
    "H100 SXM": Card((9, 0), 989e12),  # the same card, named by its form factor
    "H100 PCIe": Card((9, 0), 756e12),  # H100 datasheet: PCIe BF16 1,513 TFLOPS with sparsity
    "H100 NVL": Card((9, 0), None),  # its datasheet's figure changed between editions (a pair of cards, then one)
    "H200": Card((9, 0), 989e12),  # H200 datasheet: SXM BF16 1,979 TFLOPS with sparsity
    "H200 NVL": Card((9, 0), None),  # a lower-clocked card: not the SXM's figure
}


def find_card(device_name: str) -> Card | None:
    """The row of a `torch.cuda.get_device_name()`, or None when no key names it."""
    matches = [key for key in CARDS if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name, re.IGNORECASE)]
    return CARDS[max(matches, key=len)] if matches else None


def memory_sizes() -> list[tuple[str, float, str]]:
    """(name, total GiB, compute dtype) of every card size the memory tables list, in the table's order."""
    return [(name, mib / 1024, card.compute) for card in CARDS.values() for name, mib in card.memory_mib.items()]
