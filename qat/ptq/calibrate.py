"""`calibrate`: set every quantizer's step (and offset) of a quantized model from calibration batches.

Activation statistics come from the FP model (all quantizers off), collected by forward pre-hooks on the
activation quantizers: the exact per-row min / max and a bounded random sample of every tensor.
"""
import math
from collections.abc import Iterable

import torch
from torch import nn

from qat.ptq.observers import Observer, Stats, fake_quant
from qat.quant import LSQQuantizer, QuantLayerMixin, quantizers, quantizers_off
from qat.quant.calibrate import inputs_of
from qat.quant.groups import GroupQuantizer, assign_by_range

MAX_SAMPLES = 2**16  # samples kept per activation quantizer (split over its channels)


def rows_of(x: torch.Tensor, q: LSQQuantizer) -> torch.Tensor:
    """x as rows (C, n): one per channel of a per-channel quantizer, else a single row."""
    x = x.detach().float()
    return x.movedim(q.ch_axis, 0).flatten(1) if q.per_channel else x.reshape(1, -1)


class Collector:
    """Exact per-row range and a random sample of up to `budget` elements of the tensors a quantizer sees."""

    def __init__(self, q: LSQQuantizer, budget: int, batches: int, seed: int = 0):
        self.q, self.budget, self.batches = q, budget, batches
        self.gen = torch.Generator().manual_seed(seed)
        self.samples, self.lo, self.hi = [], None, None

    def __call__(self, module, args) -> None:
        rows = rows_of(args[0], self.q)
        lo, hi = rows.amin(1), rows.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        keep = math.ceil(self.budget / (len(rows) * self.batches))
        if rows.shape[1] > keep:
            rows = rows[:, torch.randint(rows.shape[1], (keep,), generator=self.gen).to(rows.device)]
        self.samples.append(rows)

    def stats(self) -> Stats:
        if self.lo is None:
            raise RuntimeError(f"quantizer {self.q.name} saw no data during calibration: is it on the forward path?")
        return Stats(torch.cat(self.samples, 1), self.lo, self.hi)


def weight_quantizers(model: nn.Module) -> dict[LSQQuantizer, nn.Module]:
    """{weight quantizer: its layer} for every quantized layer with an LSQ weight quantizer."""
    return {m.weight_quantizer: m for m in model.modules()
            if isinstance(m, QuantLayerMixin) and isinstance(m.weight_quantizer, LSQQuantizer)}


def collect_activations(model: nn.Module, batches: list, budget: int = MAX_SAMPLES) -> dict[LSQQuantizer, Stats]:
    """FP statistics of the input of every activation quantizer over `batches`."""
    weights = weight_quantizers(model)
    collectors = {q: Collector(q, budget, len(batches), seed=i)
                  for i, (_, q) in enumerate(quantizers(model)) if q not in weights}
    handles = [q.register_forward_pre_hook(c) for q, c in collectors.items()]
    try:
        with quantizers_off(model):
            for batch in batches:
                model(inputs_of(batch))
    finally:
        for h in handles:
            h.remove()
    return {q: c.stats() for q, c in collectors.items()}


@torch.no_grad()
def set_qparams_(q: LSQQuantizer, step: torch.Tensor, offset: torch.Tensor | None) -> None:
    """Write step (floored at the quantizer's eps) and offset into `q` and mark it initialised."""
    q.step.copy_(step.clamp_min(q.eps).view_as(q.step))
    if q.offset is not None:
        q.offset.copy_(offset.view_as(q.offset) if offset is not None else torch.zeros_like(q.offset))
    q.initialized.fill_(1)
    q._initialized = None


def observe_(q: LSQQuantizer, stats: Stats, observer: Observer) -> float:
    """Set `q` from `stats` with `observer`; returns the quantization MSE on the (sampled) data."""
    if q.binary:
        raise ValueError(f"quantizer {q.name}: 1-bit sign quantizers have no observer calibration; use >= 2 bits")
    if isinstance(q, GroupQuantizer):
        return observe_groups_(q, stats, observer)
    step, offset = observer(stats, q.qmin, q.qmax, q.offset is not None)
    set_qparams_(q, step, offset)
    s = q.step.detach().clamp_min(q.eps).reshape(-1, 1)
    off = None if q.offset is None else q.offset.detach().reshape(-1, 1)
    return float((fake_quant(stats.samples, s, off, q.qmin, q.qmax) - stats.samples).square().mean())


def observe_groups_(q: GroupQuantizer, stats: Stats, observer: Observer) -> float:
    """Set a GroupQuantizer from per-channel `stats`: the assignment by range (`assign_by_range` on max|x|), then
    each group's step (and offset) by `observer` over its channels' samples and range; returns the MSE."""
    q.assignment.copy_(assign_by_range(torch.maximum(stats.lo.abs(), stats.hi.abs()), q.groups))
    steps, offsets = [], []
    for g in range(q.groups):
        member = q.assignment == g
        group = Stats(stats.samples[member].reshape(1, -1), stats.lo[member].amin().view(1),
                      stats.hi[member].amax().view(1))
        step, offset = observer(group, q.qmin, q.qmax, q.offset is not None)
        steps.append(step)
        offsets.append(offset)
    set_qparams_(q, torch.cat(steps), None if q.offset is None else torch.cat(offsets))
    s = q.step.detach().clamp_min(q.eps)[q.assignment].reshape(-1, 1)
    off = None if q.offset is None else q.offset.detach()[q.assignment].reshape(-1, 1)
    return float((fake_quant(stats.samples, s, off, q.qmin, q.qmax) - stats.samples).square().mean())


def calibrate(model: nn.Module, batches: Iterable, weight_observer: Observer, act_observer: Observer | None = None,
              max_samples: int = MAX_SAMPLES) -> dict[str, float]:
    """Set every quantizer of `model` from data; returns {quantizer name: quantization MSE}.

    Weight quantizers observe their layer's weight; activation quantizers (layer inputs, attention
    points) observe FP statistics of their input over `batches` (tensors or (images, labels) pairs).
    """
    act_observer = act_observer or weight_observer
    batches = list(batches)
    report = {}
    for q, layer in weight_quantizers(model).items():
        report[q.name] = observe_(q, Stats.of(rows_of(layer.weight, q)), weight_observer)
    if batches:
        for q, stats in collect_activations(model, batches, max_samples).items():
            report[q.name] = observe_(q, stats, act_observer)
    return report
