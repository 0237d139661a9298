"""The one place for device, seeding and environment facts."""

from __future__ import annotations

import platform
import sys

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when present, else CPU; anything else is taken as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use --device cpu or 'auto'")
    return device


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch.Generator on `device`, seeded explicitly (never from the clock)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def versions() -> dict:
    """Library and machine versions recorded next to every output."""
    import numpy

    from . import __version__

    info = {
        "mctlib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception:  # torchvision is optional for the digits default
        info["torchvision"] = None
    return info
