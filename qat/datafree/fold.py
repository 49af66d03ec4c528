"""Fold BatchNorm into the preceding conv (eval-mode function preserved) and keep its statistics for data-free PTQ.

After folding, the conv computes BN(conv(x)) itself: W' = W * g / sqrt(var + eps), b' = beta + (b - mean) * g /
sqrt(var + eps), and the BatchNorm becomes an Identity. The folded conv's output is modelled as N(beta, |gamma|^2)
per channel (what BN makes of its input): `OutputStats`, used by bias absorption and BN-statistic bias correction.
"""
import logging
from dataclasses import dataclass

import torch
from torch import nn

from qat.datafree.graph import conv_bn_pairs

log = logging.getLogger(__name__)


@dataclass
class OutputStats:
    """Per-channel mean and std of a layer's pre-activation output (Gaussian model)."""
    mean: torch.Tensor
    std: torch.Tensor


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@torch.no_grad()
def fold_bn_(model: nn.Module) -> dict[str, OutputStats]:
    """Fold every conv -> BatchNorm2d pair of `model` in place; returns {conv name: its output statistics}.

    Uses the BN running statistics (eval-mode behaviour): the folded model equals the original in eval mode.
    """
    stats = {}
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale)
        stats[conv_name] = OutputStats(bn.bias.detach().clone(), bn.weight.detach().abs().clone())
        _replace(model, bn_name, nn.Identity())
    log.info("folded %d BatchNorm layers into their convs", len(stats))
    return stats
