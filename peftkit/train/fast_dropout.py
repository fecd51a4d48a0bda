"""LoRA dropout with a hashed counter instead of torch's CPU random generator.

peft applies `nn.Dropout` to the input of every LoRA layer: seven times per block for all-linear targets. On a
CPU, torch draws each mask element from one serial Mersenne Twister (about 5 ns an element on the 2-core machine
the benchmarks ran on): 12-14 % of a LoRA training step, more than any elementwise work. Here each mask element is
a 32-bit integer hash (lowbias32) of its index, xor-ed with one random seed per call that is drawn from torch's
generator (so `torch.manual_seed` and the Trainer's saved RNG states still decide every mask); the element is kept
when the hash falls above `p` of the 32-bit range, and scaled by 1 / (1 - p) as `nn.Dropout` does. About ten
vectorised integer operations replace the serial draw. The distribution is the same Bernoulli(1 - p) per element;
the masks are other ones than torch's. GPUs keep torch's dropout (its Philox generator is already fast).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_counters = torch.empty(0, dtype=torch.int32)


def _indices(count: int) -> torch.Tensor:
    """0 .. count-1 as int32, from a buffer that grows as needed (torch.arange is slow for ints on a CPU); it stays
    about the size of the largest LoRA input seen, as large as one activation the step keeps anyway."""
    global _counters
    if _counters.numel() < count:
        _counters = torch.arange(min(count + count // 8, 2**31), dtype=torch.int32)
    return _counters[:count]


def _rank_key() -> int:
    """A key per process of a distributed run, as a signed int32 (0 for rank 0 and single-process runs). Every rank
    starts from the same torch seed, and this dropout draws one number a call whatever the input's size, so the
    ranks' generators stay in step for the whole run: without the key every rank would drop the same elements."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    key = (torch.distributed.get_rank() * 0x9E3779B1) & 0xFFFFFFFF
    return key - 2**32 if key >= 2**31 else key


def keep_scale(shape: torch.Size, p: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor of `shape` holding 1 / (1 - p) with probability 1 - p and 0 otherwise, element by element, from one
    seed of torch's generator. (Comparisons that give bool tensors, and their conversion, are the slow integer kernels
    on a CPU: the threshold is applied in float arithmetic instead.)"""
    seed = torch.randint(-(2**31), 2**31 - 1, (), dtype=torch.int32) ^ _rank_key()
    h = _indices(shape.numel()) ^ seed
    # lowbias32 (Chris Wellons' hash-prospector): int32 multiplication wraps as uint32 would; shifts are made
    # logical by masking off the sign bits an arithmetic shift copies in.
    h.mul_(-1640531535)  # 0x9E3779B1: spreads consecutive indices before the mixing rounds
    h ^= (h >> 16) & 0xFFFF
    h.mul_(0x7FEB352D)
    h ^= (h >> 15) & 0x1FFFF
    h.mul_(-2073254261)  # 0x846CA68B
    h ^= (h >> 16) & 0xFFFF
    # The top 24 bits, uniform over 0 .. 2^24 - 1 and exact in float32: kept from `threshold` up.
    uniform = ((h >> 8) & 0xFFFFFF).to(dtype if dtype == torch.float64 else torch.float32)
    threshold = round(p * 2**24)
    scale = 1 / (1 - p)
    # (u - threshold + 1) * scale is >= scale where kept and <= 0 where dropped: clamped, exactly scale or 0.
    return uniform.sub_(threshold - 1).mul_(scale).clamp_(0, scale).view(shape).to(dtype)


class HashedDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training masks come from `keep_scale`; elsewhere (GPU, eval, p = 0) it is nn.Dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point() or self.inplace
                or x.numel() >= 2**31):  # int32 indices
            return super().forward(x)
        if self.p == 1:
            return x * 0
        return x * keep_scale(x.shape, self.p, x.dtype)


def use_hashed_dropout(model: Any) -> int:
    """Swaps every LoRA layer's `nn.Dropout` (peft's `lora_dropout`) for `HashedDropout`; returns how many."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                dropouts[name] = HashedDropout(dropout.p)
                swapped += 1
    return swapped
