"""Device, precision and threading choices, made in one place."""
from __future__ import annotations

import contextlib
import os
import random

import torch

#: The device names a run may ask for (``cuda:N`` picks one GPU).
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else must exist here.

    A `ConfigError` names the device and what is valid or available, so a
    typo or a GPU-less machine is one line, not torch's list of every backend
    it was built to know.
    """
    from localssl.config import ConfigError, shown

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {shown(name)}; valid: {', '.join(DEVICES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            here = "auto, cpu, mps" if torch.backends.mps.is_available() else "auto, cpu"
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; valid here: {here}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS (Apple GPU) is not available here")
    return dev


#: CPU flags (Linux /proc/cpuinfo names) of native bf16 matrix instructions.
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (first CPU); empty where unreadable (non-Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    oneDNN also *emulates* bf16 on plain AVX-512, and reports it as supported,
    but there it runs 2-5x slower than fp32 (measured on an AVX-512 Xeon
    without either flag: ``localssl bench`` prints the comparison). So the
    flags are read from /proc/cpuinfo (`cpu_flags`) rather than trusting that report.
    """
    return bool(cpu_flags() & CPU_BF16_FLAGS)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` (auto|bf16|off) on ``device``, or None.

    ``auto`` takes bf16 where the hardware runs it natively (CUDA with bf16
    support, CPUs with AVX512-BF16/AMX-BF16), where it is several times faster
    than fp32, and fp32 everywhere else.
    """
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode != "auto":
        raise ValueError(f"unknown amp mode {mode!r}; valid: auto, bf16, off")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# glibc mallopt() parameters (malloc.h) and the values `retain_freed_memory` sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
RETAIN_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this parameter on 64-bit
RETAIN_TRIM_THRESHOLD = 1 << 30
_allocator_state = "default"


def retain_freed_memory() -> bool:
    """Keep freed heap memory in the process for reuse (glibc); True where applied.

    Block-by-block training frees one block's activations and allocates the
    next block's straight after. With glibc's defaults (an mmap threshold
    that adapts to the largest freed buffer, and a trim threshold of twice
    that), a free that leaves enough memory at the top of the heap hands the
    pages back to the kernel, and the next allocation page-faults them in
    again as fresh zeroed pages, inside the op that touches them first.
    `localssl bench` counts the faults per step of every rule
    (``--no-retain-memory`` shows the defaults; README, benchmark). Setting
    both thresholds (which also turns off the adaptation) keeps the pages:
    buffers up to 32 MiB (glibc's ceiling for this parameter) come from the
    heap, and up to 1 GiB of freed memory stays mapped for reuse. Larger
    buffers are still mapped and unmapped one by one. It changes no number
    the run computes; freed memory is no longer returned to the system while
    the process runs, which can raise the peak RSS somewhat (bench ``--rss``).
    Elsewhere (macOS, musl, Windows) this does nothing and returns False.
    """
    global _allocator_state
    if _allocator_state != "default":
        return _allocator_state.startswith("glibc")
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _allocator_state = "unchanged (not glibc)"
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, RETAIN_MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, RETAIN_TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        ok = False
    _allocator_state = (f"glibc, freed memory retained (mmap threshold {RETAIN_MMAP_THRESHOLD >> 20} MiB, "
                        f"trim threshold {RETAIN_TRIM_THRESHOLD >> 30} GiB)") if ok else "unchanged (mallopt failed)"
    return ok


def allocator_state() -> str:
    """What `retain_freed_memory` did in this process ("default" if it was not called)."""
    return _allocator_state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """Bitwise-repeatable runs (the resume test relies on it)."""
    torch.use_deterministic_algorithms(on, warn_only=False)
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def environment_info(device: torch.device | None = None) -> dict[str, str | int]:
    """Hardware and versions, saved with every run and benchmark (STYLE principle 6)."""
    import platform

    info: dict[str, str | int] = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator_state(),
    }
    try:
        import kornia

        info["kornia"] = str(kornia.__version__)
    except ImportError:  # pragma: no cover
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"
