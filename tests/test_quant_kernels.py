"""Compiled LSQ kernels (compile=quantizers): the eager path's values bit for bit, its gradients to
float rounding, one compilation for every shape of a rank, and an eager fallback when compiling fails."""
import copy

import pytest
import torch
from torch import nn

from qat.quant import QuantConv2d, QuantizerConfig, QuantLinear, compile_quantizers, kernels, lsq_fake_quant

# name: (x shape, step shape, LSQ+ offset, qmin, qmax, binary)
CASES = {
    "act 2-bit signed": ((16, 9, 32), (1,), False, -1, 1, False),
    "act 2-bit unsigned, offset": ((16, 9, 32), (1,), True, 0, 3, False),
    "act 1-bit sign": ((16, 33), (1,), False, -1, 1, True),
    "conv weight per-channel": ((8, 4, 3, 3), (8, 1, 1, 1), False, -2, 1, False),
    "linear weight per-channel, offset": ((24, 16), (24, 1), True, -8, 7, False),
}


@pytest.fixture
def fresh_kernels(monkeypatch):
    """Empty compiled-kernel caches for one test (they are process-wide)."""
    monkeypatch.setattr(kernels, "_compiled", {})
    monkeypatch.setattr(kernels, "_failed", set())
    return kernels


def inputs(shape, step_shape, offset: bool, view: bool = False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if view:  # a strided view, like q/k/v of the qkv output
        x = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)[..., ::2]
    step = torch.randint(13, 77, step_shape, generator=gen) / 256  # dyadic: the values below are exact
    off = torch.randint(-32, 32, step_shape, generator=gen) / 256 if offset else None
    v = torch.cat([torch.arange(8) - 3.5, torch.tensor([-8.0, -2, -1, 0, 1, 2, 7])])  # ties and level-range ends
    x.flatten()[:len(v)] = v * step.flatten()[0] + (0 if off is None else off.flatten()[0])
    return x.to(dtype), step, off, torch.randn(shape, generator=gen).to(dtype)


def run(x, step, offset, grad, qmin, qmax, binary, compiled):
    leaves = [t.clone().requires_grad_() for t in (x, step) + ((offset,) if offset is not None else ())]
    y = lsq_fake_quant(leaves[0], leaves[1], qmin, qmax, leaves[2] if offset is not None else None, binary,
                       compiled=compiled)
    return (y.detach(),) + torch.autograd.grad(y, leaves, grad)


@pytest.mark.slow
@pytest.mark.parametrize("case,layout", [(c, "contiguous") for c in CASES] + [
    (c, layout) for c in CASES if c.startswith("act") for layout in ("view", "bfloat16")])
def test_compiled_fake_quant_matches_eager(fresh_kernels, case, layout):
    shape, step_shape, offset, qmin, qmax, binary = CASES[case]
    x, step, off, grad = inputs(shape, step_shape, offset, layout == "view",
                                torch.bfloat16 if layout == "bfloat16" else torch.float32)
    eager = run(x, step, off, grad, qmin, qmax, binary, False)
    fused = run(x, step, off, grad, qmin, qmax, binary, True)
    assert set(fresh_kernels._compiled) == {kernels._fake_quant, kernels._grads} and not fresh_kernels._failed
    y, dx = fused[:2]
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert torch.equal(y, eager[0]) and torch.equal(dx, eager[1])  # values and dx: bit-exact
    for a, b in zip(fused[2:], eager[2:], strict=True):  # step (offset) sums: another summation order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_one_compilation_serves_every_shape_and_level_range(fresh_kernels):
    x, step, _, grad = inputs((4, 5, 6), (1,), False)
    run(x, step, None, grad, -1, 1, False, True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompilation would fall back to eager
        for shape, (qmin, qmax) in [((16, 9, 32), (-1, 1)), ((3, 65, 8), (-2, 1)), ((7, 2, 3), (-7, 7))]:
            x, step, _, grad = inputs(shape, (1,), False)
            fused = run(x, step, None, grad, qmin, qmax, False, True)
            assert not fresh_kernels._failed
            assert torch.equal(fused[0], run(x, step, None, grad, qmin, qmax, False, False)[0])


def layer_grads(layer, x):
    out = layer(x)
    leaves = [x, layer.weight, layer.bias, layer.act_quantizer.step, layer.weight_quantizer.step]
    return [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_quant_layer_matches_eager(fresh_kernels, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = QuantLinear.from_float(nn.Linear(12, 5), QuantizerConfig(bits=2), QuantizerConfig(bits=2)), \
            torch.randn(3, 7, 12)
    else:
        layer, x = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), QuantizerConfig(bits=2, per_channel=True),
                                          QuantizerConfig(bits=4)), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        layer.train()(x)  # initialise the steps
    compiled = copy.deepcopy(layer)
    assert compile_quantizers(compiled) == 2 and "compiled=True" in repr(compiled.act_quantizer)
    x.requires_grad_()
    eager, fused = layer_grads(layer, x), layer_grads(compiled, x)
    assert kernels._grads in fresh_kernels._compiled and not fresh_kernels._failed
    assert torch.equal(fused[0], eager[0])
    for a, b in zip(fused[1:], eager[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_failure_warns_once_and_runs_eagerly(fresh_kernels):
    def broken(*args):
        raise RuntimeError("no C++ compiler found\nlong details")
    fresh_kernels._compiled.update({kernels._fake_quant: broken, kernels._grads: broken})
    x, step, _, grad = inputs((4, 5, 6), (1,), False)
    with pytest.warns(UserWarning, match=r"compiled LSQ kernels are unavailable on cpu \(RuntimeError: no C\+\+ "
                                         r"compiler found\); quantizers run eagerly") as record:
        fused = run(x, step, None, grad, -1, 1, False, True)
    assert len(record) == 1 and fresh_kernels._failed == {"cpu"}
    for a, b in zip(fused, run(x, step, None, grad, -1, 1, False, False), strict=True):
        assert torch.equal(a, b)


def test_errors_in_the_inputs_are_not_taken_for_a_failed_compilation(fresh_kernels):
    def broken(*args):
        raise RuntimeError("compiled code sees the same bad input")
    fresh_kernels._compiled[kernels._fake_quant] = broken
    x = torch.randn(4, 5, 6)
    with pytest.raises(RuntimeError, match="size of tensor"):
        lsq_fake_quant(x, torch.ones(3, 1, 1), -1, 1, compiled=True)  # the step does not broadcast to x
    assert not fresh_kernels._failed
