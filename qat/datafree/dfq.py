"""DFQ end to end on the weights (Nagel et al. 2019), no data: fold BN, equalize, absorb biases, quantize, correct.

Activation quantizers are left pending: initialise them with `calibrate_` on any batches (`data=synthetic`
images, or real ones), or leave `config.act` None for weight-only quantization.
"""
from torch import nn

from qat.datafree.bn_bias import bn_bias_correct_, init_weight_quantizers_
from qat.datafree.equalize import absorb_bias_, cross_layer_equalize_
from qat.datafree.fold import OutputStats, fold_bn_
from qat.quant import QuantConfig, quantize_


def fold_equalize_(model: nn.Module, cle: bool = True, bias_absorb: bool = True) -> dict[str, OutputStats]:
    """fold_bn_ -> cross_layer_equalize_ -> absorb_bias_ on an FP `model` in place (eval mode); the BN output
    statistics."""
    model.eval()
    stats = fold_bn_(model)
    links = cross_layer_equalize_(model, stats) if cle else None
    if bias_absorb and stats:
        absorb_bias_(model, stats, links)
    return stats


def dfq_(model: nn.Module, config: QuantConfig, cle: bool = True, bias_absorb: bool = True,
         bias_correct: bool = True) -> tuple[nn.Module, dict[str, OutputStats]]:
    """Quantize an FP `model` in place the DFQ way; returns (model, the BN output statistics used).

    Order: fold_bn_ -> cross_layer_equalize_ -> absorb_bias_ -> quantize_ -> weight quantizers from their own
    weights -> bn_bias_correct_. Each step can be switched off (ablations); folding always runs, so the
    result has no BatchNorm (eval-mode function of the FP model preserved up to quantization).
    """
    stats = fold_equalize_(model, cle, bias_absorb)
    quantize_(model, config)
    init_weight_quantizers_(model)
    if bias_correct and stats:
        bn_bias_correct_(model, stats)
    return model, stats
