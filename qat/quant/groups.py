"""Group-wise activation quantization (IGQ-ViT style): the C channels of a post-LayerNorm input (or the heads of
the softmax output of an attention, quant.attn) share G steps.

Which inputs (`post_norm_linears`), one structural rule for our ViT-Lite / CCT and timm's ViT, DeiT and Swin:
in any module with a LayerNorm child `n` and a sibling `c` for a pair (n, c) of NORM_PAIRS, the first Linear of
`c` (`c` itself if it is one) reads the LayerNorm output. Ours: pre_norm -> self_attn.qkv, norm1 -> linear1;
timm: norm1 -> attn.qkv, norm2 -> mlp.fc1, Swin's patch merging norm -> reduction.
"""
import torch
import torch.distributed as dist
from torch import nn

from qat.quant.functional import lsq_fake_quant
from qat.quant.quantizers import LSQQuantizer

NORM_PAIRS = (("pre_norm", "self_attn"), ("norm1", "linear1"), ("norm1", "attn"), ("norm2", "mlp"),
              ("norm", "reduction"))


def post_norm_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers whose input is a LayerNorm output (NORM_PAIRS rule), in module order."""
    found = set()
    for prefix, module in model.named_modules():
        children = dict(module.named_children())
        for norm, consumer in NORM_PAIRS:
            if isinstance(children.get(norm), nn.LayerNorm) and consumer in children:
                first = next((n for n, m in children[consumer].named_modules() if isinstance(m, nn.Linear)), None)
                if first is not None:
                    found.add(".".join(p for p in (prefix, consumer, first) if p))
    return [n for n, _ in model.named_modules() if n in found]


def assign_by_range(absmax: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel -> group (C,) long: channels ranked by max|x| (stable), rank r in group r * groups // C, so the
    groups have equal sizes (+-1) and group 0 holds the smallest ranges."""
    order = absmax.argsort(stable=True)
    assignment = torch.empty_like(order)
    assignment[order] = torch.arange(len(order), device=order.device) * groups // len(order)
    return assignment


class GroupQuantizer(LSQQuantizer):
    """LSQ fake quantizer whose channel c (dim `ch_axis` < 0: -1 for (..., C) layer inputs, -3 for the heads of
    (B, h, N, N) attention probabilities) uses step[assignment[c]] (and offset).

    State, fixed from construction: step (G,), offset (G,) with LSQ+, assignment (C,) long, initialized.
    The assignment is set with the steps (calibration, or the first train-mode batch) from per-channel
    ranges (`assign_by_range`). With `dynamic`, every input instance (index along dim 0) re-assigns its
    channels at run time: channel c takes the group whose step is closest to the step its range in that
    instance needs, max(max(x, 0) / qmax, min(x, 0) / qmin); `assignment` then only records calibration.
    """

    def __init__(self, bits: int, channels: int, groups: int, dynamic: bool = False, signed: bool = True,
                 symmetric: bool = True, learnable_offset: bool = False, init: str = "lsq", eps: float = 1e-5,
                 ch_axis: int = -1):
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= channels:
            raise ValueError(f"quant.n_groups={groups!r}: use an integer in 1..{channels} (the layer's input "
                             "channels) or null")
        super().__init__(bits, signed=signed, symmetric=symmetric, learnable_offset=learnable_offset, init=init,
                         eps=eps)
        self.groups, self.dynamic = groups, dynamic
        self.per_channel, self.ch_axis = True, ch_axis  # statistics per channel (calibration), steps per group
        self.step = nn.Parameter(torch.ones(groups))
        self.offset = nn.Parameter(torch.zeros(groups)) if learnable_offset else None
        self.register_buffer("assignment", torch.arange(channels) * groups // channels)

    @classmethod
    def from_config(cls, cfg, signed: bool, channels: int, groups: int, dynamic: bool = False,
                    ch_axis: int = -1) -> "GroupQuantizer":
        """From a QuantizerConfig or AttnQuantConfig (per_channel, where there is one, is replaced by the groups)."""
        return cls(cfg.bits, channels, groups, dynamic, signed=signed, symmetric=cfg.symmetric,
                   learnable_offset=getattr(cfg, "learnable_offset", False), init=getattr(cfg, "init", "lsq"),
                   eps=cfg.eps, ch_axis=ch_axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}, channels={len(self.assignment)}, dynamic={self.dynamic}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._ready(x)
        step, offset = self.channel_params(x)
        return lsq_fake_quant(x, step, self.qmin, self.qmax, offset, self.binary, self.eps, self.compiled)

    def fusable(self) -> bool:
        return False  # the layer calls forward (per-channel steps gathered from the groups)

    def channel_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(step, offset) per channel (C,), or per instance and channel (B, 1, ..., C) when dynamic."""
        index = self.instance_assignment(x) if self.dynamic else self.assignment
        index = index.view(*index.shape, *(1,) * (-1 - self.ch_axis))  # broadcast along the dims after ch_axis
        return self.step[index], None if self.offset is None else self.offset[index]

    def instance_assignment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, ..., C) long (C at ch_axis, ones after it left to `channel_params`): per instance, the group
        whose step is closest to each channel's need."""
        channels = x.shape[self.ch_axis]
        rows = x.detach().movedim(self.ch_axis, -1).reshape(x.shape[0], -1, channels)
        need = rows.amax(1).clamp_min(0) / self.qmax
        if self.qmin < 0:
            need = torch.maximum(need, rows.amin(1).clamp_max(0) / self.qmin)
        index = (need[..., None] - self.step.detach().clamp_min(self.eps)).abs().argmin(-1)  # (B, C)
        return index.view(x.shape[0], *(1,) * (x.ndim + self.ch_axis - 1), channels)

    def _init_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The assignment from x's per-channel ranges, then each group's init (`init`) over its channels."""
        rows = x.movedim(self.ch_axis, 0).flatten(1)  # (C, n)
        self.assignment.copy_(assign_by_range(rows.abs().amax(1), self.groups))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.assignment, 0)  # one grouping on every rank (the steps are then averaged)
        pairs = [self._init_rows(rows[self.assignment == g].reshape(1, -1)) for g in range(self.groups)]
        return torch.cat([s for s, _ in pairs]), torch.cat([o for _, o in pairs])
