"""The BatchNorm-statistic loss of ZeroQ / GDFQ: batch mean and std at every BN input vs its running statistics."""
import torch
from torch import nn


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BNStatLoss:
    """Context manager hooking every BatchNorm of `model`; `loss()` after a forward is
    sum over BNs of ||mean_batch - running_mean||_2 + ||std_batch - sqrt(running_var)||_2 (ZeroQ, eq. 2).

    Statistics are over all but the channel dimension (N, H, W for BatchNorm2d; token BN: N, tokens).
    """

    def __init__(self, model: nn.Module):
        self.bns = batchnorms(model)
        if not self.bns:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layer, so no BN statistics to match")
        self.terms: list[torch.Tensor] = []
        self.handles = []

    def _hook(self, bn, inputs, output) -> None:
        x = inputs[0]
        if x.ndim == 3:  # TokenBatchNorm: (B, N, C) is transposed inside; statistics over B and N
            x = x.transpose(1, 2)
        dims = [d for d in range(x.ndim) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        self.terms.append(torch.linalg.vector_norm(mean - bn.running_mean)
                          + torch.linalg.vector_norm((var + bn.eps).sqrt() - (bn.running_var + bn.eps).sqrt()))

    def __enter__(self) -> "BNStatLoss":
        self.handles = [bn.register_forward_hook(self._hook) for bn in self.bns]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def loss(self) -> torch.Tensor:
        """The summed loss of the forwards since the last call (then cleared)."""
        total, self.terms = torch.stack(self.terms).sum(), []
        return total


@torch.no_grad()
def bn_stat_loss(model: nn.Module, x: torch.Tensor) -> float:
    """The BN-statistic loss of one batch (eval mode, no gradients)."""
    was = model.training
    with BNStatLoss(model.eval()) as hooks:
        model(x)
        value = hooks.loss().item()
    model.train(was)
    return value
