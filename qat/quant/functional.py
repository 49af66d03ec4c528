"""Quantizer math: integer ranges, straight-through ops and the fused LSQ fake-quant (reference §3.3-3.4).

The STE ops are written as `forward_value + (y - y.detach())`, so the forward value is exact and the
gradient is that of `y`.
"""
import math

import torch
from torch.autograd.function import once_differentiable


def level_range(bits: int, signed: bool, symmetric: bool) -> tuple[int, int]:
    """Integer range [qmin, qmax] of a quantizer (reference §3.3; 1-bit signed is sign: {-1, +1}).

    >>> [level_range(2, s, sym) for s in (True, False) for sym in (True, False)]
    [(-1, 1), (-2, 1), (0, 2), (0, 3)]
    >>> level_range(1, True, True), level_range(1, False, True)
    ((-1, 1), (0, 1))
    """
    if bits == 1:
        return (-1, 1) if signed else (0, 1)
    if signed:
        half = 2 ** (bits - 1)
        return (-(half - 1), half - 1) if symmetric else (-half, half - 1)
    return 0, (2**bits - 2 if symmetric else 2**bits - 1)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even); gradient 1.

    >>> x = torch.tensor([0.3, 1.7, -2.6], requires_grad=True)
    >>> y = round_ste(x); y.sum().backward()
    >>> y.detach(), x.grad
    (tensor([ 0.,  2., -3.]), tensor([1., 1., 1.]))
    """
    return x.detach().round() + (x - x.detach())


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity whose gradient is multiplied by `scale`.

    >>> x = torch.tensor([2.0], requires_grad=True)
    >>> y = grad_scale(x, 0.25); y.backward()
    >>> y.detach(), x.grad
    (tensor([2.]), tensor([0.2500]))
    """
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def clamp_min_ste(x: torch.Tensor, min_value: float) -> torch.Tensor:
    """max(x, min_value) in the forward; gradient 1 everywhere (the step floor of §3.4).

    >>> x = torch.tensor([-0.5, 0.5], requires_grad=True)
    >>> y = clamp_min_ste(x, 0.1); y.sum().backward()
    >>> y.detach(), x.grad
    (tensor([0.1000, 0.5000]), tensor([1., 1.]))
    """
    return x.detach().clamp_min(min_value) + (x - x.detach())


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1; gradient 1 where |x| <= 1, else 0 (1-bit signed quantizer).

    >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    >>> y = sign_ste(x); y.sum().backward()
    >>> y.detach(), x.grad
    (tensor([-1., -1.,  1.,  1.,  1.]), tensor([0., 1., 1., 1., 0.]))
    """
    inner = x.clamp(-1, 1)
    return torch.where(x.detach() >= 0, 1.0, -1.0).to(x.dtype) + (inner - inner.detach())


def lsq_reference(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, offset: torch.Tensor | None = None,
                  binary: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """Textbook LSQ(+) built from the STE ops, float32 arithmetic; `lsq_fake_quant` must match it."""
    g = 1.0 / math.sqrt(qmax * x.numel())
    s = grad_scale(clamp_min_ste(step.float(), eps), g)
    v = x.float()
    if offset is not None:
        b = grad_scale(offset.float(), g)
        v = v - b
    v = v / s
    q = sign_ste(v) if binary else round_ste(v.clamp(qmin, qmax))
    out = q * s
    if offset is not None:
        out = out + b
    return out.to(x.dtype)


def _normalized(x: torch.Tensor, s: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """v = (x - offset) / s as a new float32 tensor (`s` has >= 1 dim, so half inputs promote)."""
    v = x.sub(offset.float()) if offset is not None else x.div(s)
    if v.dtype != torch.float32:
        v = v.float()
    return v.div_(s) if offset is not None else v


def _open_bounds(qmin: int, qmax: int) -> tuple[float, float]:
    """float32 numbers just outside [qmin, qmax] (qmin <= 0 < qmax): v is in [qmin, qmax] iff lo < v < hi.

    The next float32 away from zero; for 0 the smallest normal float, so flush-to-zero cannot turn the
    bound into 0 (it only counts negative denormal v as inside, which changes nothing measurable).
    """
    def beyond(q: int, direction: int) -> float:
        return direction * (abs(q) + 2.0 ** (math.frexp(abs(q))[1] - 24) if q else 2.0**-126)
    return beyond(qmin, -1), beyond(qmax, 1)


def _where_inside(grad: torch.Tensor, v: torch.Tensor, bounds: tuple[float, float], out=None) -> torch.Tensor:
    """grad where qmin <= v <= qmax, else 0: one vectorised float pass (bool masks are slow on CPU)."""
    if out is None:
        return torch.ops.aten.hardtanh_backward(grad, v, *bounds)
    return torch.ops.aten.hardtanh_backward.grad_input(grad, v, *bounds, grad_input=out)


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum(a * b) reduced to `shape` (overwrites `a`); a single dot product when it reduces to one value."""
    if shape.numel() == 1 and a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1)).reshape(shape)
    return a.mul_(b).sum_to_size(shape)


class LSQFakeQuant(torch.autograd.Function):
    """Fused LSQ(+) fake quantization: saves only its inputs, one float32 buffer in forward; backward
    recomputes v from x and uses only float passes (about 7 over the tensor, no bool masks).

    Gradients (inside = qmin <= v <= qmax, q = the integer level, g = 1/sqrt(qmax * numel(x))):
    dx = grad * inside; dstep = g * sum(grad * (q - v * inside)); doffset = g * sum(grad * (1 - inside)),
    sums over the dims the step (offset) is broadcast along.
    """

    @staticmethod
    def forward(ctx, x, step, offset, qmin: int, qmax: int, binary: bool, eps: float):
        s = step.detach().float().clamp_min(eps).reshape(step.shape or (1,))
        v = _normalized(x, s, offset)
        if binary:
            v.ge_(0).mul_(2 * s).sub_(s)  # (v >= 0) * 2s - s = +-s
        else:
            v.clamp_(qmin, qmax).round_().mul_(s)
        if offset is not None:
            v.add_(offset.float())
        ctx.save_for_backward(x, step, offset)
        ctx.qrange = (qmin, qmax, binary, eps)
        ctx.gscale = 1.0 / math.sqrt(qmax * x.numel())
        return v.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, step, offset = ctx.saved_tensors
        qmin, qmax, binary, eps = ctx.qrange
        bounds = _open_bounds(qmin, qmax)
        s = step.float().clamp_min(eps).reshape(step.shape or (1,))
        v = _normalized(x, s, offset)
        grad = grad.float()
        need_dx, need_dstep, need_doffset = ctx.needs_input_grad[:3]
        dx = _where_inside(grad, v, bounds) if need_dx or (offset is not None and need_doffset) else None
        dstep = doffset = None
        if need_dstep:
            q = v.ge(0).float().mul_(2).sub_(1) if binary else v.clamp(qmin, qmax).round_()
            q.sub_(_where_inside(v, v, bounds, out=v))  # q - v * inside (v is not needed afterwards)
            dstep = (_sum_of_products(q, grad, s.shape) * ctx.gscale).reshape(step.shape).to(step.dtype)
        if offset is not None and need_doffset:
            doffset = ((grad - dx).sum_to_size(offset.shape) * ctx.gscale).to(offset.dtype)
        return (dx.to(x.dtype) if need_dx else None), dstep, doffset, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, offset: torch.Tensor | None = None,
                   binary: bool = False, eps: float = 1e-5) -> torch.Tensor:
    """LSQ(+) fake quantization of `x`: q * max(step, eps) + offset with q in [qmin, qmax] (sign if `binary`).

    `step`/`offset` are (1,) per tensor or (C, 1, ...) per channel; the result has x's dtype.

    >>> x = torch.tensor([-1.0, -0.2, 0.1, 0.35, 1.5], requires_grad=True)
    >>> s = torch.tensor([0.5], requires_grad=True)
    >>> y = lsq_fake_quant(x, s, -1, 1); y.sum().backward()
    >>> y.detach(), x.grad, s.grad  # ds = (-1 + 0.4 - 0.2 + 0.3 + 1) / sqrt(1 * 5)
    (tensor([-0.5000, -0.0000,  0.0000,  0.5000,  0.5000]), tensor([0., 1., 1., 1., 0.]), tensor([0.2236]))
    """
    return LSQFakeQuant.apply(x, step, offset, qmin, qmax, binary, eps)
