"""The device a command runs on: ``resolve_device("auto")`` is CUDA when available, else the CPU, written once for
every command (``efla train``, ``efla eval``, ``efla generate``, ``efla smnist``, ``efla mqar``) and the library
functions they call."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The torch device that ``name`` asks for, checked before any work starts.

    ``"auto"`` or None: ``cuda:local_rank`` when CUDA is available, else ``cpu``; ``"cuda"``: ``cuda:local_rank``
    (this process's GPU under torchrun); ``"cpu"``, ``"cuda:1"``, ...: that device. Raises ValueError with what to
    change for a name torch does not know, a CUDA device without CUDA, or a GPU index the machine lacks."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {name!r})") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"device {name!r} needs a CUDA GPU, but none is available (torch {torch.__version__}, "
                             f"{build}); use device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {name!r})")
    return device
