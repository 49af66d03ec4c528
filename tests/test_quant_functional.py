"""Quantizer math: level sets, STE ops, the fused LSQ op against hand-computed and textbook gradients."""
import doctest
import itertools
import math

import pytest
import torch

from qat.quant import functional
from qat.quant.functional import level_range, lsq_fake_quant, lsq_reference

SEED = 123
STEP = 0.37  # not a power of two, so exactness is not an accident of binary scaling
CASES = list(itertools.product(range(1, 9), (True, False), (True, False)))  # bits, signed, symmetric


def expected_levels(bits: int, signed: bool, symmetric: bool) -> list[int]:
    if bits == 1:
        return [-1, 1] if signed else [0, 1]
    if signed:
        low = -(2 ** (bits - 1)) + (1 if symmetric else 0)
        return list(range(low, 2 ** (bits - 1)))
    return list(range(0, 2**bits - (1 if symmetric else 0)))


def fake_quant(x: torch.Tensor, bits: int, signed: bool, symmetric: bool, step: float = STEP) -> torch.Tensor:
    qmin, qmax = level_range(bits, signed, symmetric)
    return lsq_fake_quant(x, torch.tensor([step]), qmin, qmax, binary=bits == 1 and signed)


def test_doctests():
    assert doctest.testmod(functional).failed == 0


def test_level_range_table():  # reference §3.3
    table = {1: [(-1, 1), (-1, 1), (0, 1), (0, 1)], 2: [(-1, 1), (-2, 1), (0, 2), (0, 3)],
             4: [(-7, 7), (-8, 7), (0, 14), (0, 15)], 8: [(-127, 127), (-128, 127), (0, 254), (0, 255)]}
    for bits, row in table.items():
        assert [level_range(bits, s, sym) for s in (True, False) for sym in (True, False)] == row


@pytest.mark.parametrize("bits,signed,symmetric", CASES)
def test_levels_exhaustive(bits, signed, symmetric):
    levels = torch.tensor(expected_levels(bits, signed, symmetric), dtype=torch.float32)
    on_grid = levels * STEP
    assert torch.equal(fake_quant(on_grid, bits, signed, symmetric), on_grid)  # every level is kept exactly
    lo, hi = levels.min(), levels.max()
    if bits == 1 and signed:  # sign: 0 -> +1
        between = torch.tensor([-2.5, -0.7, -0.3, 0.0, 0.3, 0.7, 2.5])
        want = torch.tensor([-1.0, -1, -1, 1, 1, 1, 1])
    else:
        between = torch.cat([levels - 0.3, levels + 0.3, torch.stack([lo - 3, hi + 3])])
        want = torch.cat([levels, levels, torch.stack([lo, hi])])
    assert torch.equal(fake_quant(between * STEP, bits, signed, symmetric), want * STEP)
    wide = torch.empty(20_000).uniform_(float(lo) - 2, float(hi) + 2, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(fake_quant(wide * STEP, bits, signed, symmetric).unique(), on_grid)


def test_step_gradient_hand_computed():
    # 2-bit signed sym, s = 0.5: v = [-2, -0.4, 0.2, 0.7, 3] -> q = [-1, 0, 0, 1, 1], inside = [0, 1, 1, 1, 0]
    x = torch.tensor([-1.0, -0.2, 0.1, 0.35, 1.5], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    y = lsq_fake_quant(x, s, -1, 1)
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(y, torch.tensor([-0.5, 0.0, 0.0, 0.5, 0.5]))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))
    # ds = g * sum(grad * (q - v*inside)) = (1*-1 + 2*0.4 + 3*-0.2 + 4*0.3 + 5*1) / sqrt(1 * 5) = 5.4 / sqrt(5)
    assert torch.allclose(s.grad, torch.tensor([5.4 / math.sqrt(5)]), rtol=1e-6, atol=0)


def test_offset_gradient_hand_computed():
    # LSQ+, 2-bit unsigned asym [0, 3], s = 0.5, offset 0.25: v = (x - 0.25) / 0.5 = [-1.5, 0.1, 1.3, 1.7, 4.5]
    x = torch.tensor([-0.5, 0.3, 0.9, 1.1, 2.5], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    b = torch.tensor([0.25], requires_grad=True)
    y = lsq_fake_quant(x, s, 0, 3, offset=b)
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(y, torch.tensor([0.25, 0.25, 0.75, 1.25, 1.75]))  # q = [0, 0, 1, 2, 3]
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))
    g = 1 / math.sqrt(3 * 5)
    # ds: grad * (q - v*inside) = [0, 2*-0.1, 3*-0.3, 4*0.3, 5*3] -> 15.1; d offset: grad outside = 1 + 5
    assert torch.allclose(s.grad, torch.tensor([15.1 * g]), rtol=1e-6, atol=0)
    assert torch.allclose(b.grad, torch.tensor([6.0 * g]), rtol=1e-6, atol=0)


def test_per_channel_gradient_hand_computed():
    # 2-bit signed sym, steps per row [0.5, 1.0]; gradient scale uses numel of the whole tensor (6)
    x = torch.tensor([[-1.0, 0.2, 0.4], [0.3, -0.6, 2.0]], requires_grad=True)
    s = torch.tensor([[0.5], [1.0]], requires_grad=True)
    y = lsq_fake_quant(x, s, -1, 1)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([[-0.5, 0.0, 0.5], [0.0, -1.0, 1.0]]))
    # row 0: v = [-2, 0.4, 0.8] -> q - v*inside = [-1, -0.4, 0.2]; row 1: v = [0.3, -0.6, 2] -> [-0.3, -0.4, 1]
    assert torch.allclose(s.grad, torch.tensor([[-1.2], [0.3]]) / math.sqrt(6), rtol=1e-5, atol=0)
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))


def test_binary_gradient_is_straight_through_inside():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    s = torch.tensor([1.0], requires_grad=True)
    y = lsq_fake_quant(x, s, -1, 1, binary=True)
    y.sum().backward()
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    # q - v*inside = [-1, -0.5, 1, 0.5, 1] -> 1.0, scaled by 1/sqrt(1 * 5)
    assert torch.allclose(s.grad, torch.tensor([1.0 / math.sqrt(5)]), rtol=1e-6, atol=0)


def test_step_floor_in_forward_keeps_gradient():
    x = torch.tensor([0.0, 1e-5, 3e-5, 1.0])
    s = torch.tensor([-0.1], requires_grad=True)
    y = lsq_fake_quant(x, s, -7, 7)
    assert torch.equal(y, lsq_fake_quant(x, torch.tensor([1e-5]), -7, 7))
    assert torch.equal(y[:3], x[:3]) and y[3] == 7 * torch.tensor(1e-5)
    y.sum().backward()
    assert s.grad is not None and s.grad.item() != 0


# bits, signed, symmetric, per_channel, offset
REFERENCE_CASES = [(1, True, True, False, False), (1, False, True, False, False), (2, True, True, False, False),
                   (2, False, True, False, True), (3, True, False, True, False), (4, True, True, True, True),
                   (8, False, False, False, False), (8, True, True, True, False)]


@pytest.mark.parametrize("bits,signed,symmetric,per_channel,offset", REFERENCE_CASES)
def test_fused_matches_textbook(bits, signed, symmetric, per_channel, offset):
    gen = torch.Generator().manual_seed(SEED)
    qmin, qmax = level_range(bits, signed, symmetric)
    x = torch.randn(6, 5, 4, generator=gen) * 2
    shape = (6, 1, 1) if per_channel else (1,)
    step = torch.rand(shape, generator=gen) * 0.5 + 0.05
    off = torch.randn(shape, generator=gen) * 0.1 if offset else None
    upstream = torch.randn(x.shape, generator=gen)
    results = []
    for fn in (lsq_fake_quant, lsq_reference):
        leaves = [t.clone().requires_grad_() for t in (x, step) + ((off,) if offset else ())]
        y = fn(leaves[0], leaves[1], qmin, qmax, leaves[2] if offset else None, binary=bits == 1 and signed)
        y.backward(upstream)
        results.append((y.detach(), [t.grad for t in leaves]))
    (y_fused, g_fused), (y_ref, g_ref) = results
    assert torch.equal(y_fused, y_ref)
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_float32_arithmetic(dtype):
    gen = torch.Generator().manual_seed(SEED)
    x = (torch.randn(64, generator=gen) * 3).to(dtype).requires_grad_()
    step = torch.tensor([1e-3], requires_grad=True)  # x / s overflows fp16 (max 65504) for |x| > 65.5
    y = lsq_fake_quant(x * 1000, step, -127, 127)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert torch.equal(y, lsq_reference((x * 1000).detach(), step.detach(), -127, 127))
    y.sum().backward()
    assert x.grad.dtype == dtype and step.grad.dtype == torch.float32 and torch.isfinite(step.grad).all()


def test_range_ends_are_inside():
    # v exactly at qmin/qmax passes the gradient (LSQ's closed interval); one float32 ulp beyond does not
    s = torch.tensor([0.5], requires_grad=True)
    ends = torch.tensor([-0.5, 0.5, 1.5])  # v = -1, 1, 3 for [-1, 1] and [0, 3]
    for qmin, qmax in ((-1, 1), (0, 3)):
        x = torch.cat([ends, ends.nextafter(ends.sign() * math.inf)]).requires_grad_()
        lsq_fake_quant(x, s, qmin, qmax).sum().backward()
        v = x.detach() / 0.5
        assert torch.equal(x.grad, ((v >= qmin) & (v <= qmax)).float())


@pytest.mark.parametrize("per_channel", [False, True])
def test_non_contiguous_inputs_and_gradients_match_textbook(per_channel):
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(5, 7, 6, generator=gen).permute(2, 0, 1)  # (6, 5, 7), not contiguous
    step = torch.rand((6, 1, 1) if per_channel else (1,), generator=gen) * 0.5 + 0.05
    upstream = torch.randn(7, 6, 5, generator=gen).permute(1, 2, 0)  # yet other strides
    results = []
    for fn in (lsq_fake_quant, lsq_reference):
        leaves = [t.clone().requires_grad_() for t in (x, step)]
        y = fn(leaves[0], leaves[1], -1, 1)
        y.backward(upstream)
        results.append((y.detach(), leaves[0].grad, leaves[1].grad))
    (y_fused, *g_fused), (y_ref, *g_ref) = results
    assert torch.equal(y_fused, y_ref)
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
