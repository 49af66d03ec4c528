"""QuantLinear / QuantConv2d: shared Parameters, bit-exact equivalences, per-channel steps, input bias."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.common import peak_memory
from qat.models import create_model
from qat.quant import QuantConv2d, QuantizerConfig, QuantLinear, quantize_

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
def test_from_float_sets_the_quantizers_up_once_without_rng(make, cls, monkeypatch):
    mod, _ = make()
    calls = []
    setup = cls._setup_quant
    monkeypatch.setattr(cls, "_setup_quant", lambda self, *a: calls.append(a) or setup(self, *a))
    state = torch.get_rng_state()
    q = cls.from_float(mod, W2, A4, act_signed=False, learnable_bias=True)
    assert calls == [(W2, A4, False, True)] and torch.equal(torch.get_rng_state(), state)
    assert (q.act_quantizer.qmin, q.act_quantizer.qmax) == (0, 14) and q.weight_quantizer.step.device == mod.weight.device
    assert q.input_bias.shape == ((12,) if cls is QuantLinear else (3, 1, 1)) and not q.input_bias.any()


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


def test_integer_form_eval_holds_two_activation_sized_tensors():
    """No-grad eval of a quantized layer (integer form) keeps the codes and the output, each computed in place
    (an op per new tensor held 32.5 MB more in vit block reconstruction's captures, bench/PTQ.md)."""
    torch.manual_seed(SEED)
    q = initialise(QuantLinear.from_float(nn.Linear(256, 256), A4, A4), torch.randn(64, 256))
    x, act = torch.randn(4096, 256), 4096 * 256 * 4
    with torch.no_grad():
        peak = peak_memory(lambda: q(x), "cpu")["peak_bytes"]
    assert 2 * act <= peak < 2.5 * act


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


FUSED_CASES = [  # act config, weight config, act signed
    (QuantizerConfig(bits=2), QuantizerConfig(bits=2), True),
    (QuantizerConfig(bits=4, learnable_offset=True), None, False),  # LSQ+ offset
    (QuantizerConfig(bits=1), QuantizerConfig(bits=3, per_channel=True), True),  # binary input
    (QuantizerConfig(bits=8, symmetric=False), None, False),
]


def make_grouped_conv():
    torch.manual_seed(SEED)
    return nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2), torch.randn(2, 4, 7, 9)


def make_linear_no_bias():
    torch.manual_seed(SEED)
    return nn.Linear(12, 5, bias=False), torch.randn(3, 7, 12)


def unfused(q, x):
    """The layer as the composition of its quantizer modules and the float op."""
    x_hat = q.act_quantizer(x if q.input_bias is None else x + q.input_bias)
    w_hat = q.weight_quantizer(q.weight)
    return F.linear(x_hat, w_hat, q.bias) if isinstance(q, nn.Linear) else q._conv_forward(x_hat, w_hat, q.bias)


def run_backward(q, forward, x, upstream):
    leaves = [x] + [p for p in q.parameters()]
    for t in leaves:
        t.grad = None
    y = forward(q, x)
    y.backward(upstream)
    return y.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("act,weight,signed", FUSED_CASES)
@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_linear_no_bias, QuantLinear),
                                      (make_conv, QuantConv2d), (make_grouped_conv, QuantConv2d)])
def test_fused_layer_matches_composition(make, cls, act, weight, signed):
    mod, x = make()
    q = initialise(cls.from_float(mod, weight, act, signed, learnable_bias=True), x).train()
    with torch.no_grad():
        q.input_bias.normal_(0, 0.1)
    x = x.clone().requires_grad_()
    upstream = torch.randn(unfused(q, x).shape, generator=torch.Generator().manual_seed(SEED))
    y_fused, g_fused = run_backward(q, lambda m, t: m(t), x, upstream)
    y_ref, g_ref = run_backward(q, unfused, x, upstream)
    assert torch.equal(y_fused, y_ref)
    for a, b in zip(g_fused, g_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def activation_sized_saves(q, x) -> set[int]:
    """Storages of the tensors with x's element count that the layer's autograd graph keeps."""
    kept = set()

    def pack(t):
        if t.numel() == x.numel():
            kept.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(x)
    return kept


@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_conv, QuantConv2d)])
def test_fused_layer_keeps_only_the_float_input(make, cls):
    mod, x = make()
    x = x.requires_grad_()
    q = initialise(cls.from_float(mod, W2, A4), x).train()
    assert activation_sized_saves(mod, x) == {x.untyped_storage().data_ptr()}
    assert activation_sized_saves(q, x) == {x.untyped_storage().data_ptr()}  # not Q(x) as well
    q.act_quantizer.register_forward_hook(lambda *_: None)  # an observed quantizer runs as its own op
    assert len(activation_sized_saves(q, x)) == 2


@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_conv, QuantConv2d)])
def test_fused_layer_under_autocast_matches_composition(make, cls):
    mod, x = make()
    q = initialise(cls.from_float(mod, W2, A4), x).train()
    x = x.clone().requires_grad_()
    upstream = torch.randn(unfused(q, x).shape)
    results = []
    for forward in (lambda m, t: m(t), unfused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run_backward(q, forward, x, upstream.bfloat16()))
    (y_fused, g_fused), (y_ref, g_ref) = results
    assert y_fused.dtype == torch.bfloat16 and torch.equal(y_fused, y_ref)
    for a, b in zip(g_fused, g_ref, strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-2, atol=1e-3)


def test_non_zero_padding_conv_uses_the_composition():
    torch.manual_seed(SEED)
    mod, x = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.randn(2, 3, 8, 8)
    q = initialise(QuantConv2d.from_float(mod, W2, A4), x)
    assert torch.equal(q(x), unfused(q, x))


@pytest.mark.parametrize("make,cls", [(make_linear, QuantLinear), (make_conv, QuantConv2d)])
@pytest.mark.parametrize("frozen", ["weight", "input", "step"])
def test_fused_layer_with_frozen_tensors_matches_composition(make, cls, frozen):
    mod, x = make()
    q = initialise(cls.from_float(mod, None, A4), x).train()
    x = x.clone().requires_grad_(frozen != "input")
    {"weight": q.weight, "input": x, "step": q.act_quantizer.step}[frozen].requires_grad_(False)
    upstream = torch.randn(unfused(q, x).shape)
    grads = []
    for forward in (lambda m, t: m(t), unfused):
        leaves = [t for t in (x, q.weight, q.bias, q.act_quantizer.step) if t.requires_grad]
        grads.append(torch.autograd.grad(forward(q, x), leaves, upstream))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_quantized_vit_matches_eager():
    # torch.compile traces the fused layer and the quantizers on q/k/v views (compile=true)
    torch.manual_seed(SEED)
    model = quantize_(create_model("vit_2_4_32"), {"weight": {"bits": 2}, "act": {"bits": 2}, "attn": {"bits": 2}})
    x = torch.randn(4, 3, 32, 32)
    initialise(model, x)  # eval mode from here: no dropout, so both runs compute the same function
    compiled = copy.deepcopy(model)
    compiled.compile()
    grads = []
    for m in (model, compiled):
        loss = m(x).logsumexp(-1).sum()
        grads.append(torch.autograd.grad(loss, [p for p in m.parameters()]))
        assert torch.isfinite(loss)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
