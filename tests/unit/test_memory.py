"""The mmap threshold fix, seen from outside the process: RSS returns to the system on free."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from tracetune.training.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) // 1024
keep = []
# glibc raises its threshold after freeing an mmapped block: from then on blocks of this size
# come from the heap; a small block kept alive on top of them pins the freed space.
for size in (8, 16, 24, 32):
    block = bytearray(size << 20)
    del block
baseline = rss_mb()
for i in range(40):
    block = bytearray((3 + i % 5) << 20)
    keep.append(bytearray(64))
    block[0] = 1
    del block
big = [bytearray((4 + i % 3) << 20) for i in range(30)]
for b in big:
    b[::4096] = b"x" * len(b[::4096])
keep.extend(bytearray(64) for _ in range(30))
del big
print(rss_mb() - baseline)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_tensors_leave_resident_memory_with_a_fixed_threshold() -> None:
    def grown(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip())

    assert grown("fixed") < 20
    assert grown("default") > 60  # the fragmentation the fix prevents is real on this libc


BOUND = """
import sys, torch
from tracetune.training.memory import bound_heap_for
size = int(sys.argv[1])
model = torch.nn.Embedding(size, 1000, device="meta")  # counted, never allocated
print(bound_heap_for(model))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_only_pretrained_size_models_fix_the_threshold() -> None:
    """The tiny default keeps glibc's dynamic threshold (a fixed one cost it CPU, see memory.py)."""

    def applied(rows: int) -> str:
        out = subprocess.run(
            [sys.executable, "-c", BOUND, str(rows)], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    assert applied(800) == "False"  # 0.8M parameters: the embedded default's size
    assert applied(135_000) == "True"  # 135M: SmolLM2-135M
