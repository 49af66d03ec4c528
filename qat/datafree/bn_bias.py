"""Bias correction from BatchNorm statistics (DFQ §4.2, analytic): no data.

A quantized layer computes W_q x instead of W x, so its output mean is off by (W_q - W) E[x]. When its input is
ReLU(z) with z ~ N(mu, sigma^2) per channel (mu, sigma: the preceding BN's beta and |gamma|, see `fold_bn_`),
E[x] = sigma * phi(mu / sigma) + mu * Phi(mu / sigma) (the rectified Gaussian mean), and (W_q - W) E[x] is
subtracted from the layer's bias. For a conv the kernel is summed over its window (exact away from the
zero-padded border). Layers whose input does not come from a folded conv -> ReLU are left alone.
"""
import logging
import math

import torch
from torch import nn

from qat.datafree.fold import OutputStats
from qat.datafree.graph import find_links
from qat.quant import LSQQuantizer, QuantLayerMixin

log = logging.getLogger(__name__)


def rectified_gaussian_mean(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """E[ReLU(z)] for z ~ N(mean, std^2), elementwise; std = 0 gives ReLU(mean)."""
    safe = std.clamp_min(1e-12)
    t = mean / safe
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return torch.where(std > 0, safe * pdf + mean * cdf, mean.clamp_min(0))


@torch.no_grad()
def init_weight_quantizers_(model: nn.Module) -> int:
    """Initialise every pending weight quantizer from its own weight (its `init` rule); returns how many."""
    count = 0
    for m in model.modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, LSQQuantizer) and not q.is_initialized:
            was = q.training
            q.train()(m.weight)
            q.train(was)
            count += 1
    return count


def _weight_error(layer: nn.Module) -> torch.Tensor:
    q = layer.weight_quantizer
    if isinstance(q, LSQQuantizer) and not q.is_initialized:
        raise ValueError(f"bias_correct=bn_stats: the weight quantizer of {q.name or type(layer).__name__} is not "
                         "initialised; call init_weight_quantizers_(model) or calibrate first")
    was = q.training
    error = q.eval()(layer.weight) - layer.weight
    q.train(was)
    return error


@torch.no_grad()
def bn_bias_correct_(model: nn.Module, stats: dict[str, OutputStats]) -> list[str]:
    """Correct the bias of every quantized layer fed by ReLU(folded conv) with known `stats`; returns their names."""
    corrected = []
    for link in find_links(model):
        layer = model.get_submodule(link.second)
        if link.act != "relu" or link.first not in stats or not isinstance(layer, QuantLayerMixin):
            continue
        st = stats[link.first]
        ex = rectified_gaussian_mean(st.mean, st.std)
        error = _weight_error(layer)
        shift = error.flatten(2).sum(2) @ ex if error.ndim > 2 else error @ ex
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(shift))
        layer.bias.sub_(shift)
        corrected.append(link.second)
    log.info("bias correction from BN statistics: %d layers", len(corrected))
    return corrected
