"""glibc malloc settings for CPU benchmarks, shared by the bench scripts.

By default glibc serves each large allocation with a fresh mmap and returns it on free, so a tensor
of hundreds of MB allocated every step (a dense embedding gradient, a [N, vocab] logits block) is
zero-filled by the kernel page fault by page fault, every time. Keeping freed memory in the heap
removes that CPU-only cost (a GPU allocator caches blocks anyway).
"""
import os
import sys

RETAIN_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def reexec_with_retained_malloc(skip: bool) -> str:
    """Re-execute this script with RETAIN_FREED_MEMORY in the environment (glibc reads it at start-up)
    unless `skip` or already set; returns a short description for the bench header."""
    if skip:
        return "system malloc"
    if any(os.environ.get(key) != value for key, value in RETAIN_FREED_MEMORY.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAIN_FREED_MEMORY})
    return "malloc keeps freed memory"
