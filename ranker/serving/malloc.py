"""glibc's malloc told to keep the pages a batch frees, in the serving process.

Why: a batch's activations are many tensors of a few hundred KiB to a few MiB, all freed when
the batch ends. By default glibc serves a block at least its mmap threshold long with a fresh
mmap and gives the pages back on free, and it trims free memory at the heap's top back to
the OS past its trim threshold. Both thresholds start low (128 KiB, 256 KiB) and rise only as
mmapped blocks are freed, so where they settle depends on the order of everything the
process has allocated. In the server, where the HTTP work's small objects and batches of
every size from 1 to max_batch interleave, they settle where many of a batch's buffers are
fresh pages again in the next batch: each page is a minor fault the model stage pays for
(docs/serving.md has the measured counts). A loop that ranks the same batch over and over in
one process settles differently, so the in-process ceiling did not pay it.

`keep_freed_pages()` fixes both thresholds once, at start-up: blocks under 32 MiB (glibc's
largest mmap threshold on 64-bit) come from the heap, and free memory at the heap's top is
kept up to 256 MiB, so the next batch reuses pages already mapped. The cost is resident
memory: what the largest batch needed stays mapped. Setting a threshold also turns off
glibc's dynamic adjustment (as the MALLOC_*_ environment variables do, which is why setting
MALLOC_TRIM_THRESHOLD_ alone makes it worse: the mmap threshold then stays at 128 KiB).

Not glibc (musl, macOS): nothing is changed and the result says why. `ServingSettings.malloc`
"glibc" leaves glibc's own dynamic thresholds: the reference, for side-by-side measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2); mallopt refuses more
TRIM_THRESHOLD_BYTES = 256 << 20


@dataclass(frozen=True)
class MallocSetting:
    applied: bool
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    reason: str = ""


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_pages(mmap_threshold: int = MMAP_THRESHOLD_BYTES,
                     trim_threshold: int = TRIM_THRESHOLD_BYTES) -> MallocSetting:
    """Fix glibc's mmap and trim thresholds for this process (see the module docstring)."""
    if not 0 < mmap_threshold <= MMAP_THRESHOLD_BYTES:
        raise ValueError(f"mmap_threshold must be in (0, {MMAP_THRESHOLD_BYTES}] bytes, got {mmap_threshold}")
    if trim_threshold <= 0:
        raise ValueError(f"trim_threshold must be > 0 bytes, got {trim_threshold}")
    libc = _glibc()
    if libc is None:
        return MallocSetting(False, reason="not glibc: the C library's allocator is left as it is")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1 or libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) != 1:
        return MallocSetting(False, reason="glibc's mallopt refused the thresholds")
    return MallocSetting(True, mmap_threshold, trim_threshold)
