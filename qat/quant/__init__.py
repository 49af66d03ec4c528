"""Quantization-aware training: LSQ(+) quantizers, quantized layers, `quantize_` model surgery and calibration."""
from qat.quant.calibrate import calibrate_
from qat.quant.callback import QuantizationCallback
from qat.quant.config import AttnQuantConfig, QuantConfig, QuantizerConfig
from qat.quant.functional import lsq_fake_quant, lsq_reference
from qat.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear
from qat.quant.quantizers import LSQQuantizer, clamp_steps_, compile_quantizers, quantizers, quantizers_off
from qat.quant.surgery import quantize_

__all__ = ["AttnQuantConfig", "LSQQuantizer", "QuantConfig", "QuantConv2d", "QuantLayerMixin", "QuantLinear",
           "QuantizationCallback", "QuantizerConfig", "calibrate_", "clamp_steps_", "compile_quantizers",
           "lsq_fake_quant", "lsq_reference", "quantize_", "quantizers", "quantizers_off"]
