"""Turn a float model into its W8A8 or weight-only form, and build empty quantized modules to load into.

Shape legend
    N  routed experts   H  hidden   F  expert width

:func:`quantize` is the whole pipeline (calibrate -> smooth -> quantize) on a float model, in place.
:func:`quantize_modules` swaps every quantizable ``nn.Linear`` for an :class:`Int8Linear` and every MoGE
layer's experts for :class:`QuantizedExperts`; the router, embeddings, norms and output head stay float.
Static activation scales come from the calibration: one per linear, and one per layer's experts for each
of their two matrices (the max over experts, as Ascend stores it).

:func:`quantize_weights` is the weight-only conversion (int8 per channel, int4 group-wise; no calibration):
the same linears and experts become :class:`~.weight_only.WeightOnlyLinear` / ``WeightOnlyExperts``, and
optionally the output head too.
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
from .weight_only import INT4_GROUPS, WeightOnlyExperts, WeightOnlyLinear, check_group_size


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


def _weight_only_targets(model: nn.Module, head: bool) -> tuple[dict[str, nn.Linear], dict[str, Any]]:
    """``(linears, experts)`` that weight-only quantization replaces, by module name."""
    linears = dict(quantizable_linears(model))
    if head:
        config = getattr(model, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            raise QuantError("the output head is tied to the embedding (tie_word_embeddings): quantizing it would "
                             "untie them; leave the head float")
        head_mod = getattr(model, "lm_head", None)
        if isinstance(head_mod, nn.Linear):
            linears["lm_head"] = head_mod
    experts = {f"{n}.experts": layer.experts for n, layer in moe_layers(model).items()}
    return linears, experts


def _input_dims(linears: Mapping[str, nn.Linear], experts: Mapping[str, Any]) -> dict[str, int]:
    dims = {n: lin.in_features for n, lin in linears.items()}
    for n, ex in experts.items():
        dims[f"{n}.gate_up_proj"], dims[f"{n}.down_proj"] = ex.hidden_size, ex.intermediate_size
    return dims


def default_group_size(model: nn.Module, head: bool = False) -> int:
    """The int4 group size ``quantize_weights`` uses when none is given: 128 where it divides every quantized
    input dim, else the largest of 64 and 32 that does (e.g. 32 for the ``tiny`` preset's experts, F=96)."""
    dims = _input_dims(*_weight_only_targets(model, head))
    for g in (128, 64, 32):
        if all(d % g == 0 for d in dims.values()):
            return g
    bad = sorted(f"{n} ({d})" for n, d in dims.items() if d % 32)
    raise QuantError(f"no int4 group size in {INT4_GROUPS} divides every input dim; e.g. {', '.join(bad[:3])}")


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int, group_size: int | None = None, head: bool = False,
                     compute: str = "auto", act_dtype: torch.dtype | None = torch.bfloat16) -> int | None:
    """Weight-only int8 (per channel) or int4 (``group_size`` inputs per scale; None: :func:`default_group_size`)
    of a float ``model``, in place: attention q/k/v/o, shared expert, dense MLPs, the routed experts and,
    with ``head``, the output head. The router, embeddings and norms stay float. Needs no calibration.
    Returns the group size used (None for int8). Bad options raise :class:`QuantError` before any change.
    """
    if is_quantized(model):
        raise QuantError("the model is already quantized; quantize the float model it was made from")
    if len(getattr(model, "mtp", ())):
        raise QuantError(f"the model has {len(model.mtp)} MTP predictor(s); weight-only quantization covers the "
                         f"main model only: quantize a model without them")
    linears, experts = _weight_only_targets(model, head)
    if not linears and not experts:
        raise QuantError("nothing to quantize: the model has no decoder layers")
    if bits == 4 and group_size is None:
        group_size = default_group_size(model, head)
    for name, dim in _input_dims(linears, experts).items():  # every check before the first change
        check_group_size(bits, dim, group_size, name)
    for name, lin in linears.items():
        _replace(model, name, WeightOnlyLinear.quantize(lin.weight, lin.bias, bits, group_size, compute, act_dtype))
    for name, ex in experts.items():
        _replace(model, name, WeightOnlyExperts.quantize(ex, bits, group_size, compute, act_dtype))
    return group_size if bits == 4 else None


def install_weight_only(model: nn.Module, linears: set[str] | frozenset[str], bits: int,
                        group_size: int | None = None) -> nn.Module:
    """Swap in empty weight-only modules (on each module's current device, e.g. meta) for loading: ``linears``
    names quantizable linears, the output head (``lm_head``) or a MoGE layer's ``...mlp.experts``. Other
    names raise :class:`QuantError` (the router, embeddings and norms stay float)."""
    lins, experts = _weight_only_targets(model, head="lm_head" in linears)
    for name in sorted(linears):
        if name in lins:
            old = lins[name]
            with torch.device(old.weight.device):
                new = WeightOnlyLinear(old.in_features, old.out_features, bits, group_size, None, old.bias is not None)
        elif name in experts:
            old = experts[name]
            with torch.device(old.gate_up_proj.device):
                new = WeightOnlyExperts(old.num_experts, old.hidden_size, old.intermediate_size, bits, group_size,
                                        old.backend)
        else:
            raise QuantError(f"{name} cannot be quantized by moge (the router, embeddings and norms stay in "
                             f"high precision)")
        _replace(model, name, new)
    return model


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
