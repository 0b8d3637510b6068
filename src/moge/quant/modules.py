"""The int8 modules: :class:`Int8Linear` (a W8A8 linear, optionally stacked over experts) and
:class:`QuantizedExperts` (the routed experts as two stacked int8 linears, run by the registered backends).

Shape legend
    R  rows   I  input features   O  output features   N  routed experts   H  hidden   F  expert width

State (buffers, so ``state_dict`` is the quantized checkpoint's content; ``E`` is ``()`` for a plain linear
and ``(N,)`` for stacked experts):

* ``weight`` int8 ``[*E, O, I]`` and ``weight_scale`` float32 ``[*E, O]`` (per output channel);
* static activations: ``input_scale`` and ``input_offset`` float32 ``[*E, 1]`` (per tensor; the offset
  an integer zero point) and ``quant_bias`` int32 ``[*E, O]``: the float bias ``b`` as
  ``round(b / (input_scale * weight_scale))``, Ascend's representation, so the int8 path adds it to the
  int32 accumulator before the one float scaling;
* dynamic activations: the float ``bias [*E, O]`` if the layer has one (scales are per row at run time);
* optionally ``input_smooth`` float32 ``[*E, I]``: a divisor applied to the input before quantization.
  Only ``--smoothing per-expert`` needs it (each expert smoothed on its own cannot be folded into the one
  RMSNorm the experts share); a smoothing shared by every reader of an input is folded into that norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MoGEError
from ..experts import StackedExperts
from .int8 import (COMPUTES, compute_dtype, int8_available, int8_matmul, quantize_input, quantize_weight,
                   static_input_scale)

ACTS = ("static", "dynamic")


class QuantError(MoGEError, ValueError):
    """Bad quantization input or options; the message names the problem."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QuantError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


class Int8Linear(nn.Module):
    """W8A8 linear ``y = x W^T + b`` with int8 weights per output channel and int8 activations.

    ``stack=N`` holds N such matrices (the routed experts): then :meth:`matmul` takes an expert index and
    :attr:`shape` is ``(N, O, I)`` like a stacked float tensor, which is what the experts backends use.
    ``compute`` picks ``int8`` (``torch._int_mm``), ``dequant`` (the oracle) or ``auto`` (int8 where the
    device has it, see :mod:`.int8`).
    """

    weight_kind = "w8a8"  # what :func:`is_quantized` looks for (weight-only modules say int8 / int4)

    def __init__(self, in_features: int, out_features: int, stack: int | None = None, act: str = "static",
                 bias: bool = False, smooth: bool = False, compute: str = "auto"):
        super().__init__()
        _check_choice("act", act, ACTS)
        _check_choice("compute", compute, COMPUTES)
        self.in_features, self.out_features, self.stack, self.act, self.compute = \
            in_features, out_features, stack, act, compute
        e = () if stack is None else (stack,)
        self.register_buffer("weight", torch.zeros(*e, out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(*e, out_features))
        if act == "static":
            self.register_buffer("input_scale", torch.ones(*e, 1))
            self.register_buffer("input_offset", torch.zeros(*e, 1))
            self.register_buffer("quant_bias", torch.zeros(*e, out_features, dtype=torch.int32))
            self.bias = None
        else:
            self.register_buffer("bias", torch.zeros(*e, out_features) if bias else None)
        self.register_buffer("input_smooth", torch.ones(*e, in_features) if smooth else None)

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None = None, act: str = "static",
                 input_absmax: Tensor | None = None, smooth: Tensor | None = None,
                 compute: str = "auto") -> "Int8Linear":
        """Quantize float ``weight [*E, O, I]`` (already multiplied by any smoothing it carries).

        Static activations need ``input_absmax``: the calibrated absolute maxima of the (smoothed) input,
        ``[*E, I]`` per channel or ``[*E]`` per tensor; the scale is ``max / 127``. ``smooth [*E, I]`` is
        stored as the input divisor (see the module docstring).
        """
        stack = weight.shape[0] if weight.dim() == 3 else None
        out_f, in_f = weight.shape[-2:]
        if act == "static" and input_absmax is None:
            raise QuantError("static activation quantization needs calibrated input maxima")
        mod = cls(in_f, out_f, stack, act, bias is not None, smooth is not None, compute)
        q, ws = quantize_weight(weight)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(ws)
        if act == "static":
            amax = input_absmax.to(torch.float32)
            s = static_input_scale(amax if amax.dim() == weight.dim() - 1 else amax.unsqueeze(-1))
            mod.input_scale.copy_(s.reshape(mod.input_scale.shape))
            if bias is not None:
                deq = mod.input_scale.double() * ws.double()
                qb = torch.round(bias.detach().double() / deq).clamp_(-2**31, 2**31 - 1)
                mod.quant_bias.copy_(qb.to(torch.int32))
        elif bias is not None:
            mod.bias.copy_(bias.detach())
        if smooth is not None:
            mod.input_smooth.copy_(smooth)
        return mod

    @property
    def shape(self) -> torch.Size:
        """``(*E, O, I)``: the shape of the float matrix (stack) this stands for."""
        return self.weight.shape

    def resolved_compute(self, device: torch.device) -> str:
        if self.compute != "auto":
            return self.compute
        return "int8" if int8_available(device) else "dequant"

    def deq_scale(self) -> Tensor:
        """``input_scale * weight_scale [*E, O]``: the factor of the int32 accumulator (static activations)."""
        return self.input_scale * self.weight_scale

    def matmul(self, x_RI: Tensor, e: int | None = None, row_scale_R1: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
        """``x [R, I]`` times matrix ``e`` (None: the only one) -> ``[R, O]`` in ``x``'s dtype (or into ``out``),
        each row multiplied by ``row_scale`` when given (the gate weights of expert rows)."""
        def sel(t: Tensor | None) -> Tensor | None:
            return t if t is None or e is None else t[e]

        x = x_RI
        if self.input_smooth is not None:
            x = x.to(compute_dtype(x)) / sel(self.input_smooth).to(compute_dtype(x))
        if self.act == "static":
            xq, s_R1 = quantize_input(x, sel(self.input_scale), sel(self.input_offset))
            offset, qb = sel(self.input_offset), sel(self.quant_bias)
        else:
            xq, s_R1 = quantize_input(x, None)
            offset = qb = None
        if row_scale_R1 is not None:
            s_R1 = s_R1 * row_scale_R1.to(s_R1.dtype)
        y = int8_matmul(xq, s_R1, sel(self.weight), sel(self.weight_scale), self.resolved_compute(x_RI.device),
                        offset, qb)
        if self.bias is not None:
            b = sel(self.bias).to(y.dtype)
            y = y + (b if row_scale_R1 is None else b * row_scale_R1.to(y.dtype))
        if out is not None:
            return out.copy_(y)
        return y.to(x_RI.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.stack is not None:
            raise QuantError("stacked Int8Linear (experts) is called through an experts backend, not directly")
        y = self.matmul(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> Tensor:
        """``weight * weight_scale`` as float32 ``[*E, O, I]`` (for analysis and tests)."""
        return self.weight.float() * self.weight_scale.unsqueeze(-1)

    def extra_repr(self) -> str:
        stack = f", stack={self.stack}" if self.stack is not None else ""
        smooth = ", smooth" if self.input_smooth is not None else ""
        return (f"in={self.in_features}, out={self.out_features}{stack}, act={self.act!r}, "
                f"compute={self.compute!r}{smooth}")


class QuantizedExperts(StackedExperts):
    """N int8 SwiGLU experts: ``gate_up_proj`` ``[N, 2F, H]`` and ``down_proj`` ``[N, H, F]`` as stacked
    :class:`Int8Linear`, computed by the same registered backends as the float experts (the backends take
    either weight kind; see :mod:`moge.experts`). Same call signature as :class:`~moge.experts.SwiGLUExperts`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "static",
                 backend: str = "auto", smooth: bool = False, compute: str = "auto"):
        super().__init__(num_experts, hidden_size, intermediate_size, backend)
        self.gate_up_proj = Int8Linear(hidden_size, 2 * intermediate_size, num_experts, act, smooth=smooth,
                                       compute=compute)
        self.down_proj = Int8Linear(intermediate_size, hidden_size, num_experts, act, compute=compute)

    @classmethod
    def quantize(cls, experts: Any, act: str, gate_up_absmax: Tensor | None, down_absmax: Tensor | None,
                 smooth_NH: Tensor | None = None, compute: str = "auto") -> "QuantizedExperts":
        """From float :class:`~moge.experts.SwiGLUExperts` (weights already smoothed). The absmax arguments
        are per expert ``[N, I]`` or ``[N]``; static activations use one scale per expert from them."""
        with torch.device("meta"):  # the two linears are replaced right away: allocate nothing here
            mod = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, act, experts.backend,
                      smooth_NH is not None, compute)
        mod.gate_up_proj = Int8Linear.quantize(experts.gate_up_proj.detach(), None, act, gate_up_absmax, smooth_NH,
                                               compute)
        mod.down_proj = Int8Linear.quantize(experts.down_proj.detach(), None, act, down_absmax, None, compute)
        return mod


def set_compute(model: nn.Module, compute: str) -> nn.Module:
    """Set ``compute`` (``auto``, ``int8``, ``dequant``) on every :class:`Int8Linear` of ``model``."""
    _check_choice("compute", compute, COMPUTES)
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.compute = compute
    return model


def weight_kinds(model: nn.Module) -> set[str]:
    """The quantized weight kinds ``model`` holds: ``w8a8`` (:class:`Int8Linear`), ``int8`` / ``int4``
    (:class:`~.weight_only.WeightOnlyLinear`); empty for a float model."""
    return {k for m in model.modules() if (k := getattr(m, "weight_kind", None)) is not None}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds any quantized module (W8A8 or weight-only)."""
    return bool(weight_kinds(model))
