"""Data-free quantization: analytic transforms (BN folding, DFQ equalization, bias absorption and correction) and
synthetic training data made from an FP model (`data=synthetic`: gaussian, ZeroQ, GDFQ, PSAQ)."""
from qat.datafree.bn_bias import bn_bias_correct_, init_weight_quantizers_, rectified_gaussian_mean
from qat.datafree.dfq import dfq_
from qat.datafree.equalize import absorb_bias_, channel_ranges, cross_layer_equalize_, equalizable_links
from qat.datafree.fold import OutputStats, fold_bn_
from qat.datafree.graph import Link, find_links
from qat.datafree.synthetic import SyntheticDataModule

__all__ = ["Link", "OutputStats", "SyntheticDataModule", "absorb_bias_", "bn_bias_correct_", "channel_ranges",
           "cross_layer_equalize_", "dfq_", "equalizable_links", "find_links", "fold_bn_", "init_weight_quantizers_",
           "rectified_gaussian_mean"]
