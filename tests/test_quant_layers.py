"""QuantLinear / QuantConv2d: shared Parameters, bit-exact equivalences, per-channel steps, input bias."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.quant import QuantConv2d, QuantizerConfig, QuantLinear

SEED = 123
W2 = QuantizerConfig(bits=2)
A4 = QuantizerConfig(bits=4)


def make_linear():
    torch.manual_seed(SEED)
    return nn.Linear(12, 5), torch.randn(3, 7, 12)


def make_conv():
    torch.manual_seed(SEED)
    return nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 8, 8)


def initialise(layer, x):
    with torch.no_grad():
        layer.train()(x)
    return layer.eval()


@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_conv, QuantConv2d)])
def test_from_float_and_to_float_share_parameters(make, cls):
    mod, _ = make()
    q = cls.from_float(mod, W2, A4)
    assert q.weight is mod.weight and q.bias is mod.bias and q.training == mod.training
    back = q.to_float()
    assert type(back) is type(mod) and back.weight is mod.weight and back.bias is mod.bias
    assert repr(back) == repr(mod)


@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_conv, QuantConv2d)])
def test_no_quantizers_same_keys_and_outputs_as_float(make, cls):
    mod, x = make()
    q = cls.from_float(mod)
    assert isinstance(q.weight_quantizer, nn.Identity) and isinstance(q.act_quantizer, nn.Identity)
    assert list(q.state_dict()) == list(mod.state_dict())
    assert torch.equal(q(x), mod(x))


@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_conv, QuantConv2d)])
def test_disabled_quantizers_equal_float_exactly(make, cls):
    mod, x = make()
    q = initialise(cls.from_float(mod, W2, A4), x)
    assert not torch.equal(q(x), mod(x))
    q.weight_quantizer.enabled = q.act_quantizer.enabled = False
    assert torch.equal(q(x), mod(x))


def test_linear_matches_integer_resimulation():
    mod, x = make_linear()
    q = initialise(QuantLinear.from_float(mod, W2, A4, act_signed=False), x)
    sa, sw = q.act_quantizer.step, q.weight_quantizer.step
    x_int = (x / sa).clamp(0, 14).round()  # unsigned sym 4 bit
    w_int = (mod.weight / sw).clamp(-1, 1).round()  # signed sym 2 bit
    expected = F.linear(x_int * sa, w_int * sw, mod.bias)
    assert torch.equal(q(x), expected)


def test_conv_matches_integer_resimulation():
    mod, x = make_conv()
    q = initialise(QuantConv2d.from_float(mod, QuantizerConfig(bits=3, per_channel=True), A4), x)
    sa, sw = q.act_quantizer.step, q.weight_quantizer.step
    assert sw.shape == (4, 1, 1, 1)
    x_hat = (x / sa).clamp(-7, 7).round() * sa
    w_hat = (mod.weight / sw).clamp(-3, 3).round() * sw
    assert torch.equal(q(x), F.conv2d(x_hat, w_hat, mod.bias, stride=2, padding=1))


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_weight_has_at_most_2_pow_bits_values(bits, per_channel):
    mod, x = make_linear()
    q = initialise(QuantLinear.from_float(mod, QuantizerConfig(bits=bits, per_channel=per_channel)), x)
    assert q.weight_quantizer.step.shape == ((5, 1) if per_channel else (1,))
    w_hat = q.weight_quantizer(q.weight)
    rows = w_hat if per_channel else w_hat.reshape(1, -1)
    assert all(len(row.unique()) <= 2**bits for row in rows)
    if per_channel:  # the steps differ per row, so more values in total
        assert len(w_hat.unique()) > 2**bits


def test_weight_per_channel_init_per_row():
    mod, x = make_linear()
    q = initialise(QuantLinear.from_float(mod, QuantizerConfig(bits=4, per_channel=True)), x)
    expected = 2 * mod.weight.abs().mean(1, keepdim=True) / 7**0.5
    assert torch.allclose(q.weight_quantizer.step, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("make,cls,shape", [(make_linear, QuantLinear, (12,)), (make_conv, QuantConv2d, (3, 1, 1))])
def test_learnable_input_bias(make, cls, shape):
    mod, x = make()
    q = cls.from_float(mod, None, A4, learnable_bias=True)
    assert q.input_bias.shape == shape and not q.input_bias.any()
    initialise(q, x)
    with torch.no_grad():
        q.input_bias.normal_()
    q.train()
    q(x).sum().backward()
    assert q.input_bias.grad is not None and q.act_quantizer.step.grad is not None and mod.weight.grad is not None
    expected = mod(q.act_quantizer(x + q.input_bias))
    assert torch.equal(q(x), expected)
    with pytest.raises(ValueError, match="input_bias"):
        q.to_float()


def test_direct_construction():
    q = QuantLinear(6, 3, bias=False, weight_cfg=W2, act_cfg=A4, act_signed=False, learnable_bias=True)
    assert q.bias is None and q.act_quantizer.qmin == 0 and q.weight_quantizer.qmin == -1
    assert sorted(q.state_dict()) == ["act_quantizer.initialized", "act_quantizer.step", "input_bias", "weight",
                                      "weight_quantizer.initialized", "weight_quantizer.step"]
    assert q.train()(torch.randn(2, 6)).shape == (2, 3)
