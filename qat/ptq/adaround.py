"""AdaRound (Nagel et al. 2020): learn to round each weight down or up instead of to nearest.

The rounding offset is the rectified sigmoid h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1),
alpha initialised so h = W / s - floor(W / s); the regulariser sum(1 - |2h - 1|^beta) pushes every h to 0 or
1 while beta is annealed (`BetaSchedule`). The hard rounding is h >= 0.5, i.e. alpha >= 0. The layer that
uses it is `qat.ptq.recon_weight.ReconWeight`.
"""
import torch

ZETA, GAMMA = 1.1, -0.1


def alpha_init(rest: torch.Tensor) -> torch.Tensor:
    """alpha with h(alpha) = rest (the fractional part, in [0, 1))."""
    rest = rest.clamp(0, 1 - 1e-6)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """h(alpha) in [0, 1]."""
    return (torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): zero once every h is 0 or 1."""
    return (1 - (2 * rectified_sigmoid(alpha) - 1).abs().pow(beta)).sum()


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
