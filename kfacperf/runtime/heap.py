"""Keep freed memory inside the process, so a step times its work, not the OS's page faults.

glibc hands large blocks back to the operating system when they are freed (``munmap`` of
blocks above its mmap threshold, trimming of the heap top), and that threshold adapts to the
process's own history.  Every later allocation of such a block then touches fresh pages, and
each first touch is a page fault.  On a virtual machine whose host takes freed guest memory
back (virtio-balloon free page reporting), a fault on such a page also faults on the host:
on the 2-vCPU development VM, first touches of 8 GiB ran at 0.4 GiB/s against 7 GiB/s for
memory touched moments before, and the same ResNet-20 SGD step took 38 ms in one process and
55-65 ms in another, depending on which of its blocks glibc had given back.

A long training run settles into reusing its own pages; a profile of a few dozen steps
should measure that state.  :func:`keep_heap` tells glibc never to serve an allocation with
its own mapping (``M_MMAP_MAX = 0``: everything comes from the heap) and never to trim the
heap (``M_TRIM_THRESHOLD``), so once the warm-up steps have grown the heap, measured steps
reuse resident pages.  The cost is that the process keeps its peak memory until it exits.
GPU memory is not affected (the CUDA caching allocator already keeps its blocks).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

KEPT = "kept"
"""run.json ``heap`` value: glibc told to keep freed memory (see :func:`keep_heap`)."""
DEFAULT = "default"
"""run.json ``heap`` value: the C library's own policy (``--default-heap``, or not glibc)."""

_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only above 2 GiB of free heap top
_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps rather than page by page


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_heap() -> str:
    """Make glibc keep freed memory in this process; returns :data:`KEPT`, or
    :data:`DEFAULT` where the C library is not glibc (or refuses)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return DEFAULT
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    ok = (libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
          and libc.mallopt(M_TOP_PAD, _TOP_PAD) == 1)
    return KEPT if ok else DEFAULT


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is unavailable)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
