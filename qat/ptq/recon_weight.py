"""The quantized layer of seed 003's general form during reconstruction, and its fold back into our format.

    y_hat = xi * sum(((floor(W / s_w) + h(alpha)) * s_w') * Q(x)) + b + eta     (adaround rounding)
    y_hat = xi * sum((round(W / s_w) * s_w') * Q(x)) + b + eta                  (nearest rounding)

`ReconWeight` replaces a layer's LSQ weight quantizer while a unit is reconstructed: it computes the weight
xi * (codes * s_w' + offset) (xi per output channel has the shape of the step: per channel with per-channel
weights, one scalar with per-tensor ones) and a forward hook adds eta to the layer output. s_w' is s_w itself
unless decoupled (`decoupled`, or `s_w_dq` learnt): then a tensor of its own, starting at s_w. Only what is
learnt gets gradients. `fold_` writes the hard codes into the weight, xi * s_w' (and xi * offset) into the LSQ
step (offset), eta into the bias, and puts the LSQ quantizer back: an ordinary quantized layer with the same
state_dict keys and no extra op (formula 9).
"""
import torch
from torch import nn

from qat.ptq.adaround import alpha_init, rectified_sigmoid
from qat.quant import LSQQuantizer

LEARNABLE = ("s_w", "s_w_dq", "s_x", "alpha", "xi", "eta", "b", "w")
ROUNDINGS = ("nearest", "adaround")
XI_MIN = 1e-3  # xi is kept >= this (and xi * s_w' >= the quantizer's eps) so the folded step stays positive


def _ste(v: torch.Tensor, fn) -> torch.Tensor:
    """fn(v) forward, identity gradient."""
    return v + (fn(v) - v).detach()


class ReconWeight(nn.Module):
    """A layer's weight in the general form, with the step / offset of its LSQ quantizer `q` as the start."""

    def __init__(self, q: LSQQuantizer, layer: nn.Module, rounding: str, learn: tuple[str, ...],
                 decoupled: bool = False):
        super().__init__()
        step = q.step.detach().clamp_min(q.eps)
        self.register_buffer("shift", torch.zeros_like(step) if q.offset is None else q.offset.detach().clone())
        self.s_w = nn.Parameter(step.clone(), requires_grad=False)
        self.s_dq = nn.Parameter(step.clone(), requires_grad=False) if decoupled or "s_w_dq" in learn else None
        self.xi = nn.Parameter(torch.ones_like(step), requires_grad=False) if "xi" in learn else None
        self.eta = nn.Parameter(torch.zeros(layer.weight.shape[0], device=step.device),
                                requires_grad=False) if "eta" in learn else None
        v = (layer.weight.detach() - self.shift) / step
        fixed_base = not ({"s_w", "w"} & set(learn))
        self.register_buffer("floor", v.floor() if rounding == "adaround" and fixed_base else None)
        self.alpha = nn.Parameter(alpha_init(v - v.floor()), requires_grad=False) if rounding == "adaround" else None
        self.qmin, self.qmax, self.eps, self.hard = q.qmin, q.qmax, q.eps, False
        self.quantizer = [q]  # the LSQ quantizer to restore; a list so it is not a submodule
        self.handle = layer.register_forward_hook(self._add_eta) if self.eta is not None else None

    def h(self) -> torch.Tensor:
        """The soft rounding offset in [0, 1] (adaround)."""
        return rectified_sigmoid(self.alpha)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes (soft while training with adaround), clamped to the quantizer's levels."""
        if self.alpha is None:
            v = ((weight - self.shift) / self.s_w).clamp(self.qmin, self.qmax)  # LSQ: clamp, then round
            return v.round() if self.hard else _ste(v, torch.round)
        floor = self.floor if self.floor is not None else _ste((weight - self.shift) / self.s_w, torch.floor)
        up = (self.alpha >= 0).to(floor.dtype) if self.hard else self.h()
        return (floor + up).clamp(self.qmin, self.qmax)

    def dq_step(self) -> torch.Tensor:
        """The step that turns codes back into weights, xi included: xi * s_w'."""
        step = self.s_w if self.s_dq is None else self.s_dq
        return step if self.xi is None else self.xi * step

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        xi = 1.0 if self.xi is None else self.xi
        return self.codes(weight) * self.dq_step() + xi * self.shift

    def _add_eta(self, layer, args, out):
        return out + (self.eta.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else self.eta)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the steps >= eps and xi >= max(XI_MIN, eps / s_w') (called after each optimizer step)."""
        for step in (self.s_w, self.s_dq):
            if step is not None:
                step.clamp_(min=self.eps)
        if self.xi is not None:
            base = self.s_w if self.s_dq is None else self.s_dq
            self.xi.copy_(torch.maximum(self.xi, (self.eps / base).clamp_min(XI_MIN)))


def attach_(layer: nn.Module, rounding: str = "adaround", learn: tuple[str, ...] = ("alpha",),
            decoupled: bool = False) -> ReconWeight:
    """Swap `layer.weight_quantizer` (an initialised LSQQuantizer) for a ReconWeight."""
    if "eta" in learn and layer.bias is None:
        raise ValueError("ptq.recon.learn has eta, which folds into the bias, but the layer has none: quantize with "
                         "QuantConfig(add_bias=True) (ptq.py does) or drop eta")
    rw = ReconWeight(layer.weight_quantizer, layer, rounding, learn, decoupled)
    layer.weight_quantizer = rw
    return rw


@torch.no_grad()
def fold_(layer: nn.Module) -> None:
    """Hard codes into the weight, xi * s_w' into the step, xi * offset into the offset, eta into the bias;
    restores the LSQ quantizer, which reads back the same codes."""
    rw = layer.weight_quantizer
    rw.hard = True
    codes, step = rw.codes(layer.weight), rw.dq_step()
    shift = rw.shift if rw.xi is None else rw.xi * rw.shift
    q = rw.quantizer[0]
    q.step.copy_(step)
    if q.offset is not None:
        q.offset.copy_(shift)
    layer.weight.copy_(codes * step + shift)
    if rw.eta is not None:
        layer.bias.add_(rw.eta)
        rw.handle.remove()
    layer.weight_quantizer = q
