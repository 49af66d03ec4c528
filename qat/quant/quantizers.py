"""LSQ / LSQ+ quantizer module and helpers to walk the quantizers of a model."""
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from qat.quant.functional import _levels, _normalized, _scale, level_range, lsq_fake_quant, lsq_layer

INITS = ("lsq", "minmax", "mse")
MSE_GRID = 2.0 ** torch.linspace(-6, 1, 57)  # candidate multiples of the LSQ init, 1/8-octave apart


class LSQQuantizer(nn.Module):
    """Fake quantizer x -> q * s (+ offset) with a learnable step s (LSQ) and optional offset (LSQ+).

    Args:
        bits: 1..8. Levels [qmin, qmax] follow reference §3.3; 1 bit signed is sign(x) * s.
        signed: signed or unsigned (non-negative) level set.
        symmetric: False adds one extra level (asym), without a zero point.
        per_channel: one step per slice along dim `ch_axis` (weights: 0), shaped (channels, 1, ..., 1).
        channels: number of channels when per_channel.
        ch_axis_ndim: ndim of the quantized tensor, giving the per-channel step its trailing 1s.
        ch_axis: the channel dim; negative counts from the end (layer inputs: -3 for (B, C, H, W),
            -1 for (..., C)), so the step broadcasts over any leading batch dims.
        learnable_offset: LSQ+ learnable offset, shaped like the step.
        init: how the step is set from the first tensor seen in train mode:
            'lsq' 2*mean|x|/sqrt(qmax); 'minmax' range / levels; 'mse' best multiple of the lsq init.
        eps: floor of the step used in the forward (`clamp_steps_` applies it to the parameter).

    The step, offset and the persistent `initialized` flag exist from construction, so the state_dict
    is fixed from birth and a loaded quantizer is never re-initialized.
    """

    def __init__(self, bits: int, signed: bool = True, symmetric: bool = True, per_channel: bool = False,
                 channels: int = 1, ch_axis_ndim: int = 2, learnable_offset: bool = False, init: str = "lsq",
                 eps: float = 1e-5, ch_axis: int = 0):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits={bits!r} is not supported: use an integer in 1..8")
        if init not in INITS:
            raise ValueError(f"init={init!r} is not supported; choose one of {list(INITS)}")
        self.bits, self.signed, self.symmetric, self.init, self.eps = bits, signed, symmetric, init, eps
        self.qmin, self.qmax = level_range(bits, signed, symmetric)
        self.binary = bits == 1 and signed
        self.per_channel, self.ch_axis = per_channel, ch_axis
        trailing = ch_axis_ndim - 1 - ch_axis if ch_axis >= 0 else -1 - ch_axis
        shape = (channels,) + (1,) * trailing if per_channel else (1,)
        self.step = nn.Parameter(torch.ones(shape))
        self.offset = nn.Parameter(torch.zeros(shape)) if learnable_offset else None
        self.register_buffer("initialized", torch.zeros(()))  # float: broadcastable by gloo/NCCL
        self.enabled = True
        self.compiled = False  # run the LSQ math as compiled kernels (qat.quant.kernels)
        self.name = ""  # fully qualified name, set by quantize_ (for error messages)
        self._initialized: bool | None = None  # cached flag; avoids a host sync per forward

    @classmethod
    def from_config(cls, cfg, signed: bool, **shape) -> "LSQQuantizer":
        """From a QuantizerConfig; `signed` is resolved by the caller, `shape` = channels / ch_axis_ndim / ch_axis."""
        return cls(cfg.bits, signed=signed, symmetric=cfg.symmetric, per_channel=cfg.per_channel,
                   learnable_offset=cfg.learnable_offset, init=cfg.init, eps=cfg.eps, **shape)

    @property
    def is_initialized(self) -> bool:
        if self._initialized is None:
            self._initialized = bool(self.initialized)
        return self._initialized

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized = None  # re-read the (possibly loaded) buffer on the next forward

    def _ready(self, x: torch.Tensor) -> None:
        """Initialise from `x` on the first train-mode call; refuse an uninitialised quantizer in eval mode."""
        if self.is_initialized:
            return
        if not self.training:
            raise RuntimeError(
                f"quantizer {self.name or '<unnamed>'} is not initialised and the model is in eval mode: "
                "run one forward pass in train mode on a training batch (calibration) or load a "
                "checkpoint that holds its step")
        self.initialize_(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._ready(x)
        return lsq_fake_quant(x, self.step, self.qmin, self.qmax, self.offset, self.binary, self.eps, self.compiled)

    def fusable(self) -> bool:
        """Whether a layer may apply this quantizer inside its own autograd function (`layer`): it is enabled
        and no hook observes its call (telemetry and the NaN guard hook it; then the layer calls it)."""
        return self.enabled and not (self._forward_hooks or self._forward_pre_hooks)

    def layer(self, op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """op.forward(self(x), weight, bias), keeping x but not self(x) for backward (`lsq_layer`)."""
        self._ready(x)
        return lsq_layer(op, x, weight, bias, self.step, self.qmin, self.qmax, self.offset, self.binary, self.eps,
                         self.compiled)

    @torch.no_grad()
    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """(x - offset) / max(step, eps) in float32, as the forward computes it."""
        offset = None if self.offset is None else self.offset.detach()
        return _normalized(x.detach(), _scale(self.step, self.eps), offset)

    @torch.no_grad()
    def levels(self, x: torch.Tensor) -> torch.Tensor:
        """The integer level (as float32) the forward gives each element of x."""
        return _levels(self.normalized(x), self.qmin, self.qmax, self.binary)

    @torch.no_grad()
    def initialize_(self, x: torch.Tensor) -> None:
        """Set step (and offset) from `x`, averaged over ranks when torch.distributed is initialized."""
        step, offset = self._init_values(x.detach().float())
        stats = torch.cat([step.flatten(), offset.flatten()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        step, offset = stats.view(2, -1)
        self.step.copy_(step.clamp_min(self.eps).view_as(self.step))
        if self.offset is not None:
            self.offset.copy_(offset.view_as(self.offset))
        self.initialized.fill_(1)
        self._initialized = True

    def _init_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.movedim(self.ch_axis, 0).flatten(1) if self.per_channel else x.reshape(1, -1)  # (channels, n)
        return self._init_rows(rows)

    def _init_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(step, offset) per row of `rows` (channels, n) by the `init` method."""
        zero = torch.zeros(len(rows), device=rows.device)
        step = 2 * rows.abs().mean(1) / self.qmax ** 0.5
        if self.init == "minmax":
            lo, hi = rows.amin(1), rows.amax(1)
            if self.offset is not None:  # levels span [min, max]; the lowest one sits on min
                step = (hi - lo) / (self.qmax - self.qmin)
                return step, lo - self.qmin * step.clamp_min(self.eps)
            step = hi.clamp_min(0) / self.qmax
            return (torch.maximum(step, lo.clamp_max(0) / self.qmin) if self.qmin < 0 else step), zero
        if self.init == "mse":
            step = self._mse_search(rows, step)
        return step, zero

    def _mse_search(self, rows: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Per row, the multiple of `step` from MSE_GRID with the smallest fake-quant MSE."""
        grid = step[None] * MSE_GRID.to(step.device)[:, None]  # (G, channels)
        errors = torch.stack([(lsq_fake_quant(rows, s[:, None].clamp_min(self.eps), self.qmin, self.qmax,
                                              binary=self.binary) - rows).square().mean(1) for s in grid])
        return grid.gather(0, errors.argmin(0, keepdim=True))[0]

    def has_finite_params(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in (self.step, self.offset) if p is not None)

    def extra_repr(self) -> str:
        parts = [f"bits={self.bits}", f"levels=[{self.qmin}, {self.qmax}]", f"signed={self.signed}",
                 f"symmetric={self.symmetric}", f"init={self.init!r}"]
        if self.per_channel:
            parts.append(f"per_channel={self.step.shape[0]}" + (f", ch_axis={self.ch_axis}" if self.ch_axis else ""))
        if self.offset is not None:
            parts.append("learnable_offset=True")
        if not self.enabled:
            parts.append("enabled=False")
        if self.compiled:
            parts.append("compiled=True")
        return ", ".join(parts)


def quantizers(model: nn.Module) -> Iterator[tuple[str, LSQQuantizer]]:
    """(name, quantizer) for every LSQQuantizer in `model`."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LSQQuantizer))


@contextmanager
def quantizers_off(model: nn.Module):
    """Eval mode, no grad, every quantizer disabled: the FP function of a quantized model."""
    qs = [q for _, q in quantizers(model)]
    states, was_training = [q.enabled for q in qs], model.training
    for q in qs:
        q.enabled = False
    try:
        with torch.no_grad():
            yield model.eval()
    finally:
        for q, enabled in zip(qs, states):
            q.enabled = enabled
        model.train(was_training)


def compile_quantizers(model: nn.Module) -> int:
    """Run every quantizer's LSQ math as compiled kernels (qat.quant.kernels); returns how many there are."""
    found = list(quantizers(model))
    for _, q in found:
        q.compiled = True
    return len(found)


@torch.no_grad()
def clamp_steps_(model: nn.Module) -> None:
    """Floor every step parameter at its eps; call after each optimizer step (reference §7.3)."""
    for _, q in quantizers(model):
        q.step.clamp_(min=q.eps)
