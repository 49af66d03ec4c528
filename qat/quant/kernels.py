"""LSQ(+) elementwise math compiled by torch.compile (Inductor): one pass over x in forward, one over x and the
gradient in backward, instead of the ~11 passes of the eager ops (`compile=quantizers`).

Same formulas as the eager path in `functional`: on CPU the values and dx are bit-exact (tested), the
step/offset gradient sums add in another order. Shapes, strides and the level range are dynamic, so one
compiled kernel serves every layer of a rank. If compiling fails (no C++ compiler, no Triton) the call
warns once and quantizers run eagerly.
"""
import warnings

import torch

RECOMPILE_LIMIT = 64  # variants per kernel: rank, dtype, LSQ+ offset, 1-bit, levels 0 and 1 (specialised)
_compiled: dict = {}
_failed: set[str] = set()  # device types where compiling failed


def _levels_and_v(x, s, offset, qmin: int, qmax: int, binary: bool):
    v = x.float() / s if offset is None else (x.float() - offset.float()) / s
    q = torch.where(v >= 0, 1.0, -1.0) if binary else v.clamp(qmin, qmax).round()
    return q, v


def _dequant(q, s, offset):
    out = q * s
    return out if offset is None else out + offset.float()


def _fake_quant(x, s, offset, qmin: int, qmax: int, binary: bool, dtype: torch.dtype):
    q, _ = _levels_and_v(x, s, offset, qmin, qmax, binary)
    return _dequant(q, s, offset).to(dtype)


def _grads(x, s, offset, grad, qmin: int, qmax: int, binary: bool, xq_dtype: torch.dtype | None):
    """dx (x's dtype), unscaled sums for dstep and doffset (s's shape) and, if `xq_dtype`, Q(x) in it."""
    q, v = _levels_and_v(x, s, offset, qmin, qmax, binary)
    inside = (v >= qmin) & (v <= qmax)
    g = grad.float()
    dx = torch.where(inside, g, 0.0)
    dstep = (g * (q - torch.where(inside, v, 0.0))).sum_to_size(s.shape)
    doffset = None if offset is None else torch.where(inside, 0.0, g).sum_to_size(s.shape)
    xq = None if xq_dtype is None else _dequant(q, s, offset).to(xq_dtype)
    return dx.to(x.dtype), dstep, doffset, xq


def _run(fn, x: torch.Tensor, *args):
    """fn compiled for x's device; None once compiling has failed there (the caller runs the eager path)."""
    device = x.device.type
    if device in _failed:
        return None
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in (x, *args)]  # a Parameter's shape is static
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    try:
        try:
            return _compiled[fn](*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # patched only here: the patch costs 0.1 ms a call
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return _compiled[fn](*args)
    except Exception as err:
        out = fn(*args)  # uncompiled: an error in the inputs is raised again here
        _failed.add(device)
        warnings.warn(f"compiled LSQ kernels are unavailable on {device} ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); quantizers run eagerly", stacklevel=3)
        return out


def fake_quant(x, s, offset, qmin: int, qmax: int, binary: bool, dtype: torch.dtype):
    """Q(x) in `dtype`, or None if compiling failed."""
    return _run(_fake_quant, x, s, offset, qmin, qmax, binary, dtype)


def grads(x, s, offset, grad, qmin: int, qmax: int, binary: bool, xq_dtype: torch.dtype | None = None):
    """(dx, dstep sum, doffset sum, Q(x) or None), or None if compiling failed."""
    return _run(_grads, x, s, offset, grad, qmin, qmax, binary, xq_dtype)
