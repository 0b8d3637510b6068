"""Weight-only int8 / int4: integer weights with float scales, float activations (the decoding formats
of GGUF q8_0 / q4, torchao's and gpt-fast's int8/int4 weight-only, compressed-tensors' W8A16 / W4A16).

Shape legend
    R  rows (tokens) of one matmul   I  input features   O  output features   G  group size (inputs per scale)
    N  routed experts   H  hidden   F  expert width   E  ``()`` for a plain linear, ``(N,)`` for stacked experts

Stored tensors (the module's buffers, so exactly its ``state_dict``):

* ``qweight``: int8 ``[*E, O, I]``, ``q`` in ``[-127, 127]`` (bits 8), or uint8 ``[*E, O, I // 2]`` (bits 4):
  byte ``j`` of row ``o`` holds input columns ``2j`` (low nibble) and ``2j + 1`` (high nibble), each stored
  as ``u = q + 8`` with ``q`` in ``[-8, 7]``. These bytes are, on a little-endian machine, the bytes of
  compressed-tensors' ``weight_packed`` int32 ``[O, I // 8]`` (eight 4-bit values per word, lowest bits
  first), so a checkpoint converts by a ``view`` (see :mod:`moge.checkpoint.weight_only`).
* ``weight_scale``: float32 ``[*E, O, I // G]``; bits 8 are per output channel (``G = I``, shape
  ``[*E, O, 1]``), bits 4 group-wise (``G`` in 32, 64, 128, 256 dividing ``I``).
* ``bias``: float ``[*E, O]`` when the layer has one.

The weight they stand for (:func:`dequantize_weight`) is symmetric, no zero point::

    w[..., o, i] = q[..., o, i] * weight_scale[..., o, i // G]

The product (:meth:`WeightOnlyLinear.matmul`) rounds the activations and the scales to ``act_dtype``
(bfloat16 by default, None: the input's dtype), accumulates in float32 and rounds the result to
``act_dtype``: ``y = act(act(x) @ (q * act(scale))^T)``, then the bias in the input's dtype. Two
computations of that one formula, chosen by ``compute``:

* ``kernel``: torch's CPU weight-only kernels, ``aten._weight_int8pack_mm`` (int8, scale per channel,
  ``I`` a multiple of 16) and ``aten._weight_int4pack_mm_for_cpu`` (int4 groups of 32-256, ``O`` a
  multiple of 16, weights
  repacked once into its own layout by ``_convert_weight_to_int4pack_for_cpu``, cached on the module);
  they are fast with bfloat16 activations and 10-100x slower with float32 ones (benchmarks/RESULTS.md,
  "Weight-only"), which is why ``act_dtype`` defaults to bfloat16.
* ``dequant``: dequantize the weight (:func:`dequantize_weight`) and ``F.linear``: the test oracle and the
  path for devices, dtypes and shapes without a kernel. ``auto`` takes ``kernel`` where it runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import StackedExperts
from .modules import QuantError, _check_choice

BITS = (8, 4)
WO_COMPUTES = ("auto", "kernel", "dequant")
INT4_GROUPS = (32, 64, 128, 256)  # what the CPU int4 kernel takes (and compressed-tensors' usual sizes)
_QMAX = {8: 127, 4: 7}
_TINY = 1e-8  # scale floor: an all-zero group gets a harmless nonzero scale


def check_group_size(bits: int, in_features: int, group_size: int | None, where: str = "weight") -> int:
    """The group size ``G`` of a ``bits`` weight with ``in_features`` inputs: ``I`` for int8 (per channel),
    ``group_size`` for int4; :class:`QuantError` naming ``where`` if it is not one of :data:`INT4_GROUPS`
    or does not divide ``I``."""
    if bits not in BITS:
        raise QuantError(f"{where}: bits must be 8 or 4, got {bits!r}")
    if bits == 8:
        if group_size not in (None, in_features):
            raise QuantError(f"{where}: int8 weights have one scale per output channel; group size "
                             f"{group_size} is not supported (use int4 for group-wise scales)")
        if in_features % 4:
            raise QuantError(f"{where}: int8 weights need an input dim divisible by 4, got {in_features}")
        return in_features
    if group_size not in INT4_GROUPS:
        raise QuantError(f"{where}: int4 group size must be one of {INT4_GROUPS}, got {group_size}")
    if in_features % group_size:
        raise QuantError(f"{where}: group size {group_size} does not divide its input dim {in_features}")
    return group_size


def pack_int4(q: Tensor) -> Tensor:
    """Signed int4 values ``q`` in ``[-8, 7]`` (any integer dtype, ``[..., I]`` with ``I`` even) -> uint8
    ``[..., I // 2]``: ``u = q + 8``, column ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., I // 2]`` -> int8 ``[..., I]`` in ``[-8, 7]``."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], -1).flatten(-2).to(torch.int8) - 8


def quantize_weight_only(w_OI: Tensor, bits: int, group_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of ``w [*E, O, I]``: ``(qweight, weight_scale)`` in the stored layout (see
    the module docstring). ``scale = max|w| / 127`` per channel (bits 8) or ``max|w| / 7.5`` per group of
    ``G`` inputs (bits 4, the full ``[-8, 7]`` range as compressed-tensors computes it); every weight is
    within ``scale / 2`` of its dequantized value."""
    g = check_group_size(bits, w_OI.shape[-1], group_size)
    w = w_OI.detach().to(torch.float64)
    groups = w.unflatten(-1, (w.shape[-1] // g, g))  # [*E, O, I/G, G]
    scale = (groups.abs().amax(-1) / (_QMAX[bits] + (0.5 if bits == 4 else 0.0))).clamp(min=_TINY)
    q = torch.round(groups / scale.unsqueeze(-1)).clamp_(-_QMAX[bits] - (1 if bits == 4 else 0), _QMAX[bits])
    q = q.flatten(-2).to(torch.int8)
    return (q if bits == 8 else pack_int4(q)), scale.to(torch.float32)


def dequantize_weight(qweight: Tensor, weight_scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The float weight ``[*E, O, I]`` that ``qweight`` / ``weight_scale`` stand for, in ``dtype``:
    ``w[..., o, i] = q[..., o, i] * weight_scale[..., o, i // G]`` (bits from the dtype: int8 is 8-bit,
    uint8 packed 4-bit; ``G = I / weight_scale.shape[-1]``)."""
    q = qweight if qweight.dtype == torch.int8 else unpack_int4(qweight)
    groups = weight_scale.shape[-1]
    w = q.to(dtype).unflatten(-1, (groups, q.shape[-1] // groups)) * weight_scale.to(dtype).unsqueeze(-1)
    return w.flatten(-2)


def _kernel_runs(bits: int, in_features: int, out_features: int, group: int, act: torch.dtype,
                 device: torch.device) -> bool:
    """Whether torch's CPU weight-only kernel takes this weight and activation dtype. The int8 kernel
    reads the input dim in blocks of 16 without checking: other sizes crash or read garbage (torch 2.13,
    measured), so they take the oracle."""
    if device.type != "cpu" or act not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if bits == 8:
        return hasattr(torch, "_weight_int8pack_mm") and in_features % 16 == 0
    return (hasattr(torch, "_weight_int4pack_mm_for_cpu") and out_features % 16 == 0 and group in INT4_GROUPS)


ACT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "input": None}


class WeightOnlyLinear(nn.Module):
    """Weight-only linear ``y = x W^T + b`` with int8 (per channel) or int4 (group-wise) weights and float
    activations; the stored tensors and the math are in the module docstring.

    ``stack=N`` holds N such matrices (the routed experts): :meth:`matmul` then takes an expert index and
    :attr:`shape` is ``(N, O, I)``, the experts backends' weight-kind seam (as :class:`~.Int8Linear`).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 stack: int | None = None, bias: bool = False, compute: str = "auto",
                 act_dtype: torch.dtype | None = torch.bfloat16):
        super().__init__()
        _check_choice("compute", compute, WO_COMPUTES)
        g = check_group_size(bits, in_features, group_size)
        self.in_features, self.out_features, self.bits, self.group_size, self.stack = \
            in_features, out_features, bits, g, stack
        self.compute, self.act_dtype = compute, act_dtype
        e = () if stack is None else (stack,)
        cols = in_features if bits == 8 else in_features // 2
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.zeros(*e, out_features, cols, dtype=qdtype))
        self.register_buffer("weight_scale", torch.ones(*e, out_features, in_features // g))
        self.register_buffer("bias", torch.zeros(*e, out_features) if bias else None)
        self._kernel_cache: dict[Any, tuple[Tensor, ...]] = {}  # derived kernel operands, see _operands

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, bits: int, group_size: int | None = None,
                 compute: str = "auto", act_dtype: torch.dtype | None = torch.bfloat16) -> "WeightOnlyLinear":
        """From a float ``weight [*E, O, I]`` (and ``bias [*E, O]``) by :func:`quantize_weight_only`."""
        stack = weight.shape[0] if weight.dim() == 3 else None
        out_f, in_f = weight.shape[-2:]
        with torch.device(weight.device):
            mod = cls(in_f, out_f, bits, group_size, stack, bias is not None, compute, act_dtype)
        q, s = quantize_weight_only(weight, bits, group_size)
        mod.qweight.copy_(q)
        mod.weight_scale.copy_(s)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    @property
    def weight_kind(self) -> str:
        """``int8`` or ``int4``."""
        return f"int{self.bits}"

    @property
    def shape(self) -> torch.Size:
        """``(*E, O, I)``: the shape of the float matrix (stack) this stands for."""
        return torch.Size((*self.qweight.shape[:-1], self.in_features))

    def resolved_compute(self, device: torch.device, act: torch.dtype) -> str:
        """``kernel`` or ``dequant``: what ``compute`` means for inputs on ``device`` in activation dtype ``act``."""
        runs = _kernel_runs(self.bits, self.in_features, self.out_features, self.group_size, act, device)
        if self.compute == "kernel" and not runs:
            raise QuantError(f"no {self.weight_kind} weight-only kernel for {act} activations on {device} "
                             f"(I={self.in_features}, O={self.out_features}, group {self.group_size}); use "
                             f"compute='dequant' or 'auto'")
        return "kernel" if runs and self.compute != "dequant" else "dequant"

    def _operands(self, act: torch.dtype) -> tuple[Tensor, ...]:
        """The kernel's weight operands, derived from the stored tensors once per activation dtype (and
        again if the stored tensors are replaced): int8 ``(qweight, scale [*E, O] in act)``; int4
        ``(packed [*E, O, I/2] in the kernel's own layout, scale-and-zero [*E, I/G, O, 2] in act)``."""
        key = (act, self.qweight.data_ptr(), self.weight_scale.data_ptr(), self.qweight.device)
        ops = self._kernel_cache.get(key)
        if ops is not None:
            return ops
        # plain tensors even when first called under inference_mode (they outlive it)
        with torch.inference_mode(False), torch.no_grad():
            s = self.weight_scale.to(act)
            if self.bits == 8:
                ops = (self.qweight, s.squeeze(-1).contiguous())
            else:
                flat = self.qweight.reshape(-1, *self.qweight.shape[-2:])
                packed = torch.stack([torch._convert_weight_to_int4pack_for_cpu(unpack_int4(m).to(torch.int32) + 8, 1)
                                      for m in flat]).reshape(*self.qweight.shape[:-1], -1)
                st = s.transpose(-1, -2)  # [*E, I/G, O]: the kernel's order
                ops = (packed, torch.stack([st, torch.zeros_like(st)], -1).contiguous())
        self._kernel_cache = {key: ops}  # one activation dtype at a time: the old operands are freed
        return ops

    def _kernel(self, x_RI: Tensor, e: int | None, act: torch.dtype) -> Tensor:
        w, s = self._operands(act)
        if e is not None:
            w, s = w[e], s[e]
        if self.bits == 8:
            return torch._weight_int8pack_mm(x_RI, w, s)
        return torch._weight_int4pack_mm_for_cpu(x_RI, w, self.group_size, s)

    def _dequant(self, x_RI: Tensor, e: int | None, act: torch.dtype) -> Tensor:
        f = torch.float64 if act == torch.float64 else torch.float32
        q, s = (self.qweight, self.weight_scale) if e is None else (self.qweight[e], self.weight_scale[e])
        return F.linear(x_RI.to(act).to(f), dequantize_weight(q, s.to(act), f)).to(act)

    def reduce_rows(self, x_PI: Tensor, ids_P: Tensor | None = None) -> Tensor:
        """Row p of ``x [P, I]`` times matrix ``ids_P[p]`` (None: the only matrix, P = 1) as a
        multiply-and-sum that dequantizes inside the sum, ``[P, O]`` in ``x``'s dtype (float32 or wider;
        activations are not rounded to ``act_dtype`` here). Only worth calling while ``torch.compile``
        traces: Inductor then streams the integer weights once (see :mod:`moge.experts.reduce`), the
        touched experts read in place. The bias, if any, is added."""
        q, s, b = self.qweight, self.weight_scale, self.bias
        if ids_P is not None:
            q, s, b = q[ids_P], s[ids_P], (None if b is None else b[ids_P])
        else:
            q, s, b = q.unsqueeze(0), s.unsqueeze(0), (None if b is None else b.unsqueeze(0))
        p, groups = x_PI.shape[0], s.shape[-1]
        if self.bits == 8:
            y = (q.to(x_PI.dtype) * x_PI.unsqueeze(1)).sum(-1) * s[..., 0].to(x_PI.dtype)
        else:  # low nibble = even input column, high = odd; a group of G inputs = G/2 bytes
            half = q.shape[-1] // groups  # G/2
            x_even = x_PI[:, 0::2].reshape(p, 1, groups, half)
            x_odd = x_PI[:, 1::2].reshape(p, 1, groups, half)
            lo = ((q & 0xF).to(x_PI.dtype) - 8).view(p, -1, groups, half)
            hi = ((q >> 4).to(x_PI.dtype) - 8).view(p, -1, groups, half)
            s_POg1 = s.to(x_PI.dtype).unsqueeze(-1)
            # one reduction over (group, byte) with the scale applied per element: Inductor vectorises
            # this; a sum per group then a sum of scaled groups ran 18x slower (measured, one thread)
            y = (lo * s_POg1 * x_even + hi * s_POg1 * x_odd).sum((-1, -2))
        return y if b is None else y + b.to(y.dtype)

    def matmul(self, x_RI: Tensor, e: int | None = None, row_scale_R1: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
        """``x [R, I]`` times matrix ``e`` (None: the only one) -> ``[R, O]`` in ``x``'s dtype (or into
        ``out``), each row multiplied by ``row_scale`` when given (the gate weights of expert rows)."""
        act = self.act_dtype or x_RI.dtype
        if (torch.compiler.is_compiling() and e is None and x_RI.shape[0] == 1 and x_RI.device.type == "cpu"
                and out is None and not torch.is_grad_enabled()):
            # a compiled decode step: one row in reduce form (the weight streamed once, see reduce_rows)
            y = self.reduce_rows(x_RI.to(torch.promote_types(x_RI.dtype, torch.float32))).to(x_RI.dtype)
            return y if row_scale_R1 is None else y * row_scale_R1.to(y.dtype)
        if self.resolved_compute(x_RI.device, act) == "kernel":
            y = self._kernel(x_RI.to(act).contiguous(), e, act)
        else:
            y = self._dequant(x_RI, e, act)
        y = y.to(x_RI.dtype)
        if self.bias is not None:
            y = y + (self.bias if e is None else self.bias[e]).to(y.dtype)
        if row_scale_R1 is not None:
            y = y * row_scale_R1.to(y.dtype)
        return y if out is None else out.copy_(y)

    def forward(self, x: Tensor) -> Tensor:
        if self.stack is not None:
            raise QuantError("stacked WeightOnlyLinear (experts) is called through an experts backend, not directly")
        y = self.matmul(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """:func:`dequantize_weight` of this module's tensors ``[*E, O, I]``."""
        return dequantize_weight(self.qweight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        stack = f", stack={self.stack}" if self.stack is not None else ""
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        act = str(self.act_dtype).removeprefix("torch.") if self.act_dtype is not None else "input"
        return (f"in={self.in_features}, out={self.out_features}{stack}, bits={self.bits}{group}, "
                f"compute={self.compute!r}, act={act}")


class WeightOnlyExperts(StackedExperts):
    """N weight-only SwiGLU experts: ``gate_up_proj [N, 2F, H]`` and ``down_proj [N, H, F]`` as stacked
    :class:`WeightOnlyLinear`, computed by the registered experts backends (the weight-kind seam)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int,
                 group_size: int | None = None, backend: str = "auto", compute: str = "auto",
                 act_dtype: torch.dtype | None = torch.bfloat16):
        super().__init__(num_experts, hidden_size, intermediate_size, backend)
        self.gate_up_proj = WeightOnlyLinear(hidden_size, 2 * intermediate_size, bits, group_size, num_experts,
                                             compute=compute, act_dtype=act_dtype)
        self.down_proj = WeightOnlyLinear(intermediate_size, hidden_size, bits, group_size, num_experts,
                                          compute=compute, act_dtype=act_dtype)

    @classmethod
    def quantize(cls, experts: Any, bits: int, group_size: int | None = None, compute: str = "auto",
                 act_dtype: torch.dtype | None = torch.bfloat16) -> "WeightOnlyExperts":
        """From float :class:`~moge.experts.SwiGLUExperts`."""
        with torch.device("meta"):  # the two linears are replaced right away: allocate nothing here
            mod = cls(experts.num_experts, experts.hidden_size, experts.intermediate_size, bits, group_size,
                      experts.backend, compute, act_dtype)
        mod.gate_up_proj = WeightOnlyLinear.quantize(experts.gate_up_proj.detach(), None, bits, group_size, compute,
                                                     act_dtype)
        mod.down_proj = WeightOnlyLinear.quantize(experts.down_proj.detach(), None, bits, group_size, compute,
                                                  act_dtype)
        return mod


def set_weight_only(model: nn.Module, compute: str | None = None, act_dtype: str | None = None) -> nn.Module:
    """Set ``compute`` (``auto``, ``kernel``, ``dequant``) and/or ``act_dtype`` (``bfloat16``, ``float16``,
    ``float32``, ``input``) on every :class:`WeightOnlyLinear` of ``model`` (None: unchanged)."""
    if compute is not None:
        _check_choice("compute", compute, WO_COMPUTES)
    if act_dtype is not None:
        _check_choice("act_dtype", act_dtype, tuple(ACT_DTYPES))
    for m in model.modules():
        if isinstance(m, WeightOnlyLinear):
            if compute is not None:
                m.compute = compute
            if act_dtype is not None:
                m.act_dtype = ACT_DTYPES[act_dtype]
    return model
