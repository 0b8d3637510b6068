"""Turn a calibrated, smoothed float model into its W8A8 form, and build empty W8A8 modules to load into.

Shape legend
    N  routed experts   H  hidden   F  expert width

:func:`quantize` is the whole pipeline (calibrate -> smooth -> quantize) on a float model, in place.
:func:`quantize_modules` swaps every quantizable ``nn.Linear`` for an :class:`Int8Linear` and every MoGE
layer's experts for :class:`QuantizedExperts`; the router, embeddings, norms and output head stay float.
Static activation scales come from the calibration: one per linear, and one per layer's experts for each
of their two matrices (the max over experts, as Ascend stores it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import SwiGLUExperts
from .calibrate import Calibration, calibrate, moe_layers, quantizable_linears
from .modules import ACTS, Int8Linear, QuantError, QuantizedExperts, is_quantized
from .smoothing import SMOOTHINGS, Smoothing, apply_smoothing


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def quantize_modules(model: nn.Module, calib: Calibration, act: str = "static",
                     divisors: Mapping[str, Tensor] | None = None, compute: str = "auto") -> nn.Module:
    """Replace the float linears and experts of ``model`` by int8 modules, in place; returns ``model``.

    ``divisors`` are the unfolded smoothing divisors of :class:`~.smoothing.Smoothing` (per-expert
    smoothing); weights must already carry their smoothing.
    """
    if act not in ACTS:
        raise QuantError(f"act must be one of {', '.join(ACTS)}; got {act!r}")
    divisors = divisors or {}
    static = act == "static"
    for name, lin in quantizable_linears(model).items():
        absmax = calib.linears[name] if static else None
        new = Int8Linear.quantize(lin.weight, lin.bias, act, absmax, divisors.get(name), compute)
        _replace(model, name, new.to(lin.weight.device))
    for name, layer in moe_layers(model).items():
        st = calib.moe[name]
        n = layer.num_experts
        # one scale per matrix for all the layer's experts: the max over experts
        gu = st.expert_input_absmax_NH.amax().expand(n) if static else None
        down = st.expert_hidden_absmax_NF.amax().expand(n) if static else None
        new = QuantizedExperts.quantize(layer.experts, act, gu, down, divisors.get(f"{name}.experts"), compute)
        layer.experts = new.to(layer.experts.gate_up_proj.device)
    return model


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: options, calibration size, starved experts and the smoothing applied."""
    smoothing: str
    alpha: float
    act: str
    calib_tokens: int
    min_expert_tokens: int
    starved: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    smoothing_applied: Smoothing | None = None

    def metadata(self) -> dict[str, Any]:
        """JSON-able summary (written next to a quantized checkpoint)."""
        return {"smoothing": self.smoothing, "alpha": self.alpha, "act": self.act,
                "calib_tokens": self.calib_tokens, "min_expert_tokens": self.min_expert_tokens,
                "starved_experts": {k: [list(p) for p in v] for k, v in self.starved.items()}}


def quantize(model: nn.Module, calib_rows: Tensor, alpha: float = 0.5, smoothing: str = "expert-aware",
             act: str = "static", min_expert_tokens: int = 64, batch_size: int = 8, compute: str = "auto",
             progress: bool = True, down_and_o: bool = True) -> QuantizeReport:
    """W8A8 of a float ``model`` in place: calibrate on ``calib_rows [R, S]``, smooth, quantize.

    ``smoothing``: ``expert-aware`` (eq. 10), ``per-expert`` (the baseline) or ``none``; ``act``: ``static``
    (per-tensor scales from calibration, as Ascend stores them) or ``dynamic`` (per-token at run time).
    ``down_and_o=False`` leaves the down-projection and o_proj inputs unsmoothed (an ablation). Bad options
    raise :class:`QuantError` before any work.
    """
    if smoothing not in SMOOTHINGS:
        raise QuantError(f"smoothing must be one of {', '.join(SMOOTHINGS)}; got {smoothing!r}")
    if act not in ACTS:
        raise QuantError(f"act must be one of {', '.join(ACTS)}; got {act!r}")
    if not 0.0 <= alpha <= 1.0:
        raise QuantError(f"alpha (migration strength) must be in [0, 1], got {alpha}")
    if is_quantized(model):
        raise QuantError("the model is already quantized; quantize the float model it was made from")
    if len(getattr(model, "mtp", ())):
        raise QuantError(f"the model has {len(model.mtp)} MTP predictor(s); W8A8 covers the main model only: "
                         f"quantize a model without them (save it with num_mtp_layers=0 and mtp.* dropped)")
    if not any(isinstance(m, SwiGLUExperts) for m in model.modules()) and not quantizable_linears(model):
        raise QuantError("nothing to quantize: the model has no decoder layers")
    calib = calibrate(model, calib_rows, batch_size, min_expert_tokens, progress)
    sm = apply_smoothing(model, calib, smoothing, alpha, down_and_o)
    quantize_modules(model, calib, act, sm.divisors, compute)
    return QuantizeReport(smoothing, alpha, act, calib.tokens, min_expert_tokens, calib.starved(), sm)


def install_quantized(model: nn.Module, plan: Mapping[str, str], smooth: frozenset[str] = frozenset(),
                      compute: str = "auto") -> nn.Module:
    """Swap in empty int8 modules (on each module's current device, e.g. meta) for loading a checkpoint.

    ``plan`` maps module names (quantizable linears, or a MoGE layer's ``...mlp.experts``) to ``static`` or
    ``dynamic``; ``smooth`` names the modules with an input divisor. Names outside the quantizable set
    raise :class:`QuantError`.
    """
    linears = quantizable_linears(model)
    experts = {f"{n}.experts": layer.experts for n, layer in moe_layers(model).items()}
    head = {n: m for n, m in model.named_modules() if n.endswith("lm_head") and isinstance(m, nn.Linear)}
    for name, act in plan.items():
        if name in linears or name in head:
            old = linears.get(name, head.get(name))
            with torch.device(old.weight.device):
                new = Int8Linear(old.in_features, old.out_features, None, act, old.bias is not None, name in smooth,
                                 compute)
        elif name in experts:
            old = experts[name]
            with torch.device(old.gate_up_proj.device):
                new = QuantizedExperts(old.num_experts, old.hidden_size, old.intermediate_size, act, old.backend,
                                       name in smooth, compute)
        else:
            raise QuantError(f"{name} cannot be quantized by moge (the router, embeddings and norms stay in "
                             f"high precision)")
        _replace(model, name, new)
    return model
