"""Observers: statistics of a tensor -> (step, offset) of a quantizer with levels [qmin, qmax].

An observer never owns tensors. It is called with `Stats` (samples as rows (C, n), one row per channel or
a single row per tensor, and the exact per-row min / max) and returns steps (C,) and offsets (C,) or None.
Without an offset the levels are q * step (zero is exact); with an offset (LSQ+) they are q * step + offset.
"""
import math
from dataclasses import dataclass

import torch

CHUNK = 2**24  # elements of candidate x sample tensors evaluated at once by the searches

# ACIQ (Banner et al. 2019) optimal clipping alpha for 2..8 bits: Laplace in units of b, Gaussian of sigma
ACIQ_LAPLACE = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89}
ACIQ_GAUSS = {2: 1.710635, 3: 2.151593, 4: 2.559136, 5: 2.936201, 6: 3.286914, 7: 3.615114, 8: 3.924035}


@dataclass
class Stats:
    """Samples (C, n) of a tensor and its exact per-row range lo, hi (C,)."""
    samples: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor) -> "Stats":
        rows = rows.detach().float()
        return cls(rows, rows.amin(1), rows.amax(1))


def bits_of(qmin: int, qmax: int) -> int:
    """Bit width of a level range."""
    return math.ceil(math.log2(qmax - qmin + 1))


def range_to_qparams(lo, hi, qmin: int, qmax: int, with_offset: bool, eps: float = 1e-8):
    """(step, offset) whose levels cover [lo, hi]: with an offset the lowest level sits on lo; without
    one the levels are symmetric multiples of the step and the larger side of the range decides it."""
    if with_offset:
        step = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
        return step, lo - qmin * step
    step = hi.clamp_min(0) / qmax
    if qmin < 0:
        step = torch.maximum(step, lo.clamp_max(0) / qmin)
    return step.clamp_min(eps), None


def fake_quant(x, step, offset, qmin: int, qmax: int):
    """Levels as the LSQ quantizer computes them: clamp((x - offset) / step) rounded, times step, + offset."""
    v = x if offset is None else x - offset
    out = (v / step).clamp(qmin, qmax).round() * step
    return out if offset is None else out + offset


class Observer:
    """Base: `clip(stats, qmin, qmax)` gives the per-row range to cover; subclasses define it."""

    name = ""

    def __call__(self, stats: Stats, qmin: int, qmax: int, with_offset: bool):
        lo, hi = self.clip(stats, qmin, qmax, with_offset)
        return range_to_qparams(lo, hi, qmin, qmax, with_offset)

    def clip(self, stats: Stats, qmin: int, qmax: int, with_offset: bool):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}({args})"


class MinMax(Observer):
    """The exact range of the data."""

    name = "minmax"

    def clip(self, stats, qmin, qmax, with_offset):
        return stats.lo, stats.hi


class Percentile(Observer):
    """The [100 - q, q] percentiles of the samples per row (q = 99.99 by default)."""

    name = "percentile"

    def __init__(self, q: float = 99.99):
        if not 50 < q <= 100:
            raise ValueError(f"ptq.observer.q={q!r}: the percentile must be in (50, 100]")
        self.q = q

    def clip(self, stats, qmin, qmax, with_offset):
        x = stats.samples
        k_hi = max(1, min(x.shape[1], round(self.q / 100 * x.shape[1])))
        hi = x.kthvalue(k_hi, dim=1).values
        return x.kthvalue(x.shape[1] + 1 - k_hi, dim=1).values, hi


class ACIQ(Observer):
    """Analytic clipping (ACIQ): mean +- alpha(bits) * b, b the Laplace scale mean|x - mean| (or sigma for
    `dist='gauss'`), capped at the data range."""

    name = "aciq"

    def __init__(self, dist: str = "laplace"):
        if dist not in ("laplace", "gauss"):
            raise ValueError(f"ptq.observer.dist={dist!r}: choose 'laplace' or 'gauss'")
        self.dist = dist

    def alpha(self, stats: Stats, bits: int) -> torch.Tensor:
        """The clipping half-width alpha(bits) * b per row."""
        if bits not in ACIQ_LAPLACE:
            raise ValueError(f"aciq has constants for 2..8 bits, not {bits}")
        x = stats.samples
        mean = x.mean(1, keepdim=True)
        if self.dist == "laplace":
            return ACIQ_LAPLACE[bits] * (x - mean).abs().mean(1)
        return ACIQ_GAUSS[bits] * x.std(1, correction=0)

    def clip(self, stats, qmin, qmax, with_offset):
        mean = stats.samples.mean(1)
        alpha = self.alpha(stats, bits_of(qmin, qmax))
        return torch.maximum(mean - alpha, stats.lo), torch.minimum(mean + alpha, stats.hi)


class MSE(Observer):
    """The range fraction (of `grid` candidates i / grid of the min/max range) with the smallest Lp error
    |Q(x) - x|^p on the samples (p = 2 by default; 2.4 is the other common choice). Vectorised over rows and
    candidates, in chunks of at most CHUNK elements."""

    name = "mse"

    def __init__(self, p: float = 2.0, grid: int = 100):
        if p <= 0 or grid < 1:
            raise ValueError(f"ptq.observer: p={p!r} and grid={grid!r} must be positive")
        self.p, self.grid = p, grid

    def fractions(self) -> torch.Tensor:
        return torch.arange(1, self.grid + 1, dtype=torch.float32) / self.grid

    def clip(self, stats, qmin, qmax, with_offset):
        x = stats.samples
        fracs = self.fractions().to(x.device)[:, None]  # (G, 1)
        lo, hi = stats.lo[None] * fracs, stats.hi[None] * fracs  # (G, C)
        errors = torch.cat([self._errors(x, lo[i:i + n], hi[i:i + n], qmin, qmax, with_offset)
                            for i, n in _chunks(len(fracs), max(1, CHUNK // x.numel()))])
        best = errors.argmin(0, keepdim=True)  # (1, C)
        return lo.gather(0, best)[0], hi.gather(0, best)[0]

    def _errors(self, x, lo, hi, qmin, qmax, with_offset):
        """Mean |Q(x) - x|^p per (candidate, row), in place on one (G, C, n) buffer."""
        step, offset = range_to_qparams(lo, hi, qmin, qmax, with_offset)
        step = step[..., None]
        v = x[None] / step if offset is None else (x[None] - offset[..., None]).div_(step)
        v.clamp_(qmin, qmax).round_().mul_(step)
        if offset is not None:
            v.add_(offset[..., None])
        v.sub_(x)
        return (v.square_() if self.p == 2 else v.abs_().pow_(self.p)).mean(-1)


class OMSE(MSE):
    """OMSE as in FQ-ViT: the L2-optimal of 90 shrink factors 1, 0.99, ..., 0.11 of the min/max range."""

    name = "omse"

    def __init__(self):
        super().__init__(p=2.0, grid=90)

    def fractions(self) -> torch.Tensor:
        return 1 - 0.01 * torch.arange(self.grid, dtype=torch.float32)

    def __repr__(self) -> str:
        return "omse()"


def _chunks(total: int, size: int):
    return ((i, min(size, total - i)) for i in range(0, total, size))


OBSERVERS = {cls.name: cls for cls in (MinMax, MSE, Percentile, ACIQ, OMSE)}


def create_observer(name: str, **kwargs) -> Observer:
    """An observer by name: minmax | mse (p, grid) | percentile (q) | aciq (dist) | omse."""
    if name not in OBSERVERS:
        raise ValueError(f"ptq.observer={name!r} is not an observer; choose one of {sorted(OBSERVERS)}")
    try:
        return OBSERVERS[name](**kwargs)
    except TypeError:
        raise ValueError(f"ptq.observer={name!r} got arguments {sorted(kwargs)}; "
                         f"it takes {list(OBSERVERS[name].__init__.__code__.co_varnames[1:])}") from None
