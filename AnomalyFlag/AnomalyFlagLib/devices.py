"""Compute device choice: CUDA > MPS > CPU unless the user names one; a missing GPU is an error. And the
arithmetic precision on it: mixed precision where the hardware has it (float16 on CUDA for scoring,
bfloat16 on CUDA for training, bfloat16 on CPUs with native bfloat16 units: Intel AMX or AVX512-BF16,
where training and scoring run about twice as fast as in float32), float32 elsewhere.
`ANOMALYFLAG_PRECISION=float32` turns mixed precision off everywhere.

torch is imported on first use, so that the Slicer module can list DEVICE_CHOICES before it is installed.
"""

import functools
import os
import re
from typing import TYPE_CHECKING, Optional

from .errors import DeviceError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(requested: str = "auto") -> "torch.device":
    """The torch device for `requested` ('auto', 'cpu', 'cuda', 'cuda:N' or 'mps')."""
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", requested):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"a CUDA {torch.version.cuda} build"
            raise DeviceError(
                f"device '{requested}' was asked for but no CUDA GPU is available (torch {torch.__version__} is "
                f"{build}). Use --device cpu, or install a CUDA build of torch that matches the GPU driver."
            )
        device = torch.device(requested)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device '{requested}' does not exist: {torch.cuda.device_count()} CUDA device(s) are visible."
            )
        return device
    if requested == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' was asked for but Apple Metal (MPS) is not available on this machine.")
        return torch.device("mps")
    raise DeviceError(f"unknown device '{requested}'; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N.")


def default_batch_size(device: "torch.device", image_size: int) -> int:
    """Slices per batch: bounded by GPU memory on CUDA, by cache-friendly sizes on the CPU."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        per_slice = image_size * image_size * 4 * 400  # the networks' activations, generous
        return int(max(8, min(512, free * 0.5 // per_slice)))
    return 32 if image_size <= 128 else 8


PRECISION_VARIABLE = "ANOMALYFLAG_PRECISION"
PRECISION_CHOICES = ("auto", "float32")


def _precision() -> str:
    value = os.environ.get(PRECISION_VARIABLE, "auto").strip().lower() or "auto"
    if value not in PRECISION_CHOICES:
        choices = " or ".join(PRECISION_CHOICES)
        raise DeviceError(f"{PRECISION_VARIABLE}={value!r} is not a precision; choose {choices}.")
    return value


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16). Without such units torch emulates
    bfloat16, which is slower than float32, so mixed precision stays off."""
    import torch

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux: no reliable way to tell
        return False
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = False
    return supported and ("amx_bf16" in flags or "avx512_bf16" in flags)


def mixed_precision_dtype(device: "torch.device", training: bool = False) -> "Optional[torch.dtype]":
    """The dtype autocast runs the networks in on `device` (None: float32). Training on CUDA uses bfloat16
    where the GPU has it, since float16 would need loss scaling."""
    import torch

    if _precision() == "float32":
        return None
    if device.type == "cuda":
        if not training:
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return None


def precision_name(device: "torch.device", training: bool = False) -> str:
    """'float32', 'float16' or 'bfloat16': what `autocast_for` runs the networks in (for the records)."""
    dtype = mixed_precision_dtype(device, training)
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def autocast_for(device: "torch.device", training: bool = False):
    """The autocast context for the networks' forward passes on `device` (see `mixed_precision_dtype`)."""
    import torch

    dtype = mixed_precision_dtype(device, training)
    if dtype is None:
        return torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False)
    return torch.autocast(device.type, dtype=dtype)
