"""The experts-backend registry: backends by name (see :mod:`moge.experts` for the signature)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..errors import InvalidArgumentError


# (x [T,H], ids [T,K], weights [T,K], gate_up [N,2F,H], down [N,H,F], kernels=None) -> y [T,H]
ExpertsBackend = Callable[..., Tensor]

_BACKENDS: dict[str, ExpertsBackend] = {}
_HOST_SYNC: set[str] = set()  # backends that read data-dependent sizes on the host (not traceable by torch.export)


class ExpertsBackendError(InvalidArgumentError):
    """An experts backend that does not exist, or cannot run where it was asked to (e.g. under torch.export)."""


def register_experts_backend(name: str, host_sync: bool = False) -> Callable[[ExpertsBackend], ExpertsBackend]:
    """Decorator registering an experts backend under ``name`` (see the module docstring for the signature).

    ``host_sync=True`` marks a backend that reads data-dependent sizes on the host; ``auto`` never picks
    one under ``torch.export``, and naming one there is an error.
    """
    def deco(fn: ExpertsBackend) -> ExpertsBackend:
        _BACKENDS[name] = fn
        (_HOST_SYNC.add if host_sync else _HOST_SYNC.discard)(name)
        return fn
    return deco


def available_backends() -> list[str]:
    """Names accepted by :func:`get_experts_backend` (plus ``auto``)."""
    return sorted(_BACKENDS)


def lookup(name: str) -> ExpertsBackend:
    """The registered backend ``name`` (``auto`` is resolved by :func:`moge.experts.get_experts_backend`)."""
    if name not in _BACKENDS:
        raise ExpertsBackendError(f"unknown experts backend {name!r}; available: {['auto', *available_backends()]}")
    return _BACKENDS[name]


def reads_counts_on_host(name: str) -> bool:
    """True for a backend that reads data-dependent sizes on the host (not traceable by torch.export)."""
    return name in _HOST_SYNC
