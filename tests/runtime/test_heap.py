"""kfacperf.runtime.heap: with the heap kept, memory freed and taken again does not fault."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kfacperf.runtime import heap

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the heap policy is glibc's")

# 64 MiB: above glibc's largest mmap threshold (32 MiB), so by default every allocation of it
# is a fresh mapping whose pages all fault on first touch
_SCRIPT = """
import sys
import numpy as np
from kfacperf.runtime import heap
policy = heap.keep_heap() if sys.argv[1] == "kept" else heap.DEFAULT
faults = []
for _ in range(4):
    before = heap.minor_faults()
    a = np.ones(8 << 20)  # 64 MiB, every page touched
    faults.append(heap.minor_faults() - before)
    del a
print(policy, *faults[1:])
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], [int(x) for x in out[1:]]


@glibc
def test_kept_heap_reuses_freed_pages_default_heap_faults_them_again() -> None:
    policy, kept = _faults("kept")
    assert policy == heap.KEPT
    assert max(kept) <= 16, kept  # the same pages, still resident
    policy, default = _faults("default")
    assert policy == heap.DEFAULT
    # fresh pages each time: at least one fault per 2 MiB even where the kernel maps large
    # folios (16384 faults with plain 4 KiB pages)
    assert min(default) >= 32, default


def test_minor_faults_counts_the_first_touch_of_fresh_pages() -> None:
    import mmap

    size = 8 << 20
    with mmap.mmap(-1, size) as fresh:  # a mapping of its own, whatever malloc's policy
        before = heap.minor_faults()
        for offset in range(0, size, 4096):
            fresh[offset] = 1
        # one fault per page, or per large folio where the kernel maps them (<= 2 MiB)
        assert heap.minor_faults() - before >= size // (2 << 20)
