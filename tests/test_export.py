"""qat.export: integer re-simulation == fake-quant, exact code packing, bad input refused before any write.

The reference is the differentiable fake-quant forward (run with grad); evaluated without grad, a fake-quant
model computes the integer form itself, so it must equal the exported integer model exactly.
"""
import pytest
import torch
from torch import nn

from qat.export.exporter import check_request, export, write_files
from qat.export.integer import to_integer
from qat.export.onnx_qdq import check_opset, to_qdq
from qat.export.packing import pack_codes, pack_model, unpack_codes, unpack_model
from qat.models.layers import Attention
from qat.quant import LSQQuantizer, QuantConfig, QuantConv2d, QuantizerConfig, QuantLinear, quantize_
from qat.quant.integer import IntConv2d, IntLinear, acc_dtype

CASES = {  # name: (weight config, act config)
    "w2a2_per_tensor": (dict(bits=2), dict(bits=2)),
    "w4_per_channel_a4_unsigned": (dict(bits=4, per_channel=True), dict(bits=4, signed=False)),
    "w3a3_asym": (dict(bits=3, symmetric=False), dict(bits=3, symmetric=False)),
    "w4a8_unsigned_weights": (dict(bits=4, signed=False, init="minmax"), dict(bits=8)),
    "lsq_plus_offsets": (dict(bits=4, per_channel=True, learnable_offset=True),
                         dict(bits=4, learnable_offset=True, init="minmax")),
    "w1a1_binary": (dict(bits=1), dict(bits=1, signed=True)),
    "weight_only_w2": (dict(bits=2), None),
    "act_only_a2": (None, dict(bits=2)),
}


def calibrated(layer: nn.Module, x: torch.Tensor, offsets: bool = True) -> nn.Module:
    """One train-mode forward sets the steps; random LSQ+ offsets make the offset terms non-trivial."""
    with torch.no_grad():
        layer.train()(x)
        for name, p in layer.named_parameters():
            if name.endswith("offset") and offsets:
                p.copy_(torch.randn_like(p) * 0.1)
    return layer.eval()


def fake_quant(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The differentiable fake-quant forward: with grad enabled the layers do not take their integer form."""
    with torch.enable_grad():
        return module(x).detach()


def same_as_eval(exported: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The exported output, checked bit-equal to the fake-quant module's no-grad eval forward."""
    with torch.no_grad():
        out = exported(x)
        assert torch.equal(out, module(x))
    return out


def make_layer(kind: str, case: str, learnable_bias: bool = False):
    torch.manual_seed(0)
    w, a = (QuantizerConfig(**c) if c else None for c in CASES[case])
    if kind == "linear":
        float_layer, x = nn.Linear(24, 10), torch.randn(4, 5, 24)
        layer = QuantLinear.from_float(float_layer, w, a, act_signed=a is None or a.signed is not False,
                                       learnable_bias=learnable_bias)
    else:
        float_layer, x = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 9, 9)
        layer = QuantConv2d.from_float(float_layer, w, a, act_signed=a is None or a.signed is not False,
                                       learnable_bias=learnable_bias)
    if learnable_bias:
        layer.input_bias.data.normal_(0, 0.1)
    return calibrated(layer, x), x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("case", list(CASES))
def test_integer_layer_equals_fake_quant(kind, case):
    layer, x = make_layer(kind, case)
    int_layer = to_integer(layer)
    assert isinstance(int_layer, IntLinear if kind == "linear" else IntConv2d)
    torch.testing.assert_close(same_as_eval(int_layer, layer, x), fake_quant(layer, x), atol=2e-5, rtol=1e-5)
    q = layer.weight_quantizer
    if isinstance(q, LSQQuantizer):  # the stored codes are the live quantizer's levels, as integers
        assert int_layer.weight.dtype == (torch.uint8 if q.qmin >= 0 else torch.int8)
        assert torch.equal(int_layer.weight.float(), q.levels(layer.weight))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_integer_layer_with_input_bias(kind):
    layer, x = make_layer(kind, "lsq_plus_offsets", learnable_bias=True)
    torch.testing.assert_close(same_as_eval(to_integer(layer), layer, x), fake_quant(layer, x), atol=2e-5, rtol=1e-5)


def test_eight_bit_products_accumulate_exactly_in_float64():
    assert acc_dtype(24, 3, 2) == torch.float32 and acc_dtype(1, 0.0, 128) == torch.float32
    assert acc_dtype(576, 255, 128) == torch.float64  # 576 * 255 * 128 > 2**24
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(1024, 8), QuantizerConfig(bits=8), QuantizerConfig(bits=8, signed=False),
                                   act_signed=False)
    x = torch.rand(3, 1024) * 4
    int_layer = to_integer(calibrated(layer, x))
    a, w = layer.act_quantizer.levels(x).long(), layer.weight_quantizer.levels(layer.weight).long()
    expected = (a @ w.T).double() * (int_layer.act.scale * int_layer.w_scale).double() + layer.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(int_layer(x).double(), expected, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("attn", [dict(bits=2), dict(bits=4, signed=True)])
def test_integer_attention_equals_fake_quant(attn):
    torch.manual_seed(0)
    module = quantize_(Attention(32, 2), QuantConfig(weight=dict(bits=4), act=dict(bits=4), attn=attn))
    x = torch.randn(3, 9, 32)
    module = calibrated(module, x)
    int_module = to_integer(module)
    assert all(c.quantized for c in int_module.codes)  # q, k, v and softmax levels
    torch.testing.assert_close(same_as_eval(int_module, module, x), fake_quant(module, x), atol=2e-5, rtol=1e-5)


def test_integer_vit_equals_fake_quant():
    from qat.models import create_model
    torch.manual_seed(0)
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(weight=dict(bits=2), act=dict(bits=2), attn=dict(bits=2)))
    x = torch.randn(4, 3, 32, 32)
    model = calibrated(model, x)
    torch.testing.assert_close(same_as_eval(to_integer(model), model, x), fake_quant(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip(bits, signed):
    q = LSQQuantizer(bits, signed=signed)
    torch.manual_seed(bits)
    levels = torch.randint(q.qmin, q.qmax + 1, (7, 13)).float()
    if q.binary:
        levels = torch.where(levels >= 0, 1.0, -1.0)
    packed = pack_codes(levels, bits, q.qmin, q.binary)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-levels.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, q.qmin, levels.shape, q.binary), levels.long())


def test_pack_codes_closed_form():
    # 2-bit signed levels [1, 0, -1, 1] -> u = level + 1 = [2, 1, 0, 2], LSB first: 2 + 1*4 + 0*16 + 2*64
    assert pack_codes(torch.tensor([1.0, 0.0, -1.0, 1.0]), 2, -1).tolist() == [134]
    assert pack_codes(torch.tensor([1.0, -1.0, -1.0, 1.0]), 1, -1, binary=True).tolist() == [0b1001]
    with pytest.raises(ValueError, match="do not fit 2 bits"):
        pack_codes(torch.tensor([5.0]), 2, -1)


def test_pack_model_sizes_and_codes():
    layer, x = make_layer("linear", "w2a2_per_tensor")
    model = nn.Sequential(layer, nn.LayerNorm(10))
    packed, report = pack_model(model)
    assert torch.equal(unpack_model(packed)["0"].float(), layer.weight_quantizer.levels(layer.weight))
    row = report["layers"]["0"]
    assert row["packed_bytes"] == 240 * 2 // 8 + 4 and row["fp_bytes"] == 240 * 4  # codes + one float32 step
    assert report["model"]["fp_bytes"] == (240 + 10 + 10 + 10) * 4  # weight, bias, LayerNorm weight and bias


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = LSQQuantizer(2)

    def forward(self, x):
        return self.quant(x)


def test_unknown_layer_is_named_with_its_path():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(Odd()))
    with pytest.raises(ValueError, match=r"layer 1\.0 \(Odd\) holds quantizers but the exporter knows only"):
        to_integer(model)
    with pytest.raises(ValueError, match=r"layer 1\.0 \(Odd\)"):
        to_qdq(model)


def test_fp_model_has_nothing_to_export_as_integers():
    with pytest.raises(ValueError, match="nothing to export as integers with --format int; use --format onnx"):
        check_request(nn.Linear(4, 2), {"int", "onnx"}, 17, False, "fp.ckpt")
    check_request(nn.Linear(4, 2), {"onnx"}, 17, False, "fp.ckpt")  # an FP ONNX export is fine


def test_activation_only_model_has_no_weight_codes_to_pack():
    layer, _ = make_layer("linear", "act_only_a2")
    with pytest.raises(ValueError, match="quantizes activations only .* use --format int or onnx"):
        check_request(layer, {"packed"}, 17, False, "act.ckpt")
    check_request(layer, {"int", "onnx"}, 17, False, "act.ckpt")


def test_opset_that_cannot_hold_the_codes():
    layer, _ = make_layer("linear", "w4_per_channel_a4_unsigned")
    with pytest.raises(ValueError, match="axis needs opset >= 13; use --opset 17"):
        check_opset(layer, 11)
    with pytest.raises(ValueError, match="int4/uint4 QuantizeLinear needs opset 21"):
        check_opset(layer, 17, int4=True)
    with pytest.raises(ValueError, match="need opset >= 11"):
        check_opset(layer, 10)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope.ckpt", "int", check=0)
    bad = tmp_path / "run" / "checkpoints" / "best.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable torch checkpoint"):
        export(tmp_path / "run", "int", check=0)
    assert not (tmp_path / "run" / "export").exists()
    with pytest.raises(ValueError, match="--format='bin' is not supported"):
        export(tmp_path / "run", "bin")


def test_failed_write_leaves_no_partial_file(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(TypeError):
        write_files(out, {"a.bin": b"data", "b.bin": object()})
    assert list(tmp_path.iterdir()) == [] or (out.is_dir() and not any(out.iterdir()))
    assert [p.name for p in write_files(out, {"a.bin": b"x"})] == ["a.bin"] and (out / "a.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
