"""Any timm model behind the qat model protocol (`QatModel`)."""
import timm
import torch
from torch import nn

from qat.models.base import QatModel


class TimmModel(QatModel):
    """Wraps `timm.create_model(name, num_classes=..., pretrained=..., **kwargs)` as `self.model`.

    Features are the outputs of the items of `model.blocks` when the timm model has such a container
    (ViT, DeiT, ...), otherwise just [pooled]. `default_quant_modules` lists every Linear/Conv2d except
    the first conv (stem / patch embedding) and the classifier head.
    """

    def __init__(self, name: str, num_classes: int = 10, pretrained: bool = False, **kwargs):
        super().__init__()
        self.model = timm.create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
        head = next((f"model.{n}" for n, m in self.model.named_modules() if m is self.model.get_classifier()), None)
        layers = [(n, m) for n, m in self.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        first_conv = next((n for n, m in layers if isinstance(m, nn.Conv2d)), None)
        self.default_quant_modules = [n for n, _ in layers if n != first_conv and n != head
                                      and not (head and n.startswith(head + "."))]
        self.non_negative_inputs: list[str] = []

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        blocks = getattr(self.model, "blocks", None)
        features: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _i, out: features.append(out))
                 for b in (blocks if isinstance(blocks, (nn.Sequential, nn.ModuleList)) else [])]
        try:
            x = self.model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        pooled = self.model.forward_head(x, pre_logits=True)  # (B, num_features)
        return pooled, features or [pooled]

    def forward_head(self, pooled: torch.Tensor, label: bool = False) -> torch.Tensor:
        if label:
            raise ValueError("forward_head(label=True): timm models have no second (label) head")
        return self.model.get_classifier()(pooled)
