"""Every GPU fact ftcluster uses — memory, dense bf16 peak, default price — in one table, with one
matching rule for the names users, Ray and torch give them.

Names are Ray's accelerator types (``A100-80G``, ``A100``, ``H100``, ``L40S``, ``L4``, ``A10G``, ...).
A name matches an entry exactly, or else the longest entry that starts it at a word boundary:
torch's ``NVIDIA A100-SXM4-80GB`` is an A100-80G, ``NVIDIA L40S`` an L40S (never an L4), and Ray's
``A100`` an A100 (never an A10). No substring guessing, and an unknown name is None, not a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str  # Ray's accelerator type
    memory_gb: float
    peak_tflops: float  # dense (no sparsity) bf16/fp16 tensor-core TFLOP/s, from NVIDIA's datasheets
    hour_usd: float  # default on-demand price per GPU-hour (rough 2026 cloud list prices); cost.gpu_hour_usd overrides
    also: tuple[str, ...] = ()  # other spellings of the same part (torch device names, PCIe/SXM variants)


# Ray reports a plain "A100" for 40 GB and 80 GB cards alike: it is planned as the 80 GB card; name
# A100-40G in scaling.gpu_type to plan for the smaller one.
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("B200", 180, 2250, 6.00),
    Accelerator("GH200", 96, 989, 3.99),
    Accelerator("H200", 141, 989, 3.80),
    Accelerator("H100", 80, 989, 2.99, also=("H100-SXM", "H100-NVL")),
    Accelerator("H100-PCIE", 80, 756, 2.49),
    Accelerator("H20", 96, 148, 1.60),
    Accelerator("A100", 80, 312, 1.79),
    Accelerator("A100-80G", 80, 312, 1.79, also=("A100-SXM4-80GB", "A100-PCIE-80GB", "A100-80GB")),
    Accelerator("A100-40G", 40, 312, 1.29, also=("A100-SXM4-40GB", "A100-PCIE-40GB", "A100-40GB")),
    Accelerator("L40S", 48, 362, 1.20),
    Accelerator("L4", 24, 121, 0.70),
    Accelerator("A10G", 24, 125, 1.01),
    Accelerator("A10", 24, 125, 0.75),
    Accelerator("RTX-4090", 24, 165, 0.40),
    Accelerator("V100", 32, 125, 0.90, also=("V100-SXM2-32GB", "V100-PCIE-32GB")),
    Accelerator("V100-16G", 16, 125, 0.90, also=("V100-SXM2-16GB", "V100-PCIE-16GB")),
    Accelerator("T4", 16, 65, 0.35),
)

_VENDOR_WORDS = ("NVIDIA-", "TESLA-", "GEFORCE-")


def normalize(name: str) -> str:
    """``NVIDIA A100-SXM4-80GB`` → ``A100-SXM4-80GB``: upper case, words joined by hyphens, vendor words dropped."""
    text = re.sub(r"[\s_]+", "-", name.strip().upper())
    for word in _VENDOR_WORDS:
        while text.startswith(word):
            text = text[len(word):]
    return text


def _spellings() -> dict[str, Accelerator]:
    table: dict[str, Accelerator] = {}
    for accelerator in ACCELERATORS:
        for spelling in (accelerator.name, *accelerator.also):
            table[normalize(spelling)] = accelerator
    return table


_BY_SPELLING = _spellings()


def find_accelerator(name: str | None) -> Accelerator | None:
    """The table entry of a GPU name (exact, else the longest entry that starts it at a boundary); None if unknown."""
    if not name:
        return None
    wanted = normalize(name)
    if wanted in _BY_SPELLING:
        return _BY_SPELLING[wanted]
    prefixes = [key for key in _BY_SPELLING if wanted.startswith(key + "-")]
    return _BY_SPELLING[max(prefixes, key=len)] if prefixes else None


def known_names() -> list[str]:
    return [accelerator.name for accelerator in ACCELERATORS]


def unknown_message(name: str) -> str:
    return f"unknown GPU type {name!r}; known: {', '.join(known_names())}"
