"""quantize_ on real models: modules, attention points, state_dict round trip, errors (signs: test_signedness)."""
import logging

import pytest
import timm
import torch
from torch import nn

from qat.models import QuantPoint, create_model
from qat.optim import quant_parameters
from qat.quant import LSQQuantizer, QuantConfig, QuantConv2d, QuantLinear, clamp_steps_, quantize_, quantizers

SEED = 123
W2A2 = {"weight": {"bits": 2}, "act": {"bits": 2}}
LAYERS = ("self_attn.qkv", "self_attn.proj", "linear1", "linear2")
POINTS = ("q_quant", "k_quant", "v_quant", "attn_quant")


def images(n=2, seed=SEED):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def calibrate(model, x):
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def test_vit_weight_and_act_replace_exactly_the_24_block_linears(caplog):
    model = create_model("vit_6_4_32")
    with caplog.at_level(logging.INFO, logger="qat.quant.surgery"):
        quantize_(model, QuantConfig(**W2A2))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {f"classifier.blocks.{i}.{layer}" for i in range(6) for layer in LAYERS}
    assert type(model.tokenizer.conv_layers[0][0]) is nn.Conv2d and type(model.classifier.fc) is nn.Linear
    assert sum(type(m) is QuantPoint for m in model.modules()) == 24  # attention left alone
    assert "24 layers quantized (weight 2b, act 2b), 0 attention points" in caplog.text
    for name, q in quantizers(model):
        assert q.name == name and q.signed and (q.qmin, q.qmax) == (-1, 1)


@pytest.mark.parametrize("signed", [None, True])
def test_vit_attention_points(signed, caplog):
    model = create_model("vit_6_4_32")
    with caplog.at_level(logging.INFO, logger="qat.quant.surgery"):
        quantize_(model, QuantConfig(**W2A2, attn={"bits": 2, "signed": signed}))
    assert "24 layers quantized (weight 2b, act 2b), 24 attention points (2b)" in caplog.text
    points = {n: m for n, m in model.named_modules() if n.endswith(POINTS)}
    assert set(points) == {f"classifier.blocks.{i}.self_attn.{p}" for i in range(6) for p in POINTS}
    assert all(isinstance(m, LSQQuantizer) for m in points.values()) and len(list(quantizers(model))) == 72
    attn = model.classifier.blocks[0].self_attn
    assert [(q.qmin, q.qmax) for q in (attn.q_quant, attn.k_quant, attn.v_quant)] == [(-1, 1)] * 3
    assert (attn.attn_quant.qmin, attn.attn_quant.qmax) == ((-1, 1) if signed else (0, 2))


def test_attention_probabilities_take_the_unsigned_levels():
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(attn={"bits": 2}))
    attn = model.classifier.blocks[1].self_attn
    seen = []
    attn.attn_quant.register_forward_hook(lambda m, i, out: seen.append(out))
    calibrate(model, images())(images())
    step = attn.attn_quant.step
    levels = (seen[-1] / step).round()
    assert torch.equal(levels * step, seen[-1]) and set(levels.unique().tolist()) <= {0.0, 1.0, 2.0}


def test_state_dict_round_trip_is_bit_exact_and_keeps_steps():
    torch.manual_seed(SEED)
    cfg = QuantConfig(weight={"bits": 2, "per_channel": True}, act={"bits": 3, "learnable_offset": True},
                      attn={"bits": 4}, learnable_bias=True)
    model = calibrate(quantize_(create_model("vit_2_4_32"), cfg), images())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("input_bias"):
                p.normal_(0, 0.1)
    out = model(images(seed=1))
    fresh = quantize_(create_model("vit_2_4_32"), cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert all(q.is_initialized for _, q in quantizers(fresh))
    assert torch.equal(fresh.eval()(images(seed=1)), out)
    steps = [p.clone() for p in quant_parameters(fresh)]
    fresh.train()(images(seed=2) * 10)  # no re-initialisation from new data
    assert all(torch.equal(p, step) for p, step in zip(quant_parameters(fresh), steps))


def test_quant_params_are_the_steps_offsets_and_input_biases():
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(weight={"bits": 2}, act={"bits": 2,
                                                                   "learnable_offset": True}, learnable_bias=True))
    ids = {id(p) for p in quant_parameters(model)}
    picked = {n for n, p in model.named_parameters() if id(p) in ids}
    assert len(picked) == 8 * 4  # 8 layers x (weight step, act step, act offset, input bias)
    assert picked == {n for n, _ in model.named_parameters() if n.endswith(("step", "offset", "input_bias"))}


def test_exclude_and_filter_fn():
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(**W2A2, attn={"bits": 2}, exclude=["*.blocks.0.*"]))
    assert {n.split(".")[2] for n, _ in quantizers(model)} == {"1"}
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(**W2A2), filter_fn=lambda m, n: m.out_features > 128)
    assert [n for n, m in model.named_modules() if isinstance(m, QuantLinear)] == [
        "classifier.blocks.0.self_attn.qkv", "classifier.blocks.1.self_attn.qkv"]


def test_model_without_defaults_gets_every_linear_and_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    quantize_(model, QuantConfig(act={"bits": 4}))
    assert type(model[0]) is QuantConv2d and type(model[3]) is QuantLinear
    assert [q.name for _, q in quantizers(model)] == ["0.act_quantizer", "3.act_quantizer"]


def test_timm_model():
    model = timm.create_model("test_vit", img_size=32, num_classes=10)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    quantize_(model, {"weight": {"bits": 4}, "act": {"bits": 4}})
    assert all(isinstance(model.get_submodule(n), (QuantLinear, QuantConv2d)) for n in layers)
    out = calibrate(model, images())(images())
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    clamp_steps_(model)


def test_unmatched_pattern_names_the_pattern_and_real_modules():
    with pytest.raises(ValueError, match=r"quant.modules: pattern 'classifier.blocks.\*.mlp' matches no "
                                         r"Linear/Conv2d module; module names look like \[.*classifier.blocks"):
        quantize_(create_model("vit_2_4_32"), QuantConfig(**W2A2, modules=["classifier.blocks.*.mlp"]))
    with pytest.raises(ValueError, match=r"quant.exclude: pattern 'nope'"):
        quantize_(create_model("vit_2_4_32"), QuantConfig(**W2A2, exclude=["nope"]))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"act": {"bits": 9}}, ValueError, r"quant.act.bits=9 is not supported: use an integer in 1..8"),
    ({"weight": {"bits": 0}}, ValueError, r"quant.weight.bits=0 .* 1..8"),
    ({"attn": {"bits": 16}}, ValueError, r"quant.attn.bits=16 .* 1..8"),
    ({"act": {"bits": 2, "init": "max"}}, ValueError, r"quant.act.init='max' .*\['lsq', 'minmax', 'mse'\]"),
    ({"act": {"bits": 2, "step": 1}}, TypeError, r"quant.act: unknown keys \['step'\]; valid keys are \['bits'"),
    ({"learnable_bias": True}, ValueError, r"learnable_bias=True .* set quant.act"),
])
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantConfig(**kwargs)


def test_attn_on_model_without_attention_points():
    with pytest.raises(ValueError, match="quant.attn is set but model CifarResNet has no attention quantization"):
        quantize_(create_model("resnet20"), QuantConfig(attn={"bits": 2}))


def test_quantizing_twice_is_an_error():
    model = quantize_(create_model("vit_2_4_32"), QuantConfig(**W2A2))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, QuantConfig(**W2A2))


def test_config_from_plain_dicts():
    cfg = QuantConfig(**{"weight": {"bits": 2}, "act": None, "attn": {"bits": 2}, "modules": "*.linear1"})
    assert cfg.weight.bits == 2 and cfg.attn.signed is None and cfg.modules == ["*.linear1"]
    assert QuantConfig().is_fp and not cfg.is_fp
