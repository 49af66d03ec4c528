"""AdaRound (Nagel et al. 2020): learn to round each weight down or up instead of to nearest.

During reconstruction a layer's weight quantizer is replaced by `AdaRoundWeight`, which computes
s * clamp(floor(W / s) + h(alpha), qmin, qmax) + offset with the rectified sigmoid
h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1), alpha initialised so h = W / s - floor(W / s).
At the end `bake_` writes the hard rounding (h >= 0.5, i.e. alpha >= 0) into the weight and restores the LSQ
quantizer: the result is an ordinary quantized model whose codes are floor or ceil of W / s.
"""
import torch
from torch import nn

from qat.quant import LSQQuantizer

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """Soft (or hard) rounding of one layer's weight with the fixed step / offset of its quantizer `q`."""

    def __init__(self, q: LSQQuantizer, weight: torch.Tensor):
        super().__init__()
        step = q.step.detach().clamp_min(q.eps)
        offset = torch.zeros_like(step) if q.offset is None else q.offset.detach()
        v = (weight.detach() - offset) / step
        floor = v.floor()
        rest = (v - floor).clamp(0, 1 - 1e-6)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", step)
        self.register_buffer("shift", offset)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.qmin, self.qmax, self.hard = q.qmin, q.qmax, False
        self.quantizer = [q]  # the LSQ quantizer to restore; a list so it is not a submodule

    def h(self) -> torch.Tensor:
        """The rectified sigmoid in [0, 1]."""
        return (torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The rounded weight (the float weight's floor is cached: `weight` is not read)."""
        up = (self.alpha >= 0).to(self.floor.dtype) if self.hard else self.h()
        return (self.floor + up).clamp(self.qmin, self.qmax) * self.scale + self.shift

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero once every h is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def attach_(layer: nn.Module) -> AdaRoundWeight:
    """Swap `layer.weight_quantizer` for an AdaRoundWeight (its step and offset must be set)."""
    ada = AdaRoundWeight(layer.weight_quantizer, layer.weight)
    layer.weight_quantizer = ada
    return ada


@torch.no_grad()
def bake_(layer: nn.Module) -> None:
    """Write the hard rounding into the weight and put the LSQ quantizer back (its codes: floor or ceil)."""
    ada = layer.weight_quantizer
    ada.hard = True
    layer.weight.copy_(ada(layer.weight))
    layer.weight_quantizer = ada.quantizer[0]


class BetaSchedule:
    """AdaRound's regulariser schedule: off during `warmup` (a fraction of `iters`), then beta decays
    linearly from `start` to `end`."""

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
        self.iters, self.warm, self.start, self.end = iters, int(warmup * iters), start, end

    def __call__(self, it: int) -> float | None:
        """beta at iteration `it`, None during warm-up."""
        if it < self.warm:
            return None
        t = (it - self.warm) / max(1, self.iters - self.warm)
        return self.end + (self.start - self.end) * max(0.0, 1 - t)
