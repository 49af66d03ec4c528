"""Data-free quantization: analytic transforms (BN folding, DFQ equalization, bias absorption and correction)."""
from qat.datafree.bn_bias import bn_bias_correct_, init_weight_quantizers_, rectified_gaussian_mean
from qat.datafree.equalize import absorb_bias_, channel_ranges, cross_layer_equalize_, equalizable_links
from qat.datafree.fold import OutputStats, fold_bn_
from qat.datafree.graph import Link, find_links

__all__ = ["Link", "OutputStats", "absorb_bias_", "bn_bias_correct_", "channel_ranges", "cross_layer_equalize_",
           "equalizable_links", "find_links", "fold_bn_", "init_weight_quantizers_", "rectified_gaussian_mean"]
