"""Observers against closed forms, per-channel activation quantizers, `calibrate` on tiny models."""
import pytest
import torch
from torch import nn

from qat.ptq.calibrate import calibrate
from qat.ptq.observers import ACIQ_LAPLACE, MSE, OMSE, Stats, create_observer, fake_quant
from qat.quant import LSQQuantizer, QuantConfig, QuantConv2d, QuantLinear, quantize_

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


def laplace(n: int, b: float = 1.0, seed: int = 0) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5
    return (-b * u.sign() * torch.log1p(-2 * u.abs())).float()


def test_minmax_is_the_tensor_range():
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) + torch.tensor([[0.5], [-1.0], [0.0]])
    obs = create_observer("minmax")
    step, offset = obs(Stats.of(x), -8, 7, with_offset=True)  # 4-bit asym + offset: levels span [min, max]
    torch.testing.assert_close(step, (x.amax(1) - x.amin(1)) / 15)
    torch.testing.assert_close(offset, x.amin(1) + 8 * step)
    step, offset = obs(Stats.of(x), -7, 7, with_offset=False)
    assert offset is None
    torch.testing.assert_close(step, x.abs().amax(1) / 7)
    q = fake_quant(x, step[:, None], None, -7, 7)
    torch.testing.assert_close(q.abs().amax(1), x.abs().amax(1))  # the extreme lands on the last level


@pytest.mark.parametrize("p", [2.0, 2.4])
def test_mse_finds_the_brute_force_optimum(p):
    x = laplace(4000, seed=2)[None]
    lo, hi = x.amin(1), x.amax(1)
    fine = torch.linspace(0.01, 1, 2000)
    errors = [float((fake_quant(x, max(f * hi, f * -lo) / 7, None, -7, 7) - x).abs().pow(p).mean()) for f in fine]
    best = min(errors)
    step, _ = MSE(p=p, grid=1000)(Stats.of(x), -7, 7, with_offset=False)
    err = float((fake_quant(x, step, None, -7, 7) - x).abs().pow(p).mean())
    assert best * (1 - 1e-5) <= err <= best * 1.005
    assert step < x.abs().max() / 7 * 0.8  # heavy tails: clipping beats the range


def test_mse_is_vectorised_per_channel_and_omse_is_its_l2_preset():
    x = torch.stack([laplace(2000, b, seed=int(b * 10)) for b in (0.5, 1.0, 3.0)])
    step, _ = MSE(grid=50)(Stats.of(x), -7, 7, False)
    for c in range(3):  # each row alone gives the same step
        alone, _ = MSE(grid=50)(Stats.of(x[c:c + 1]), -7, 7, False)
        torch.testing.assert_close(step[c:c + 1], alone)
    assert OMSE().p == 2.0 and OMSE().fractions()[0] == 1 and len(OMSE().fractions()) == 90


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aciq_clip_is_the_papers_constant_times_b(bits):
    x = laplace(200_000, b=1.0, seed=bits)[None]
    obs = create_observer("aciq")
    alpha = obs.alpha(Stats.of(x), bits)
    b_hat = (x - x.mean()).abs().mean()
    torch.testing.assert_close(alpha, ACIQ_LAPLACE[bits] * b_hat[None])
    assert abs(float(alpha) - ACIQ_LAPLACE[bits]) < 0.02 * ACIQ_LAPLACE[bits]
    qmax = 2 ** (bits - 1) - 1
    step, _ = obs(Stats.of(x), -qmax, qmax, False)
    torch.testing.assert_close(step, torch.maximum(x.mean() + alpha, -(x.mean() - alpha)) / qmax)


def test_percentile_clips_the_tails():
    x = torch.arange(10001, dtype=torch.float32)[None] - 5000
    step, _ = create_observer("percentile", q=99.0)(Stats.of(x), -127, 127, False)
    assert abs(float(step) * 127 - 4900) <= 1


def test_unknown_observer_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"ptq.observer='kl' .*\['aciq', 'minmax', 'mse', 'omse', 'percentile'\]"):
        create_observer("kl")


def test_per_channel_shapes_conv_and_linear_weights_and_inputs():
    cfg = QuantConfig(weight={"bits": 8, "per_channel": True}, act={"bits": 8, "per_channel": True})
    model = quantize_(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 7)), cfg)
    conv, fc = model[0], model[2]
    assert isinstance(conv, QuantConv2d) and isinstance(fc, QuantLinear)
    assert conv.weight_quantizer.step.shape == (5, 1, 1, 1) and fc.weight_quantizer.step.shape == (7, 1)
    assert conv.act_quantizer.step.shape == (3, 1, 1) and fc.act_quantizer.step.shape == (80,)
    x = torch.randn(16, 3, 6, 6) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    calibrate(model, [x], create_observer("minmax"))
    torch.testing.assert_close(conv.act_quantizer.step.flatten(), x.abs().amax((0, 2, 3)) / 127)
    torch.testing.assert_close(conv.weight_quantizer.step.flatten(), conv.weight.abs().flatten(1).amax(1) / 127)
    hidden = model[1](torch.conv2d(x, conv.weight, conv.bias))
    torch.testing.assert_close(fc.act_quantizer.step, hidden.abs().amax(0) / 127)
    with torch.no_grad():
        out = model.eval()(x)  # W8A8 per channel: close to FP (no collapse)
        ref = fc.to_float()(model[1](conv.to_float()(x)))
    assert float((out - ref).norm() / ref.norm()) < 0.02


def test_per_channel_input_quantizer_lsq_init_uses_its_channel_axis():
    q = LSQQuantizer(8, per_channel=True, channels=3, ch_axis=-3, init="minmax").train()
    x = torch.randn(4, 3, 2, 2) * torch.tensor([1.0, 2.0, 4.0])[:, None, None]
    q(x)
    torch.testing.assert_close(q.step.flatten(), x.abs().amax((0, 2, 3)) / 127)
    assert q.step.shape == (3, 1, 1)
