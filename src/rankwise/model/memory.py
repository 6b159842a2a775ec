"""Hand memory that torch has freed back to the operating system between phases.

glibc keeps freed heap memory for reuse, and after a few large frees its mmap threshold rises to
32 MB, so every freed tensor below that size stays in the heap. One compression run frees a bf16
copy of the model, the logits of the output-Fisher pass and each block's grams and copies; without
trimming, the default run carried ~450 MB of such freed memory into its sequential phase, which
counted in its peak resident size.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """`malloc_trim(0)` where the C library has it (glibc); a no-op elsewhere."""
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own symbols
    except (OSError, TypeError):  # no such handle on this platform
        return
    if trim is not None:
        trim(0)
