"""Keep freed memory in the process instead of returning it to the kernel after every step.

A training step of Net allocates and frees activation and gradient buffers of a few hundred KB
to a few MB. glibc's malloc serves blocks above its mmap threshold (128 KB at first) with a
fresh mmap and gives them back with munmap when freed, so every step faults in and zeroes
the same pages again, and a step spends a good share of its time in the kernel. Raising the mmap
and trim thresholds keeps those pages in the heap for the next step (docs/BENCHMARKS.md has the
measured gain). The price: a process keeps up to `TRIM` of freed memory.

Linux with glibc only (what Ray's images and GKE nodes run); elsewhere nothing changes.
"""
import ctypes
import ctypes.util
import functools

# mallopt(3) parameters
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # blocks below 32 MB (glibc's maximum) come from the heap
TRIM = 256 << 20           # give memory back to the kernel only when this much is free at the top
TOP_PAD = 64 << 20         # grow the heap in steps of 64 MB


@functools.cache
def keep_freed_memory() -> bool:
    """Tune this process's malloc (once); True if it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    return all(mallopt(option, value) == 1 for option, value in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM), (M_TOP_PAD, TOP_PAD)))
