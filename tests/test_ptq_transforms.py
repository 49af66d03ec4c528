"""Bias correction zeroes the mean output error per channel; AWQ keeps the FP function."""
import pytest
import torch
from torch import nn

from qat.models import create_model
from qat.ptq.awq import awq_, fold_pairs
from qat.ptq.bias_correction import bias_correct_, output_moments, quant_layers, std
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import create_observer
from qat.quant import QuantConfig, quantize_, quantizers_off

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


def warmed(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-weight model whose BatchNorm statistics (if any) come from a few random batches."""
    torch.manual_seed(seed)
    model = create_model(name)
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(1),
                         nn.Linear(8 * 4 * 4, 5)).eval()


def means(model, layers, batches, **kw):
    return {name: m[0] for name, m in output_moments(model, layers, batches, **kw).items()}


def calibrated_toy(weight: dict, observer: str):
    """(toy quantized at `weight` with 4-bit inputs and biases everywhere, its two batches, its layers)."""
    model = quantize_(toy(), QuantConfig(weight=weight, act={"bits": 4}, add_bias=True))
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate(model, batches, create_observer(observer))
    return model, batches, quant_layers(model)


def test_bias_correction_zeroes_the_mean_error_per_channel():
    model, batches, layers = calibrated_toy({"bits": 3}, "minmax")
    with quantizers_off(model):
        fp = means(model, layers, batches)
    before = means(model.eval(), layers, batches)
    report = bias_correct_(model, batches)
    after = means(model.eval(), layers, batches)
    assert max(report.values()) > 1e-3  # there was an error to correct
    for name in layers:
        assert float((before[name] - fp[name]).abs().max()) > 1e-4
        torch.testing.assert_close(after[name], fp[name], atol=2e-5, rtol=0)


def test_a_pass_stopped_at_its_layer_gives_the_same_mean_and_runs_nothing_after_it():
    model = quantize_(toy(), QuantConfig(weight={"bits": 3}, act={"bits": 4}, add_bias=True))
    layers = quant_layers(model)
    first, *later = layers
    batches = [torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate(model, batches, create_observer("minmax"))
    seen = []
    hooks = [layers[n].register_forward_hook(lambda *_, n=n: seen.append(n)) for n in later]
    stopped = output_moments(model, {first: layers[first]}, batches, stop_at=first)
    assert seen == []
    for h in hooks:
        h.remove()
    assert torch.equal(stopped[first], output_moments(model, {first: layers[first]}, batches)[first])


class Twice(nn.Module):
    """The same quantized conv applied twice in one forward: its pass must not stop at the first call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_bias_correction_of_a_layer_run_twice_uses_both_calls():
    torch.manual_seed(0)
    model = quantize_(Twice().eval(), QuantConfig(weight={"bits": 2}, add_bias=True))
    batches = [torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calibrate(model, batches, create_observer("minmax"))
    layers = quant_layers(model)
    calls = {}
    with quantizers_off(model):
        fp = means(model, layers, batches, calls=calls)
    assert calls == {"conv": 2}
    error = means(model, layers, batches)["conv"] - fp["conv"]  # over both calls
    bias = model.conv.bias.detach().clone()
    bias_correct_(model, batches)
    torch.testing.assert_close(model.conv.bias.detach(), bias - error.float(), atol=1e-6, rtol=0)
    assert float(error.abs().max()) > 1e-3


def test_moments_are_the_mean_and_mean_square_per_output_channel():
    model = quantize_(toy(), QuantConfig(weight={"bits": 3}, add_bias=True))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calibrate(model, [x], create_observer("minmax"))
    with torch.no_grad():
        y = model[0](x).double()  # (4, 8, 6, 6): channel dim 1
    got = output_moments(model, {"0": model[0]}, [x])["0"]
    torch.testing.assert_close(got, torch.stack([y.mean((0, 2, 3)), y.square().mean((0, 2, 3))]))


@pytest.mark.parametrize("offset", [False, True])
def test_variance_correction_matches_mean_and_std_per_channel_and_keeps_the_levels(offset):
    model, batches, layers = calibrated_toy({"bits": 2, "per_channel": True, "learnable_offset": offset}, "mse")
    with quantizers_off(model):
        fp = output_moments(model, layers, batches)
    before = output_moments(model.eval(), layers, batches)
    levels = {n: m.weight_quantizer.levels(m.weight) for n, m in layers.items()}
    bias_correct_(model, batches, variance=True)
    after = output_moments(model.eval(), layers, batches)
    assert max(float((std(before[n]) / std(fp[n]) - 1).abs().max()) for n in layers) > 0.05  # W2 changed the std
    for name, layer in layers.items():
        torch.testing.assert_close(after[name][0], fp[name][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(std(after[name]), std(fp[name]), atol=1e-4, rtol=1e-4)
        assert torch.equal(layer.weight_quantizer.levels(layer.weight), levels[name])


def test_variance_correction_needs_per_channel_weight_steps():
    model = quantize_(toy(), QuantConfig(weight={"bits": 3}, add_bias=True))
    with pytest.raises(ValueError, match=r"bias_correct=variance .* per-tensor weight steps.*ptq.granularity=channel"):
        bias_correct_(model, [torch.randn(2, 3, 8, 8)], variance=True)


def test_bias_correction_needs_a_bias():
    model = quantize_(toy(), QuantConfig(weight={"bits": 3}))
    with pytest.raises(ValueError, match=r"needs a bias .* QuantConfig\(add_bias=True\)"):
        bias_correct_(model, [torch.randn(2, 3, 8, 8)])


@pytest.mark.parametrize("name,use_relu,folds", [("resnet20", False, 9), ("vit_2_4_32", True, 6),
                                                 ("vit_2_4_32", False, 4)])
def test_awq_keeps_the_fp_function(name, use_relu, folds):
    model = warmed(name) if name == "resnet20" else create_model(name, use_relu=use_relu).eval()
    quantize_(model, QuantConfig(weight={"bits": 3, "per_channel": True}))
    assert len(fold_pairs(model)) == folds
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with quantizers_off(model):
        ref = model(x)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    alphas = awq_(model, [x], create_observer("minmax"), grid=4)
    assert any(a > 0 for a in alphas.values())  # some layer was rescaled
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    with quantizers_off(model):
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_add_bias_gives_zero_biases_and_keeps_the_function():
    model = toy()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    quantize_(model, QuantConfig(weight={"bits": 8}, add_bias=True))
    assert torch.equal(model[0].bias, torch.zeros(8)) and model[2].bias is not None
    with quantizers_off(model):
        torch.testing.assert_close(model(x), ref)
