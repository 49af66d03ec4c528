"""CIFAR ResNets of He et al. 2016 ("Deep Residual Learning", §4.2): 6n+2 layers, stages of 16/32/64 channels.

Shortcuts are option A: identity, or stride-2 subsampling plus zero channel padding (no parameters).
"""
import torch
import torch.nn.functional as F
from torch import nn

from qat.models._registry import register_model
from qat.models.base import QatModel


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes  # channels to add on the shortcut, split over both sides
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]  # (B, C, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))  # (B, planes, H/s, W/s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(QatModel):
    """ResNet-(6n+2) for 32x32 inputs: conv 3x3 stem, three stages of n BasicBlocks, global pool, fc.

    Features (for distillation) are the three stage outputs (B, 16, 32, 32), (B, 32, 16, 16), (B, 64, 8, 8).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth={depth} is not a CIFAR ResNet depth; use 6n+2 (20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        # every conv but the stem; their inputs are post-ReLU
        self.default_quant_modules = ["layer*.*.conv1", "layer*.*.conv2"]
        self.non_negative_inputs = ["layer*.*.conv1", "layer*.*.conv2"]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), *[BasicBlock(planes, planes) for _ in range(n - 1)])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = F.relu(self.bn1(self.conv1(x)))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3):
            x = stage(x)
            features.append(x)
        return x.mean(dim=(2, 3)), features  # pooled: (B, 64)

    def forward_head(self, pooled: torch.Tensor, label: bool = False) -> torch.Tensor:
        if label:
            raise ValueError("forward_head(label=True): CIFAR ResNets have no second (label) head")
        return self.fc(pooled)


@register_model
def resnet20(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-20 (0.27M parameters)."""
    return CifarResNet(**{"depth": 20, "num_classes": num_classes, **kwargs})


@register_model
def resnet32(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-32 (0.46M parameters)."""
    return CifarResNet(**{"depth": 32, "num_classes": num_classes, **kwargs})


@register_model
def resnet44(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-44 (0.66M parameters)."""
    return CifarResNet(**{"depth": 44, "num_classes": num_classes, **kwargs})


@register_model
def resnet56(num_classes: int = 10, **kwargs) -> CifarResNet:
    """ResNet-56 (0.86M parameters)."""
    return CifarResNet(**{"depth": 56, "num_classes": num_classes, **kwargs})
