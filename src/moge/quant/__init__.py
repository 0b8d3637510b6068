"""W8A8 quantization for any moge model: calibration, expert-aware smoothing (the paper's eq. 10),
int8 linears and stacked experts.

One job per module:

* :mod:`.int8` -- the arithmetic: per-channel weight int8, static / dynamic activation int8, the int8
  matmul (``torch._int_mm``) and its dequantize oracle.
* :mod:`.modules` -- :class:`Int8Linear` (also stacked over experts) and :class:`QuantizedExperts`, run by
  the experts backends of :mod:`moge.experts` through their weight-kind seam.
* :mod:`.calibrate` -- per-channel activation maxima through hooks; oversampling rarely chosen experts.
* :mod:`.smoothing` -- SmoothQuant for q/k/v, eq. 10 for the MoE input, the per-expert baseline.
* :mod:`.convert` -- the pipeline (:func:`quantize`) and empty int8 modules for loading.
* :mod:`.quality` -- per-domain loss, routing agreement and routing KL against full precision.

The Ascend W8A8 checkpoint layout is :mod:`moge.checkpoint.quantized`; ``moge quantize`` is :mod:`moge.cli.quantize`.
"""

from .calibrate import Calibration, MoEStats, calibrate, calibration_rows
from .convert import QuantizeReport, install_quantized, quantize, quantize_modules
from .int8 import int8_available, quantize_input, quantize_weight
from .modules import ACTS, Int8Linear, QuantError, QuantizedExperts, is_quantized, set_compute
from .smoothing import SMOOTHINGS, apply_smoothing, expert_aware_scale, per_expert_scales, smooth_scale


__all__ = [
    "ACTS", "Calibration", "Int8Linear", "MoEStats", "QuantError", "QuantizeReport", "QuantizedExperts", "SMOOTHINGS",
    "apply_smoothing", "calibrate", "calibration_rows", "expert_aware_scale", "install_quantized", "int8_available",
    "is_quantized", "per_expert_scales", "quantize", "quantize_input", "quantize_modules", "quantize_weight",
    "set_compute", "smooth_scale",
]
