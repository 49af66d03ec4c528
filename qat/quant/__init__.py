"""Quantization-aware training: LSQ(+) quantizers, quantized layers and the `quantize_` model surgery."""
from qat.quant.config import AttnQuantConfig, QuantConfig, QuantizerConfig
from qat.quant.functional import (Conv2dOp, LinearOp, clamp_min_ste, grad_scale, level_range, lsq_fake_quant,
                                  lsq_layer, lsq_reference, round_ste, sign_ste)
from qat.quant.layers import QuantConv2d, QuantLayerMixin, QuantLinear
from qat.quant.quantizers import (LSQQuantizer, clamp_steps_, compile_quantizers, is_quant_param,
                                  non_finite_quantizers, quantizers)
from qat.quant.surgery import quantize_

__all__ = ["AttnQuantConfig", "Conv2dOp", "LSQQuantizer", "LinearOp", "QuantConfig", "QuantConv2d",
           "QuantLayerMixin", "QuantLinear", "QuantizerConfig", "clamp_min_ste", "clamp_steps_", "compile_quantizers",
           "grad_scale", "is_quant_param", "level_range", "lsq_fake_quant", "lsq_layer", "lsq_reference",
           "non_finite_quantizers", "quantize_", "quantizers", "round_ste", "sign_ste"]
