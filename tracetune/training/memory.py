"""Keep a long CPU training run's resident memory at what it uses, not what it once freed.

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), so
after the first steps every activation and logits tensor of a pretrained model comes from the
heap, and a heap fragmented by tensors of varying sizes never shrinks. Measured on
SmolLM2-135M with LoRA (2 sequences of 1,030 tokens, activation checkpointing): peak RSS 3.9 GB
after the first forward, 6.3 GB after the second; with a fixed 1 MiB threshold, 1.5 GB and
1.9 GB, flat from the second step on. The embedded tiny model has the opposite trade: its
RSS never grew, and a fixed threshold turns its logits and batches into fresh mmaps faulted in
every step (the default tiny SFT, 40 steps: 26.1 CPU s with glibc's dynamic threshold, 28.7 to
35.2 s fixed, sys 2.6 -> 5.7 to 7.1 s). So only pretrained-size models get the fix.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20
LARGE_MODEL_PARAMETERS = 50_000_000  # SmolLM2-135M and up; the embedded default is 0.8M


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations >= `threshold` by mmap, returned to the system on free.

    Returns whether it applied: only glibc (Linux) has `mallopt`; elsewhere the allocator
    differs and this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def bound_heap_for(model: Any) -> bool:
    """Fix the threshold when `model` is pretrained-size (whether it applied).

    A small model's memory stays flat with glibc's dynamic threshold, which reuses heap blocks
    instead of faulting in fresh pages each step; only large models pay for that reuse with
    fragmentation.
    """
    parameters = sum(p.numel() for p in model.parameters())
    return parameters >= LARGE_MODEL_PARAMETERS and fix_mmap_threshold()
