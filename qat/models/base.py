"""The qat model protocol: every model family (ViT-Lite / CCT, CIFAR ResNets, timm) implements it once."""
from abc import ABC, abstractmethod

import torch
from torch import nn


class QatModel(nn.Module, ABC):
    """An image classifier with a pooled feature, a feature list for distillation and quantization hints.

    Subclasses implement `forward_features` and `forward_head`, and set in their constructor:
        default_quant_modules: fnmatch patterns of the Linear/Conv2d layers `quantize_` picks by default.
        non_negative_inputs: patterns of layers whose input is treated as >= 0, so an automatically
            signed activation quantizer (quant.act.signed=null) uses the unsigned level set.
    """

    default_quant_modules: list[str]
    non_negative_inputs: list[str]

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (B, C, H, W) -> (pooled (B, d), features for distillation)."""

    @abstractmethod
    def forward_head(self, pooled: torch.Tensor, label: bool = False) -> torch.Tensor:
        """Pooled features -> logits of the classifier, or of the second (label) head when `label`."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits (B, classes), or (logits, features) when `return_features`."""
        pooled, features = self.forward_features(x)
        logits = self.forward_head(pooled)
        return (logits, features) if return_features else logits
