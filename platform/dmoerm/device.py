"""Where tensors live and in what precision the transformer blocks compute: one policy for every phase
(router, phase 1, the baseline, phase-2 experts, phase-3 features and aggregator) and for scoring.

    device = resolve_device("auto")               # cuda when torch sees a GPU, else cpu
    check_precision(device, "bfloat16")           # bfloat16 is refused off CUDA
    with autocast(device, "bfloat16"): ...        # bf16 autocast on CUDA; float32: no autocast at all
    enc = to_device(enc, device)                  # tensors, tuples, lists, dicts and dataclasses of them

Precision. ``float32`` computes everything in float32. ``bfloat16`` runs every forward of the backbone's
blocks (the frozen trunk and the trainable top with its value head) under CUDA bf16 autocast, with the
weights kept in float32 (mixed precision: the optimiser updates float32 weights; bf16 needs no gradient
scaler). The states handed from one part to the next (trunk states, each expert's pooled state) are rounded
to bf16 by :func:`round_features` in training and in scoring alike, and caches store them in bf16, so a
model is never trained on one rounding and scored on another. The router and the aggregator read those
rounded features and run in float32 on the same device, in training and scoring. bfloat16 on CPU is
refused (CPU autocast would be slower and round differently from CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import torch

Precision = Literal["float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
T = TypeVar("T")


def check_device_name(name: str, field: str = "model.device") -> None:
    """Refuse a device name other than ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>`` (``field`` names it)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"{field} must be auto, cpu, cuda or cuda:<index>, got {name!r}")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; ``cuda`` without a visible GPU
    is refused with an error that says so (instead of failing later on the first tensor)."""
    if isinstance(name, torch.device):
        device = name
    else:
        check_device_name(name)
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model.device is {str(device)!r} but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use auto or cpu")
    return device


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse an unknown precision, and bfloat16 on anything but CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16" and device.type != "cuda":
        raise ValueError(f"model.precision=bfloat16 needs a CUDA device (bf16 autocast on the GPU), but the "
                         f"device is {str(device)!r}; use model.precision=float32 on CPU")


def feature_dtype(precision: str) -> torch.dtype:
    """The dtype cached features are stored in: the precision's (float32 or bfloat16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def round_features(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` rounded to the precision and returned as float32 (unchanged, no copy, for float32): the one
    rounding of the states one part hands to the next, in training and scoring."""
    if precision == "float32":
        return x if x.dtype == torch.float32 else x.float()
    return x.to(feature_dtype(precision)).float()


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """bf16 autocast on CUDA for ``bfloat16``; nothing (plain float32) for ``float32``."""
    device = torch.device(device)
    if precision == "float32":
        yield
        return
    check_precision(device, precision)
    with torch.autocast(device_type=device.type, dtype=feature_dtype(precision)):
        yield


def to_device(obj: T, device: torch.device | str, non_blocking: bool = False) -> T:
    """Move every tensor in ``obj`` (a tensor, or tuples, lists, dicts and dataclass instances of them) to
    ``device``; anything else is returned as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)  # type: ignore[return-value]
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device, non_blocking) for x in obj)  # type: ignore[return-value]
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes: dict[str, Any] = {f.name: to_device(getattr(obj, f.name), device, non_blocking)
                                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)  # type: ignore[return-value]
    return obj


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (cpu for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
