"""Checks shared by the public entry points: scalars, tensors, token ids and sizes against memory.

Every check raises :class:`~moge.errors.InvalidArgumentError` (a ``ValueError``) or
:class:`~moge.errors.ArgumentTypeError` (a ``TypeError``) whose message names the argument, the value
it got and what is allowed, so a bad call fails at the entry point before any work is done. The
tensor checks read only metadata (type, dtype, shape, device); the two that read values
(:func:`ids_in_range`, :func:`all_finite`) reduce the tensor to one number, which is a device-to-host
sync on an accelerator: entry points call them only where that is free (CPU tensors) or asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import ArgumentTypeError, InsufficientMemoryError, InvalidArgumentError

__all__ = ["integer", "number", "boolean", "choice", "tensor", "ids_in_range", "all_finite", "available_memory",
           "check_memory", "fmt"]


def fmt(value: Any) -> str:
    """A short repr of a value for error messages (tensors by shape and dtype, long reprs cut)."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return "any value"


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None, *, optional: bool = False,
            error: type[Exception] = InvalidArgumentError) -> int | None:
    """``value`` as an ``int`` (``bool`` is refused), optionally None, within ``[lo, hi]``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        import numpy as np
        if not isinstance(value, np.integer):
            raise ArgumentTypeError(f"{name} must be an integer{' or None' if optional else ''}, got {fmt(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise error(f"{name} must be an integer {_range_text(lo, hi)}, got {value}")
    return value


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, optional: bool = False, finite: bool = True,
           error: type[Exception] = InvalidArgumentError) -> float | None:
    """``value`` as a finite ``float`` (ints accepted, ``bool`` and strings refused) within the range."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        import numpy as np
        if not isinstance(value, (np.integer, np.floating)):
            raise ArgumentTypeError(f"{name} must be a number{' or None' if optional else ''}, got {fmt(value)}")
    value = float(value)
    allowed = _range_text(lo, hi, lo_open, hi_open)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise error(f"{name} must be a finite number {allowed}, got {value}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or \
            (hi is not None and (value > hi or (hi_open and value == hi))):
        raise error(f"{name} must be {allowed}, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {fmt(value)}")
    return value


def choice(name: str, value: Any, choices: Collection[Any], error: type[Exception] = InvalidArgumentError) -> Any:
    """``value`` if it is one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise error(f"{name} must be one of {sorted(map(str, choices))}, got {fmt(value)}")
    return value


_KINDS = {"float": "a floating-point", "int": "an integer", "any": "a"}


def tensor(name: str, value: Any, kind: str = "any", dims: int | Sequence[int] | None = None,
           last: int | None = None, nonempty: bool = False, error: type[Exception] = InvalidArgumentError) -> Tensor:
    """``value`` if it is a tensor of ``kind`` (``float``: real floating point, ``int``: integer, not
    bool), with ``dims`` dimensions (one count or several allowed) and last dimension ``last``.

    ``nonempty`` refuses a tensor with a zero-sized dimension. Reads metadata only (no sync).
    """
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(f"{name} must be {_KINDS[kind]} torch.Tensor, got {type(value).__name__}")
    dt = value.dtype
    if kind == "float" and not (dt.is_floating_point and not dt.is_complex):
        raise ArgumentTypeError(f"{name} must be a real floating-point tensor, got dtype {dt}")
    if kind == "int" and (dt.is_floating_point or dt.is_complex or dt == torch.bool):
        raise ArgumentTypeError(f"{name} must be an integer tensor (e.g. torch.long), got dtype {dt}")
    if dims is not None:
        allowed = (dims,) if isinstance(dims, int) else tuple(dims)
        if value.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise error(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if last is not None and (value.dim() == 0 or value.shape[-1] != last):
        raise error(f"{name} must have last dimension {last}, got shape {tuple(value.shape)}")
    if nonempty and value.numel() == 0:
        raise error(f"{name} is empty (shape {tuple(value.shape)}): at least one element per dimension is needed")
    return value


def ids_in_range(name: str, ids: Tensor, upper: int, allow: Collection[int] = (),
                 error: type[Exception] = InvalidArgumentError) -> None:
    """Every entry of the integer tensor ``ids`` is in ``[0, upper)`` (or one of ``allow``, e.g. -100).

    Costs one reduction, a device-to-host sync on an accelerator.
    """
    if ids.numel() == 0:
        return
    bad_mask = (ids < 0) | (ids >= upper)
    for a in allow:
        bad_mask &= ids != a
    if bool(bad_mask.any()):
        bad = ids[bad_mask]
        extra = f" (or {', '.join(map(str, allow))})" if allow else ""
        raise error(f"{name} holds {bad.numel()} value(s) outside [0, {upper}){extra}, e.g. {int(bad[0])} "
                    f"(min {int(ids.min())}, max {int(ids.max())})")


def all_finite(name: str, t: Tensor, error: type[Exception] = InvalidArgumentError) -> None:
    """Every entry of the floating tensor ``t`` is finite (a device-to-host sync on an accelerator)."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise error(f"{name} holds {bad} non-finite value(s) (NaN or inf) out of {t.numel()}")


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes that can still be allocated on ``device`` (CPU: ``MemAvailable``), or None if unknown."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except Exception:  # noqa: BLE001 - no driver, or not initialised: unknown
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
            else:
                avail = None
    except OSError:
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)  # an address-space limit binds first
    return min(avail, soft) if soft != resource.RLIM_INFINITY else avail


def check_memory(nbytes: int | float, what: str, device: torch.device | str | None = None,
                 fraction: float = 0.9) -> None:
    """Raise :class:`~moge.errors.InsufficientMemoryError` if ``nbytes`` exceeds ``fraction`` of the
    memory available on ``device`` (nothing is checked when that is unknown)."""
    avail = available_memory(device)
    if avail is not None and nbytes > fraction * avail:
        raise InsufficientMemoryError(f"{what} needs about {_gb(nbytes)} but only {_gb(avail)} is available "
                                      f"on {torch.device(device) if device is not None else 'cpu'}; "
                                      f"use smaller sizes")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n < 1e12 else f"{n / 1e12:.1f} TB"
