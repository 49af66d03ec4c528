"""DFQ (Nagel et al. 2019) cross-layer equalization and bias absorption, as function-preserving transforms.

Cross-layer equalization: for `first` -> ReLU -> `second`, ReLU(x / s) = ReLU(x) / s for s > 0, so dividing output
channel i of `first` (weights and bias) by s_i and multiplying input channel i of `second` by s_i keeps the function.
s_i = sqrt(r1_i / r2_i), with r1_i = max|W1[i]| and r2_i = max|W2[:, i]|, makes both ranges sqrt(r1_i * r2_i).
Layers in two links (the second of one, the first of the next) are rescaled alternately, so passes repeat until
no scale moves by more than `tol`.

Rule for GELU / LayerNorm blocks: GELU(s * x) != s * GELU(x), so links through GELU are skipped (one log line
naming them) and a model with no ReLU link at all is refused with a ValueError (ViTs: `model.use_relu=true`
gives ReLU MLPs that equalize). LayerNorm is never crossed: it is not a pass-through, so no link spans it.
Links whose intermediate tensor has other consumers (residual branches) are skipped: scaling would change them.
"""
import logging

import torch
from torch import nn

from qat.datafree.fold import OutputStats
from qat.datafree.graph import Link, find_links

log = logging.getLogger(__name__)

HOMOGENEOUS = ("relu",)  # activations with act(s * x) = s * act(x) for s > 0


def _in_channel_view(w: torch.Tensor) -> torch.Tensor:
    """(in, out * k) view of a second layer's weight: one row per input channel."""
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def channel_ranges(model: nn.Module, link: Link) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2): per-channel max |weight| of `first`'s output channels and `second`'s input channels."""
    w1, w2 = model.get_submodule(link.first).weight, model.get_submodule(link.second).weight
    return w1.detach().abs().flatten(1).amax(1), _in_channel_view(w2.detach().abs()).amax(1)


def equalizable_links(model: nn.Module) -> list[Link]:
    """The links CLE rescales; logs the skipped ones and refuses a model with none."""
    links = find_links(model)
    ok = [lk for lk in links if lk.act in HOMOGENEOUS and lk.exclusive and _plain(model, lk)]
    skipped = [f"{lk.first}->{lk.act}->{lk.second}" for lk in links if lk not in ok]
    if skipped:
        log.info("cle: skipped %d links (not ReLU, shared tensors or grouped convs): %s", len(skipped),
                 skipped)
    if not ok:
        raise ValueError(f"cle: {type(model).__name__} has no conv/linear -> ReLU -> conv/linear pair to equalize "
                         "(GELU is not positively homogeneous; for ViTs use model.use_relu=true, or drop ptq.cle)")
    return ok


def _plain(model: nn.Module, link: Link) -> bool:
    first, second = model.get_submodule(link.first), model.get_submodule(link.second)
    ungrouped = all(getattr(m, "groups", 1) == 1 for m in (first, second))
    return ungrouped and first.weight.shape[0] == second.weight.shape[1]


@torch.no_grad()
def _rescale_(model: nn.Module, link: Link, s: torch.Tensor, stats: dict[str, OutputStats] | None) -> None:
    first, second = model.get_submodule(link.first), model.get_submodule(link.second)
    first.weight.div_(s.view(-1, *[1] * (first.weight.ndim - 1)))
    if first.bias is not None:
        first.bias.div_(s)
    second.weight.mul_(s.view(1, -1, *[1] * (second.weight.ndim - 2)))
    if stats is not None and link.first in stats:
        st = stats[link.first]
        st.mean, st.std = st.mean / s, st.std / s


@torch.no_grad()
def cross_layer_equalize_(model: nn.Module, stats: dict[str, OutputStats] | None = None, max_iters: int = 100,
                          tol: float = 1e-6) -> list[Link]:
    """Equalize every ReLU link of `model` (BatchNorm folded first: `fold_bn_`) in place; returns the links.

    `stats` (from `fold_bn_`) are rescaled along with the weights so bias absorption / correction stay valid.
    """
    links = equalizable_links(model)
    for it in range(max_iters):
        worst = 0.0
        for link in links:
            r1, r2 = channel_ranges(model, link)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
            _rescale_(model, link, s, stats)
            worst = max(worst, (s.log().abs().max()).item())
        if worst < tol:
            break
    log.info("cle: equalized %d links in %d passes (last max |log s| %.2e)", len(links), it + 1, worst)
    return links


@torch.no_grad()
def absorb_bias_(model: nn.Module, stats: dict[str, OutputStats], links: list[Link] | None = None,
                 n_std: float = 3.0) -> dict[str, torch.Tensor]:
    """DFQ bias absorption: move c = max(0, mean - n_std * std) of `first`'s output into `second`'s bias.

    ReLU(z - c) + c = ReLU(z) wherever z >= c (all but a fraction ~Phi(-n_std) of values under the Gaussian model),
    and W2 (h - c) + W2 c = W2 h. For a zero-padded conv `second` the border pixels see the padding, not h - c,
    so there the identity is approximate. Returns {first: c}; `stats` means are shifted by -c.
    """
    links = equalizable_links(model) if links is None else links
    absorbed = {}
    for link in links:
        if link.first not in stats:
            continue
        first, second = model.get_submodule(link.first), model.get_submodule(link.second)
        c = (stats[link.first].mean - n_std * stats[link.first].std).clamp_min(0)
        if first.bias is None or not c.any():
            continue
        if second.bias is None:
            second.bias = nn.Parameter(torch.zeros(second.weight.shape[0], device=c.device))
        first.bias.sub_(c)
        second.bias.add_(second.weight.flatten(2).sum(2) @ c if second.weight.ndim > 2 else second.weight @ c)
        stats[link.first].mean = stats[link.first].mean - c
        absorbed[link.first] = c
    log.info("bias absorption: %d links", len(absorbed))
    return absorbed
