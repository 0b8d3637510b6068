"""W8A8 and weight-only int8 / int4 quantization for any moge model: calibration, expert-aware smoothing (the paper's eq. 10),
int8 linears and stacked experts.

One job per module:

* :mod:`.int8` -- the arithmetic: per-channel weight int8, static / dynamic activation int8, the int8
  matmul (``torch._int_mm``) and its dequantize oracle.
* :mod:`.modules` -- :class:`Int8Linear` (also stacked over experts) and :class:`QuantizedExperts`, run by
  the experts backends of :mod:`moge.experts` through their weight-kind seam.
* :mod:`.calibrate` -- per-channel activation maxima through hooks; oversampling rarely chosen experts.
* :mod:`.smoothing` -- SmoothQuant for q/k/v, eq. 10 for the MoE input, the per-expert baseline.
* :mod:`.weight_only` -- weight-only int8 / int4 (float activations): the stored layout, the pure
  :func:`dequantize_weight`, :class:`WeightOnlyLinear` / :class:`WeightOnlyExperts` on torch's CPU kernels.
* :mod:`.convert` -- the pipelines (:func:`quantize`, :func:`quantize_weights`) and empty modules for loading.
* :mod:`.quality` -- per-domain loss, routing agreement and routing KL against full precision.

The Ascend W8A8 checkpoint layout is :mod:`moge.checkpoint.quantized`; ``moge quantize`` is :mod:`moge.cli.quantize`.
"""

from .calibrate import Calibration, MoEStats, calibrate, calibration_rows
from .convert import (QuantizeReport, default_group_size, install_quantized, install_weight_only, quantize,
                      quantize_modules, quantize_weights)
from .int8 import int8_available, quantize_input, quantize_weight
from .modules import ACTS, Int8Linear, QuantError, QuantizedExperts, is_quantized, set_compute, weight_kinds
from .smoothing import SMOOTHINGS, apply_smoothing, expert_aware_scale, per_expert_scales, smooth_scale
from .weight_only import (INT4_GROUPS, WeightOnlyExperts, WeightOnlyLinear, dequantize_weight, pack_int4,
                          quantize_weight_only, set_weight_only, unpack_int4)


__all__ = [
    "ACTS", "Calibration", "INT4_GROUPS", "Int8Linear", "MoEStats", "QuantError", "QuantizeReport", "QuantizedExperts",
    "SMOOTHINGS", "WeightOnlyExperts", "WeightOnlyLinear", "apply_smoothing", "calibrate", "calibration_rows",
    "default_group_size", "dequantize_weight", "expert_aware_scale", "install_quantized", "install_weight_only",
    "int8_available", "is_quantized", "pack_int4", "per_expert_scales", "quantize", "quantize_input",
    "quantize_modules", "quantize_weight", "quantize_weight_only", "quantize_weights", "set_compute",
    "set_weight_only", "smooth_scale", "unpack_int4", "weight_kinds",
]
