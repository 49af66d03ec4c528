"""AdaRound: codes end on floor / ceil of W / s, beat nearest rounding; units for layer / block reconstruction."""
import pytest
import torch
from torch import nn

from qat.models import create_model
from qat.ptq.adaround import BetaSchedule
from qat.ptq.recon_weight import ReconWeight
from qat.ptq.calibrate import calibrate
from qat.ptq.observers import create_observer
from qat.ptq.reconstruct import ReconConfig, reconstruct_, units
from qat.quant import QuantConfig, quantize_, quantizers_off

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost on a shared CPU


def toy_linear(act_bits=None):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 16))
    act = None if act_bits is None else {"bits": act_bits}
    quantize_(layer, QuantConfig(weight={"bits": 3, "per_channel": True}, act=act))
    x = torch.randn(256, 32) * torch.linspace(0.2, 3, 32)
    calibrate(layer, [x], create_observer("minmax"))
    return layer, x


def test_rectified_sigmoid_starts_at_the_fractional_part():
    layer, _ = toy_linear()
    q, w = layer[0].weight_quantizer, layer[0].weight
    ada = ReconWeight(q, layer[0], "adaround", ("alpha",))
    v = w.detach() / q.step.detach()
    torch.testing.assert_close(ada.floor + ada.h(), v, atol=1e-5, rtol=0)
    torch.testing.assert_close(ada(w), q(w), atol=0.5 * float(q.step.detach().max()), rtol=0)
    schedule = BetaSchedule(100)  # warm-up 20 iterations, then 20 -> 2
    assert schedule(10) is None and schedule(20) == 20.0 and schedule(99) == pytest.approx(2.225)


@pytest.mark.parametrize("act_bits", [None, 4])
def test_adaround_codes_are_floor_or_ceil_and_beat_nearest(act_bits):
    layer, x = toy_linear(act_bits)
    w0 = layer[0].weight.detach().clone()
    q = layer[0].weight_quantizer
    step = q.step.detach().clone()
    with torch.no_grad():
        target = x @ w0.t() + layer[0].bias
        nearest = float((layer(x) - target).square().mean())
    act_step = None if act_bits is None else layer[0].act_quantizer.step.detach().clone()
    reconstruct_(layer, [x], ReconConfig(granularity="layer", iters=400, batch_size=64, lr=1e-2, step_lr=1e-3))
    codes = layer[0].weight.detach() / step
    assert torch.equal(codes, codes.round()) or float((codes - codes.round()).abs().max()) < 1e-4
    v = w0 / step
    on_floor_or_ceil = (codes.round() == v.floor()) | (codes.round() == v.ceil())
    assert bool(on_floor_or_ceil.all())
    assert bool((codes.round() != v.round()).any())  # some weights were rounded the other way
    torch.testing.assert_close(q.levels(layer[0].weight), codes.round())  # the LSQ quantizer reads the same codes
    with torch.no_grad():
        ada = float((layer(x) - target).square().mean())
    assert ada < nearest
    if act_bits is not None:
        assert not torch.equal(layer[0].act_quantizer.step.detach(), act_step)  # learnt jointly


def test_units_layer_and_block():
    cfg = QuantConfig(weight={"bits": 4})
    resnet = quantize_(create_model("resnet20"), cfg)
    vit = quantize_(create_model("vit_2_4_32"), cfg)
    assert len(units(resnet, "layer")) == 18 and len(units(resnet, "block")) == 9
    assert len(units(vit, "layer")) == 8 and [n for n, _ in units(vit, "block")] == [
        "classifier.blocks.0", "classifier.blocks.1"]
    with pytest.raises(ValueError, match=r"no quantized layer with a weight quantizer .* ptq.recon.enabled=false"):
        reconstruct_(quantize_(create_model("vit_2_4_32"), QuantConfig(act={"bits": 4})), [], ReconConfig())


def test_block_reconstruction_on_a_transformer_keeps_integer_codes():
    torch.manual_seed(0)
    model = quantize_(create_model("vit_2_4_32").eval(), QuantConfig(weight={"bits": 3}, act={"bits": 4}))
    x = torch.randn(8, 3, 32, 32)
    calibrate(model, [x], create_observer("mse", grid=20))
    with quantizers_off(model):
        ref = model(x)
    with torch.no_grad():
        before = float((model(x) - ref).square().mean())
    reconstruct_(model, [x], ReconConfig(granularity="block", iters=30, batch_size=8, lr=1e-2))
    for name, m in model.named_modules():
        if hasattr(m, "weight_quantizer"):
            codes = m.weight.detach() / m.weight_quantizer.step.detach()
            assert float((codes - codes.round()).abs().max()) < 1e-3, name
    with torch.no_grad():
        assert float((model(x) - ref).square().mean()) < before
