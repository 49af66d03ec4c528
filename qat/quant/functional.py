"""Quantizer math: integer ranges, straight-through ops and the fused LSQ fake-quant (reference §3.3-3.4).

The STE ops are written as `forward_value + (y - y.detach())`, so the forward value is exact and the
gradient is that of `y`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from qat.quant import kernels


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


def _scale(step: torch.Tensor, eps: float) -> torch.Tensor:
    """The step floored at eps, float32, at least 1-D (so half inputs promote against it)."""
    return step.detach().float().clamp_min(eps).reshape(step.shape or (1,))


def _normalized(x: torch.Tensor, s: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """v = (x - offset) / s as a new contiguous float32 tensor (whatever x's layout, e.g. a q/k/v view)."""
    v = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if offset is None:
        return torch.div(x, s, out=v)
    return torch.sub(x, offset.float(), out=v).div_(s)


def _levels(v: torch.Tensor, qmin: int, qmax: int, binary: bool) -> torch.Tensor:
    """The integer level of every element of v, as a new float32 tensor."""
    return v.ge(0).float().mul_(2).sub_(1) if binary else v.clamp(qmin, qmax).round_()


def _fake_quant_(v: torch.Tensor, s: torch.Tensor, offset: torch.Tensor | None, qmin: int, qmax: int,
                 binary: bool) -> torch.Tensor:
    """v = (x - offset) / s -> q * s + offset, in place."""
    if binary:
        v.ge_(0).mul_(2 * s).sub_(s)  # (v >= 0) * 2s - s = +-s
    else:
        v.clamp_(qmin, qmax).round_().mul_(s)
    return v.add_(offset.float()) if offset is not None else v


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
    if shape.numel() == 1 and a.is_contiguous() and b.is_contiguous():  # reshape, not view: under torch.compile
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)   # the real strides may differ
    return a.mul_(b).sum_to_size(shape)


def _grad_scaled(total: torch.Tensor, param: torch.Tensor, qmax: int, numel: int) -> torch.Tensor:
    """A step/offset gradient sum times LSQ's g = 1/sqrt(qmax * numel(x)), shaped and typed like `param`."""
    return (total * (1.0 / math.sqrt(qmax * numel))).reshape(param.shape).to(param.dtype)


def _compiled_grads(x, s, step, offset, grad, qmin: int, qmax: int, binary: bool, needs: tuple[bool, bool, bool],
                    xq_dtype: torch.dtype | None = None):
    """(dx, dstep, doffset, Q(x) or None) from the compiled kernels, None where not needed (as `_lsq_grads`);
    None if compiling failed."""
    fused = kernels.grads(x, s, offset, grad, qmin, qmax, binary, xq_dtype)
    if fused is None:
        return None
    dx, dstep, doffset, xq = fused
    return ((dx if needs[0] else None), _grad_scaled(dstep, step, qmax, x.numel()) if needs[1] else None,
            _grad_scaled(doffset, offset, qmax, x.numel()) if needs[2] else None, xq)


def _lsq_grads(grad: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None, step: torch.Tensor,
               offset: torch.Tensor | None, qmin: int, qmax: int, needs: tuple[bool, bool, bool],
               scratch: torch.Tensor | None = None):
    """(dx, dstep, doffset) of LSQ(+), None where not needed (reference §3.4), in float32.

    `grad` is the float32 gradient of the fake-quant output, v = (x - offset) / s and q its levels (needed
    for dstep); v and q are overwritten. With inside = qmin <= v <= qmax and g = 1/sqrt(qmax * numel(x)):
    dx = grad * inside; dstep = g * sum(grad * (q - v * inside)); doffset = g * sum(grad * (1 - inside)),
    sums over the dims the step (offset) is broadcast along. A `scratch` float32 tensor shaped like x
    (overwritten, as `grad` then is) receives dx, so no new buffer is allocated.
    """
    need_dx, need_dstep, need_doffset = needs
    need_doffset = need_doffset and offset is not None
    bounds = _open_bounds(qmin, qmax)
    shape = torch.Size(step.shape or (1,))
    dx = dstep = doffset = None
    if scratch is None and (need_dx or need_doffset):
        dx = _where_inside(grad, v, bounds)  # before v is overwritten
    if need_dstep:
        q.sub_(_where_inside(v, v, bounds, out=v if scratch is None else scratch))  # q - v * inside
        dstep = _grad_scaled(_sum_of_products(q, grad, shape), step, qmax, v.numel())
    if scratch is not None and (need_dx or need_doffset):
        dx = _where_inside(grad, v, bounds, out=scratch)
    if need_doffset:
        outside = grad.sub_(dx) if scratch is not None else grad - dx
        doffset = _grad_scaled(outside.sum_to_size(shape), offset, qmax, v.numel())
    return dx, dstep, doffset


class LSQFakeQuant(torch.autograd.Function):
    """Fused LSQ(+) fake quantization: saves only its inputs, one float32 buffer in forward; backward
    recomputes v from x and uses only float passes (about 7 over the tensor, no bool masks), or the
    compiled kernels (`kernels`) when `compiled`."""

    @staticmethod
    def forward(ctx, x, step, offset, qmin: int, qmax: int, binary: bool, eps: float, compiled: bool):
        s = _scale(step, eps)
        ctx.save_for_backward(x, step, offset)
        ctx.lsq = (qmin, qmax, binary, eps, compiled)
        out = kernels.fake_quant(x, s, offset, qmin, qmax, binary, x.dtype) if compiled else None
        return out if out is not None else _fake_quant_(_normalized(x, s, offset), s, offset, qmin, qmax,
                                                        binary).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, step, offset = ctx.saved_tensors
        qmin, qmax, binary, eps, compiled = ctx.lsq
        needs = ctx.needs_input_grad[:3]
        s = _scale(step, eps)
        fused = _compiled_grads(x, s, step, offset, grad, qmin, qmax, binary, needs) if compiled else None
        if fused is not None:
            return (*fused[:3], None, None, None, None, None)
        v = _normalized(x, s, offset)
        q = _levels(v, qmin, qmax, binary) if needs[1] else None
        dx, dstep, doffset = _lsq_grads(grad.float(), v, q, step, offset, qmin, qmax, needs)
        return (dx.to(x.dtype) if needs[0] else None), dstep, doffset, None, None, None, None, None


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, offset: torch.Tensor | None = None,
                   binary: bool = False, eps: float = 1e-5, compiled: bool = False) -> torch.Tensor:
    """LSQ(+) fake quantization of `x`: q * max(step, eps) + offset with q in [qmin, qmax] (sign if `binary`).

    `step`/`offset` are (1,) per tensor or (C, 1, ...) per channel; the result has x's dtype. `compiled`
    runs the elementwise math as compiled kernels (`kernels`), falling back to eager if compiling fails.

    >>> x = torch.tensor([-1.0, -0.2, 0.1, 0.35, 1.5], requires_grad=True)
    >>> s = torch.tensor([0.5], requires_grad=True)
    >>> y = lsq_fake_quant(x, s, -1, 1); y.sum().backward()
    >>> y.detach(), x.grad, s.grad  # ds = (-1 + 0.4 - 0.2 + 0.3 + 1) / sqrt(1 * 5)
    (tensor([-0.5000, -0.0000,  0.0000,  0.5000,  0.5000]), tensor([0., 1., 1., 1., 0.]), tensor([0.2236]))
    """
    return LSQFakeQuant.apply(x, step, offset, qmin, qmax, binary, eps, compiled)


class LinearOp:
    """F.linear and its gradients, for `LSQInputLayer`."""

    @staticmethod
    def forward(x, w, b):
        return F.linear(x, w, b)

    @staticmethod
    def input_grad(grad, x_shape, w):
        return grad.matmul(w)

    @staticmethod
    def param_grads(grad, x, w, need_w: bool, need_b: bool):
        """dW (from the layer input x) and db."""
        grad = grad.reshape(-1, grad.shape[-1])
        return (grad.t().mm(x.reshape(-1, x.shape[-1])) if need_w else None), (grad.sum(0) if need_b else None)


@dataclass(frozen=True)
class Conv2dOp:
    """F.conv2d with explicit zero padding and its gradients, for `LSQInputLayer`."""
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def forward(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, grad, x_shape, w):
        return torch.nn.grad.conv2d_input(x_shape, w, grad, self.stride, self.padding, self.dilation, self.groups)

    def param_grads(self, grad, x, w, need_w: bool, need_b: bool):
        """dW (from the layer input x) and db."""
        dw = torch.nn.grad.conv2d_weight(x, w.shape, grad, self.stride, self.padding, self.dilation,
                                         self.groups) if need_w else None
        return dw, (grad.sum((0, 2, 3)) if need_b else None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class LSQInputLayer(torch.autograd.Function):
    """layer(Q(x), w, b) for a linear / convolution layer whose input is LSQ(+) fake-quantized.

    Saves x (which the float layer saves anyway), not Q(x): backward recomputes v, the levels and Q(x)
    from x, so a quantized layer keeps no more activation memory than the float layer. Under autocast
    the layer runs in the autocast dtype, as the float layer would; the quantizer arithmetic is float32.
    """

    @staticmethod
    def forward(ctx, x, step, offset, weight, bias, op, qmin: int, qmax: int, binary: bool, eps: float,
                compiled: bool):
        s = _scale(step, eps)
        dtype = _compute_dtype(x)
        xq = kernels.fake_quant(x, s, offset, qmin, qmax, binary, dtype) if compiled else None
        if xq is None:
            xq = _fake_quant_(_normalized(x, s, offset), s, offset, qmin, qmax, binary).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = op.forward(xq, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, step, offset, weight)
        ctx.op, ctx.lsq, ctx.dtype = op, (qmin, qmax, binary, eps, compiled), dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, step, offset, weight = ctx.saved_tensors
        qmin, qmax, binary, eps, compiled = ctx.lsq
        need_x, need_step, need_offset, need_w, need_b = ctx.needs_input_grad[:5]
        needs = (need_x, need_step, need_offset)
        s = _scale(step, eps)
        w = weight.to(ctx.dtype)
        fused = None
        if compiled and any(needs):
            fused = _compiled_grads(x, s, step, offset, ctx.op.input_grad(grad, x.shape, w), qmin, qmax, binary,
                                    needs, ctx.dtype if need_w else None)
        if fused is not None:
            dx, dstep, doffset, xq = fused
            dw, db = ctx.op.param_grads(grad, xq, w, need_w, need_b)
        else:
            v = _normalized(x, s, offset)
            q = _levels(v, qmin, qmax, binary) if need_step or need_w else None
            xq = None
            if need_w:
                xq = (q * s).add_(offset.float()) if offset is not None else q * s
            dw, db = ctx.op.param_grads(grad, None if xq is None else xq.to(ctx.dtype), w, need_w, need_b)
            dx = dstep = doffset = None
            if any(needs):
                dxq = ctx.op.input_grad(grad, x.shape, w).float()
                scratch = xq if xq is not None else torch.empty_like(v)  # Q(x) is no longer needed: dx goes there
                dx, dstep, doffset = _lsq_grads(dxq, v, q, step, offset, qmin, qmax, needs, scratch)
        return ((dx.to(x.dtype) if need_x else None), dstep, doffset, None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(ctx.bias_dtype), None, None, None, None, None, None)


def lsq_layer(op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, step: torch.Tensor,
              qmin: int, qmax: int, offset: torch.Tensor | None = None, binary: bool = False,
              eps: float = 1e-5, compiled: bool = False) -> torch.Tensor:
    """op.forward(lsq_fake_quant(x, ...), weight, bias) with the same values and gradients, keeping only x for
    backward; `op` is `LinearOp` or a `Conv2dOp`; `compiled` as in `lsq_fake_quant`.

    >>> x, w = torch.tensor([[0.3, -0.8]]), torch.tensor([[1.0, 2.0]])
    >>> lsq_layer(LinearOp, x, w, None, torch.tensor([0.5]), -1, 1)  # Q(x) = [0.5, -0.5]
    tensor([[-0.5000]])
    """
    return LSQInputLayer.apply(x, step, offset, weight, bias, op, qmin, qmax, binary, eps, compiled)
