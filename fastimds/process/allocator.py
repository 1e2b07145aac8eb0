"""The C allocator's settings for a serving process, set once at start before any fork.

Rules of this module:
- Best effort: only glibc's malloc is tuned (through `mallopt`); on any
  other C library, or if the call fails, nothing changes and the server
  runs as before.
- Why (issue 16, Low 7): glibc raises its mmap threshold each time a large
  block is freed, so after the first big read (uvloop reads up to 256 KiB)
  large transient buffers (reads, the rest of a backlog, one read's joined
  replies) come from the heap, and the heap keeps its high-water mark as
  RSS after they are freed. 500 connections that pipeline and never read
  left a worker 38-111 MiB bigger with the stalled budget holding only
  16 MiB of them; with the threshold fixed at MMAP_THRESHOLD_BYTES, 23-29
  MiB (reliability.md). Blocks that big are rare on the request path (a
  16-deep pipeline's replies are ~50 KiB), so the extra mmap calls cost
  nothing measurable per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# Blocks at least this big are mmapped and returned to the system when freed.
# Fixing it also stops glibc raising it (its default starts at 128 KiB and
# climbs to 32 MiB); 64 KiB is above any normal request's reply batch.
MMAP_THRESHOLD_BYTES = 64 * 1024
# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES; False where that cannot be done."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
