"""Where a variant trains: choosing the device and the process-wide settings for it."""
from __future__ import annotations

import ctypes

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


# PyTorch's CPU allocator keeps no cache: each step allocates its activations afresh,
# and glibc serves blocks over 128 KiB with mmap and returns them with munmap, so every
# step pays one page fault (kernel zeroing; in a VM, a hypervisor exit too) per 4 KiB
# of activations. On the 2-core benchmark VM that made a seed step erratic, 100 to 480
# images/s; with freed memory kept in the heap and reused it is a steady ~590.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_heap_kept = False


def keep_freed_memory() -> bool:
    """The process keeps its peak memory; False where the C library is not glibc."""
    global _heap_kept
    if not _heap_kept:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _heap_kept = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            return False
    return _heap_kept


def prepare_device(device: torch.device) -> None:
    """Idempotent, safe from any thread."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: each convolution is planned once
    else:
        keep_freed_memory()
