"""Compute device choice: CUDA > MPS > CPU unless the user names one; a missing GPU is an error.

torch is imported on first use, so that the Slicer module can list DEVICE_CHOICES before it is installed.
"""

import re
from typing import TYPE_CHECKING

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


def autocast_for(device: "torch.device"):
    """Mixed precision on CUDA; full precision elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)
